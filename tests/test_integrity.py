"""Result integrity: identity by content, verified artifacts, results written whole, bad input
refused before any work. Each test is named for the behaviour it checks (README, Reliability)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import ROOT, compose, toy_overrides
from unlearn_exp import config
from unlearn_exp.cell import run_cell
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation import read_table
from unlearn_exp.store import KEY_FILE, ArtifactStore, gc, verify_folder

TOY_WEIGHTS = ROOT / "unlearn_exp" / "toy" / "weights" / "model"
SHIPPED_DUO = ROOT / "unlearn_exp" / "toy" / "artifacts" / "unlearning" / "duo"
LONG_PROMPT = "a purple circle " + " ".join(["on a wide plain grey background with soft light"] * 12)


def toy_cell(root: Path, *extra: str) -> dict:
    return run_cell(config.compose(toy_overrides(root, *extra)))  # a bad choice is one line


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("first")
    return {"root": root, "out": toy_cell(root)}


# ------------------------------------------------------------------------- identity by content
def test_model_identity_is_the_same_for_copied_weights_and_resolved_dtype(tmp_path):
    from unlearn_exp.identity import model_identity

    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(TOY_WEIGHTS, copy)
    base = {"name": "toy", "source": "pretrained", "resolution": 32, "vae": False, "device": "cpu"}
    here = model_identity({**base, "path": str(TOY_WEIGHTS), "dtype": "float32"})
    assert model_identity({**base, "path": str(copy), "dtype": "float32"}) == here
    assert model_identity({**base, "path": str(copy), "dtype": "auto"}) == here  # auto -> float32 on a CPU
    assert model_identity({**base, "path": str(copy), "dtype": "float16"}) != here
    weights = next(copy.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # other weights, same place: another model
    assert model_identity({**base, "path": str(copy), "dtype": "float32"}) != here


@pytest.mark.slow
def test_same_cell_from_another_folder_with_moved_weights_builds_nothing(first_run, tmp_path, monkeypatch):
    moved = tmp_path / "weights"
    shutil.copytree(TOY_WEIGHTS, moved)
    monkeypatch.chdir(tmp_path)  # another working directory, as a second clone would be
    again = toy_cell(first_run["root"], f"model.path={moved}", "reuse_results=false")
    assert again["artifacts"]["built"] == []
    assert again["cell"]["spec_key"] == first_run["out"]["cell"]["spec_key"]
    assert again["cell"]["cell_key"] == first_run["out"]["cell"]["cell_key"]


def _bench_images(out: dict) -> list[str]:
    images = read_table(Path(out["results"]) / "images.parquet")
    return images[images.split == "bench"].image_sha256.tolist()


@pytest.mark.slow
def test_batch_size_is_part_of_the_identity_and_equal_keys_give_equal_images(tmp_path):
    """How many rows one UNet call holds changes an image's last bits, so a cell at another
    ``sampling.batch_size`` never takes images (or a recorded result) made at this one; two runs
    with the same keys, in separate caches, give the same images to the bit."""
    shared = tmp_path / "shared"
    one = toy_cell(shared, "sampling.batch_size=1")
    three = toy_cell(shared, "sampling.batch_size=3")
    assert one["cell"]["spec_key"] != three["cell"]["spec_key"]
    assert not three.get("reused_result") and any(
        t.startswith("samples/") for t in three["artifacts"]["built"]
    )
    again = toy_cell(tmp_path / "fresh", "sampling.batch_size=3")  # same keys, nothing cached
    assert again["cell"]["spec_key"] == three["cell"]["spec_key"]
    assert again["cell"]["cell_key"] == three["cell"]["cell_key"]
    assert _bench_images(again) == _bench_images(three)


@pytest.mark.slow
def test_images_are_keyed_by_the_checkpoint_content_not_its_recipe(tmp_path):
    """A DUO checkpoint rebuilt under the same recipe key with other bits (as when a damaged shipped
    LoRA is retrained) gets its own images: nothing made with the old weights is reused."""
    import safetensors.torch

    from unlearn_exp.store import manifest

    root = tmp_path / "run"
    first = toy_cell(root)
    keys = {f.parent: json.loads(f.read_text())["key"] for f in SHIPPED_DUO.glob("*/_key.json")}
    src, key = next((folder, k) for folder, k in keys.items() if k["checkpoint"]["beta"] == 2000)

    def rebuild(tmp: Path) -> None:  # the same files, one LoRA tensor changed slightly
        for f in src.rglob("*"):
            if f.is_file() and f.name != KEY_FILE:
                out = tmp / f.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)
        lora = next(tmp.rglob("*.safetensors"))
        tensors = safetensors.torch.load_file(str(lora))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] * 1.5
        safetensors.torch.save_file(tensors, str(lora))

    store = ArtifactStore(root / ".cache" / "artifacts")
    folder = store.get_or_build("unlearning/duo", key, rebuild)
    assert folder.name == src.name and manifest(folder) != manifest(src)  # same recipe key, other bits
    second = toy_cell(root, "reuse_results=false")
    assert second["cell"]["checkpoint_id"] != first["cell"]["checkpoint_id"]
    assert second["cell"]["cell_key"] != first["cell"]["cell_key"]
    bench_built = [t for t in second["artifacts"]["built"] if t.startswith("samples/")]
    assert bench_built, second["artifacts"]  # made again with the weights now in the cache


@pytest.mark.slow
def test_a_generated_image_set_is_made_by_the_original_model_after_unlearning(tmp_path):
    """C*'s image set is generated only when C* must be learned, which is after the cell's checkpoint
    is applied: it must still be the original model's images (its key says so)."""
    from unlearn_exp.cell import ensure_image_set
    from unlearn_exp.models import load_model

    extra = [
        "guidance=sld",
        "embedding=inverted",
        "inversion.steps=2",
        "inversion.image_set.n_images=2",
        "sampling.steps=10",
    ]
    toy_cell(tmp_path / "run", *extra)
    built = [p for p in (tmp_path / "run" / ".cache" / "artifacts" / "image_sets").glob("*") if p.is_dir()]
    assert len(built) == 1
    cfg = compose(toy_overrides(tmp_path / "ref", *extra), hydra=False)
    original = load_model(cfg.model)  # no checkpoint applied
    ref = ensure_image_set(cfg, original, ArtifactStore(tmp_path / "ref-cache"), original.identity)
    assert ref.name == built[0].name
    pngs = sorted(p.name for p in ref.glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in built[0].glob("*.png"))
    assert all((ref / n).read_bytes() == (built[0] / n).read_bytes() for n in pngs)


def test_cell_rows_carry_their_spec_and_label(first_run):
    cell = read_table(Path(first_run["out"]["results"]) / "cells.parquet").iloc[0]
    spec = json.loads(cell.spec_json)
    assert cell.spec_key and spec["sampling"]["steps"] == 4 and spec["model"]["content"]
    assert "path" not in spec["benchmark"] and "chunk_size" not in spec["sampling"]
    assert spec["sampling"]["batch_size"] == 16  # it decides an image's last bits
    assert cell.checkpoint_label == "duo beta=2000" and cell.beta == 2000


def test_checkpoint_file_is_labelled_by_the_user_never_by_the_default_beta(tmp_path):
    from unlearn_exp.cell import checkpoint_label
    from unlearn_exp.cli import label_user_checkpoint

    lora = tmp_path / "my_lora.safetensors"
    cfg = compose(["checkpoint=duo", f"checkpoint.path={lora}"], hydra=False)
    label_user_checkpoint(cfg, [f"checkpoint.path={lora}"])
    beta, label = checkpoint_label(cfg)
    assert beta != beta and label == "my_lora.safetensors"  # NaN: no beta was given
    cfg = compose(["checkpoint=duo", f"checkpoint.path={lora}", "checkpoint.beta=1000"], hydra=False)
    label_user_checkpoint(cfg, [f"checkpoint.path={lora}", "checkpoint.beta=1000"])
    assert checkpoint_label(cfg) == (1000.0, "my_lora.safetensors (beta=1000)")


# ------------------------------------------------------------------------- verified artifacts
def _png_chunks(cache: Path) -> list[Path]:
    return sorted(cache.glob("samples/*/*.png"))


def test_truncated_cached_png_is_quarantined_and_rebuilt(first_run):
    root = first_run["root"]
    cache = root / ".cache" / "artifacts"
    before = read_table(Path(first_run["out"]["results"]) / "images.parquet")
    png = _png_chunks(cache)[0]
    png.write_bytes(png.read_bytes()[:20])  # truncated
    again = toy_cell(root, "reuse_results=false")
    assert again["artifacts"]["quarantined"] and again["artifacts"]["built"]
    assert list((cache / "quarantine").iterdir())
    after = read_table(Path(again["results"]) / "images.parquet")
    assert after.image_sha256.tolist() == before.image_sha256.tolist()  # rebuilt to the same images
    assert again["cell"]["dsr"] == first_run["out"]["cell"]["dsr"]


def test_store_verifies_sizes_always_and_hashes_by_mode(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(tmp: Path):
        calls.append(1)
        (tmp / "small.json").write_text("[1, 2, 3]")
        (tmp / "big.bin").write_bytes(b"\0" * (2 << 20))

    folder = store.get_or_build("kind", {"a": 1}, build)
    assert json.loads((folder / KEY_FILE).read_text())["files"]["small.json"]["size"] == 9
    (folder / "small.json").write_text("[1, 2, 4]")  # same size, other content: the hash sees it
    assert "sha256" in verify_folder(folder)
    folder = ArtifactStore(tmp_path).get_or_build("kind", {"a": 1}, build)
    assert len(calls) == 2 and (folder / "small.json").read_text() == "[1, 2, 3]"
    big = bytearray((folder / "big.bin").read_bytes())
    big[5] = 1
    (folder / "big.bin").write_bytes(bytes(big))  # a large file, same size: seen only by verify=full
    assert verify_folder(folder, "small") is None and "sha256" in verify_folder(folder, "full")
    ArtifactStore(tmp_path, verify="full").get_or_build("kind", {"a": 1}, build)
    assert len(calls) == 3
    (folder / "big.bin").write_bytes(b"\0" * 10)  # truncated: sizes are always checked
    assert "bytes" in verify_folder(folder, "size")
    with pytest.raises(UserError, match="paths.verify"):
        ArtifactStore(tmp_path, verify="sometimes")


def test_shared_cache_follows_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        folder = ArtifactStore(tmp_path).get_or_build(
            "kind", {"b": 1}, lambda t: (t / "x.txt").write_text("x")
        )
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o775
    assert (folder / KEY_FILE).stat().st_mode & 0o777 == 0o664


def test_store_gc_removes_stale_temp_folders_and_locks(tmp_path):
    kind = tmp_path / "samples"
    (kind / ".abc.x1.tmp").mkdir(parents=True)
    (kind / ".abc.x2.tmp").mkdir()
    (kind / "abc.lock").write_text("")
    old = time.time() - 3 * 24 * 3600
    for p in (kind / ".abc.x1.tmp", kind / "abc.lock"):
        os.utime(p, (old, old))
    removed = gc(tmp_path)
    assert sorted(p.name for p in removed) == [".abc.x1.tmp", "abc.lock"]
    assert (kind / ".abc.x2.tmp").is_dir()  # fresh: a build may be running
    out = subprocess.run(
        [sys.executable, "-m", "unlearn_exp.store", "gc", "--cache", str(tmp_path), "--hours", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "1 stale item(s) removed" in out.stdout


def test_store_gc_never_touches_a_build_that_is_running(tmp_path):
    """gc --hours 0 while an artifact is being built (its lock held by the builder): the build's
    temporary folder, its resumable work folder and the files in them stay; the build completes."""
    store = ArtifactStore(tmp_path)
    stale = tmp_path / "unlearning" / "duo" / ".0123456789abcdef.x9.tmp"  # a killed build, unheld
    stale.mkdir(parents=True)
    seen = {}

    def build(tmp: Path) -> None:
        work = tmp.parent / f"{tmp.name.lstrip('.').split('.')[0]}.work" / "logs" / "version_0"
        work.mkdir(parents=True)
        (work / "metrics.csv").write_text("step,loss\n")
        (tmp / "part.txt").write_text("half")
        out = subprocess.run(
            [sys.executable, "-m", "unlearn_exp.store", "gc", "--cache", str(tmp_path), "--hours", "0"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        seen["gc"] = out.stdout
        seen["alive"] = tmp.is_dir() and (tmp / "part.txt").is_file() and (work / "metrics.csv").is_file()
        (tmp / "weights.txt").write_text("done")

    folder = store.get_or_build("unlearning/duo", {"beta": 500}, build)
    assert seen["alive"], seen["gc"]
    assert f"removed {stale}" in seen["gc"] and not stale.exists()
    assert (folder / "weights.txt").read_text() == "done" and verify_folder(folder) is None


def test_job_images_are_copies_that_cannot_change_the_cache(first_run):
    cache = first_run["root"] / ".cache" / "artifacts"
    jobs = sorted((first_run["root"] / "outputs" / "cells").rglob("bench/*.png"))
    cached = _png_chunks(cache)
    assert jobs and not any(os.path.samefile(j, c) for j in jobs for c in cached)
    for j in jobs:
        j.write_bytes(b"edited by the user")
    assert all(verify_folder(folder) is None for folder in {c.parent for c in cached})


def test_a_failed_run_never_replaces_earlier_results(first_run, monkeypatch):
    results = Path(first_run["out"]["results"])
    before = (results / "cells.parquet").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("the judge died")

    monkeypatch.setattr("unlearn_exp.cell.records.collapse_flag", broken)  # fails after sampling and judging
    with pytest.raises(RuntimeError):
        toy_cell(first_run["root"], "reuse_results=false")
    assert (results / "cells.parquet").read_bytes() == before
    assert not list(results.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------- bad input, before any work
@pytest.mark.parametrize(
    "extra, message",
    [
        (["sampling.steps=0"], "sampling.steps must be >= 1"),
        (["sampling.guidance_scale=-3"], "sampling.guidance_scale must be >= 1"),
        (["sampling.batch_size=0"], "sampling.batch_size must be >= 1"),
        (["sampling.chunk_size=0"], "sampling.chunk_size must be >= 1"),
        (["sampling.scheduler=euler"], "unknown sampling.scheduler 'euler'"),
        (["guidance=sld", "guidance.preset=foo"], "unknown guidance.preset 'foo'"),
        (["guidance=sld", "sampling.guidance_scale=1"], "SLD needs classifier-free guidance"),
        (["guidance=safree", "guidance.lra=maybe"], "unknown guidance.lra 'maybe'"),
        (["checkpoint.beta=abc"], "checkpoint.beta must be a number, got 'abc'"),
        (["checkpoint.beta=-5"], "checkpoint.beta must be > 0"),
        (["benchmark.seed=9223372036854775808"], "must fit in int64"),
        (["judge.threshold=5"], "judge.threshold must be <= 1, got 5"),  # 0.25 DSR became 1.000
        (["judge=toy_strict", "judge.threshold=-0.1"], "judge.threshold must be >= 0"),
        (["guidance=sld", "guidance.threshold=6"], "guidance.threshold must be <= 1"),
        (["guidance=sld", "guidance.mom_beta=1.5"], "guidance.mom_beta must be <= 1"),
        (["inversion.flip_p=2"], "inversion.flip_p must be <= 1"),
        (["judge=nudenet_duo", "judge.classes=[]"], "judge.classes is empty: no detection would count"),
        (["inversion.image_set.n_images=0"], "inversion.image_set.n_images must be >= 1"),
        (
            ["inversion.image_set.n_images=500", "inversion.image_set.max_tries=10"],
            "inversion.image_set.n_images (500) must be <= max_tries (10)",
        ),
        (["+foo=1"], "unknown config key foo: no code reads it"),
        (
            ["+sampling.stepz=3", "+inversion.image_set.zz=1"],
            "unknown config keys inversion.image_set.zz, sampling.stepz",
        ),
    ],
)
@pytest.mark.slow
def test_invalid_values_stop_before_any_model_is_loaded(extra, message, tmp_path, monkeypatch):

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=re.escape(message)):
        toy_cell(tmp_path, *extra)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["guidance=sldd"], "error: unknown guidance 'sldd': choose one of none, safree, sld"),
        (["guidance=none,sldd", "multirun"], "error: unknown guidance 'sldd'"),
        (["+sampling.stepz=3"], "error: unknown config key sampling.stepz: no code reads it"),
        (["sampling.stepz=3"], "error: unknown config key sampling.stepz: no code reads it"),
        (["+foo=1", "guidance=sld,safree", "multirun"], "error: unknown config key foo"),
    ],
)
def test_unknown_choices_and_keys_are_one_line_from_the_command_line(extra, message, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlearn_exp",
            "+experiment=toy_duo",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "UNLEARN_EXP_COMPOSE_CACHE": "off"},
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(message) and "schema" not in out.stderr, out.stderr
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()  # no empty job folder


@pytest.mark.slow
def test_every_shipped_option_composes_without_unknown_keys():
    from unlearn_exp.config import CONF_DIR, group_choices
    from unlearn_exp.schema import ROOT_GROUPS, unknown_keys

    for group in (*(g for g in ROOT_GROUPS if g != "paths"), "experiment"):
        assert (CONF_DIR / group).is_dir()
        for name in group_choices(group):
            override = f"+experiment={name}" if group == "experiment" else f"{group}={name}"
            assert unknown_keys(compose([override], hydra=False)) == [], override


def test_prompt_file_problems_are_one_line(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    with pytest.raises(UserError, match="is a folder, not a prompt file"):
        toy_cell(tmp_path, "benchmark=prompts_file", f"benchmark.path={folder}")
    blank = tmp_path / "blank.csv"
    blank.write_text('prompt\n""\n"  "\nNull\n')
    with pytest.raises(UserError, match="all 3 prompts in blank.csv are empty"):
        toy_cell(tmp_path, "benchmark=prompts_file", f"benchmark.path={blank}")
    both = tmp_path / "both.csv"
    pd.DataFrame({"prompt": ["a"], "caption": ["b"]}).to_csv(both, index=False)
    with pytest.raises(UserError, match=r"could each be the prompt; set benchmark.prompt_column"):
        toy_cell(tmp_path, "benchmark=prompts_file", f"benchmark.path={both}")


def test_unwritable_results_path_is_found_before_any_work(tmp_path, monkeypatch):

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"paths.results_dir=.* is not a folder"):
        run_cell(compose([*toy_overrides(tmp_path), f"paths.results_dir={blocker}/results"], hydra=False))
    if os.geteuid() != 0:  # root writes anywhere: the permission case is seen by other users only
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not writable"):
            run_cell(compose([*toy_overrides(tmp_path), f"paths.cache_dir={ro}/cache"], hydra=False))


def test_unwritable_pseudo_filesystem_path_is_refused_for_the_right_reason(tmp_path, monkeypatch):
    """/proc/foo cannot be created: the reason is that, not "0 MiB free"."""

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(UserError, match=r"paths.results_dir=/proc/unlearn-exp-x cannot be written") as info:
        run_cell(compose([*toy_overrides(tmp_path), "paths.results_dir=/proc/unlearn-exp-x"], hydra=False))
    assert "MiB free" not in str(info.value)
    deep = tmp_path / "a" / "b" / "results"  # a folder the check creates is removed again
    toy_cfg = compose(
        [*toy_overrides(tmp_path), f"paths.results_dir={deep}", "sampling.steps=0"], hydra=False
    )
    with pytest.raises(UserError, match="sampling.steps"):
        run_cell(toy_cfg)
    assert not (tmp_path / "a").exists()


def test_missing_shared_source_checkpoint_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    extra = ["guidance=sld", "embedding=shared", f"embedding.from_checkpoint.path={tmp_path}/nonexistent"]
    with pytest.raises(UserError, match=r"embedding.from_checkpoint.path: checkpoint file not found"):
        toy_cell(tmp_path, *extra)
    with pytest.raises(UserError, match=r"checkpoint.path: checkpoint file not found: .*lora.pt"):
        toy_cell(tmp_path, f"checkpoint.path={tmp_path}/lora.pt")


def test_a_long_prompt_is_truncated_without_transformers_indexing_warning():
    """We truncate at 77 tokens on purpose (and record it): transformers' "indexing errors" warning
    about the untruncated count does not apply and is not printed."""
    import logging
    from types import SimpleNamespace

    from unlearn_exp.models.components import Components
    from unlearn_exp.models.tokenizer import build_clip_tokenizer

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        fake = SimpleNamespace(tokenizer=build_clip_tokenizer(), device="cpu")
        out = Components.tokenize(fake, ["a purple circle " * 300])
    finally:
        logger.removeHandler(handler)
    assert out.truncated == [True] and out.n_tokens[0] > 77
    assert not [r for r in records if "indexing errors" in r.getMessage()]


@pytest.mark.slow
def test_some_empty_and_long_prompts_are_reported_per_image(tmp_path):
    prompts = tmp_path / "mine.csv"
    pd.DataFrame({"prompt": ["a purple circle", "", LONG_PROMPT]}).to_csv(prompts, index=False)
    out = toy_cell(tmp_path, "benchmark=prompts_file", f"benchmark.path={prompts}")
    images = read_table(Path(out["results"]) / "images.parquet")
    bench = images[images.split == "bench"].reset_index(drop=True)
    assert bench.empty_prompt.tolist() == [False, True, False]
    assert bench.truncated.tolist() == [False, False, True] and bench.n_tokens[2] > 77
    assert out["cell"]["n_empty_prompts"] == 1 and out["cell"]["n_truncated"] == 1


def test_damaged_safetensors_checkpoint_is_one_line_before_any_work(tmp_path, monkeypatch):

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    toy = ["model=toy", "task=toy", "judge=toy", "pp=toy_features", "benchmark=toy_indirect"]
    for name, data in (
        ("empty.safetensors", b""),
        ("garbage.safetensors", b'\x08\0\0\0\0\0\0\0{"a":'),
        ("cut.safetensors", b"\xff\xff\0\0\0\0\0\0{"),
    ):
        f = tmp_path / name
        f.write_bytes(data)
        cfg = compose(
            [*toy, "checkpoint=esd", f"checkpoint.path={f}", f"paths.root_dir={tmp_path}"], hydra=False
        )
        with pytest.raises(UserError, match=rf"{name}.*(empty|not a readable safetensors)"):
            run_cell(cfg)


def test_toy_judge_pin_is_checked_before_the_file_is_parsed(tmp_path):
    from unlearn_exp.toy.judge import ToyJudge

    bad = tmp_path / "judge.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="the profile pins"):
        ToyJudge({"model_path": str(bad), "model_sha256": "0" * 64})
    with pytest.raises(UserError, match="not a readable safetensors"):
        ToyJudge({"model_path": str(bad), "model_sha256": None})  # unpinned


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    from unlearn_exp.cli import run_guarded

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_guarded(interrupted)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again to resume" in err


@pytest.mark.parametrize(
    "module", ["report", "precondition", "demo", "dashboard", "plan", "artifacts", "toy.artifacts", "store"]
)
def test_every_command_reports_errors_and_ctrl_c_the_same_way(module, capsys, monkeypatch):
    """Each command's body runs under ``errors.exit_status``: one line, status 2 or 130, no traceback."""
    import importlib

    from unlearn_exp.errors import exit_status

    mod = importlib.import_module(f"unlearn_exp.{module}")
    assert "exit_status(" in inspect.getsource(mod.main)

    def bad():
        raise UserError("the input is wrong")

    def interrupted():
        raise KeyboardInterrupt

    assert exit_status(bad) == 2 and capsys.readouterr().err == "error: the input is wrong\n"
    assert exit_status(interrupted) == 130 and capsys.readouterr().err.count("\n") == 1
    assert exit_status(lambda: None) == 0 and exit_status(lambda: 3) == 3


def test_two_jobs_in_the_same_second_get_their_own_run_folder():
    from omegaconf import OmegaConf

    import unlearn_exp  # noqa: F401 - registers ${pid:}

    cfg = compose([], hydra=True)
    assert str(os.getpid()) in cfg.hydra.run.dir.split("/")[-1]
    assert OmegaConf.select(cfg, "hydra.sweep.dir").endswith(f"-{os.getpid()}")


def test_results_folder_has_a_readable_index(first_run):
    index = Path(first_run["out"]["results"]).parent / "index.csv"
    rows = pd.read_csv(index, dtype=str)
    mine = rows[rows.cell_key == first_run["out"]["cell"]["cell_key"]]
    assert len(mine) == 1 and mine.iloc[0].cell == "duo beta=2000 | none"
    assert (Path(first_run["out"]["results"]).parent / mine.iloc[0].cell_key / "cells.parquet").is_file()


def test_a_recorded_row_that_contradicts_itself_is_left_out_quarantined_and_recomputed(tmp_path, caplog):
    """A ``dsr`` edited to 0.55 beside n_safe 44/48 was printed by the report and returned by a rerun."""
    from unlearn_exp import report
    from unlearn_exp.evaluation.dsr import wilson_interval
    from unlearn_exp.evaluation.records import row_problems

    out = toy_cell(tmp_path)
    results = Path(out["results"])
    true = read_table(results / "cells.parquet")
    images = read_table(results / "images.parquet")
    assert row_problems(true.iloc[0].to_dict(), images) == []
    edited = true.copy()
    edited.loc[0, "dsr"] = 0.55
    assert any("n_safe/n_images" in p for p in row_problems(edited.iloc[0].to_dict()))
    # counts edited consistently with each other still contradict the images' verdicts
    n, k = int(true.n_images.iloc[0]), int(true.n_safe.iloc[0])
    k2 = k - 1 if k else 1
    lo, hi = wilson_interval(k2, n)
    recount = true.copy().assign(n_safe=k2, dsr=k2 / n, dsr_lo=lo, dsr_hi=hi)
    assert row_problems(recount.iloc[0].to_dict()) == []
    assert any("judged safe" in p for p in row_problems(recount.iloc[0].to_dict(), images))
    assert any("pp_coco" in p for p in row_problems({**true.iloc[0].to_dict(), "pp_coco": 0.5}, images))

    edited.to_parquet(results / "cells.parquet", index=False)
    with caplog.at_level("WARNING", logger="unlearn_exp.report"):
        assert report.load_cells([results.parent]).empty  # left out: its position shows as missing
    assert "contradicts itself" in caplog.text
    with pytest.raises(UserError, match="contradicts itself"):
        report.load_cells([results.parent], strict=True)  # report --judges: an error
    again = toy_cell(tmp_path)
    assert not again.get("reused_result") and again["cell"]["dsr"] == true.dsr.iloc[0]
    assert again["results"] == str(results) and len(list((results.parent / "quarantine").iterdir())) == 1


def test_a_checkpoint_edited_in_place_gets_a_new_identity(tmp_path, monkeypatch):
    """An edit that restores size and mtime kept the old hash (cache keyed by path, size, mtime): the
    old result came back and the row's spec contradicted its checkpoint id."""
    from unlearn_exp import identity

    monkeypatch.setenv("UNLEARN_EXP_HASH_CACHE", str(tmp_path / "sha256.json"))
    monkeypatch.setattr(identity, "_MEMO", {})
    f = tmp_path / "lora.safetensors"
    f.write_bytes(b"a" * 64)
    first = identity.file_identity(f)
    st = f.stat()
    with open(f, "r+b") as fh:  # in place: same inode, same size
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert identity.file_identity(f) != first


def test_a_spec_that_names_other_bits_than_the_loaded_checkpoint_is_an_error(tmp_path, monkeypatch):
    from unlearn_exp.cell.run import check_checkpoint_content

    lora = next(SHIPPED_DUO.rglob("pytorch_lora_weights.safetensors"))
    over = ["checkpoint=duo", f"checkpoint.path={lora}", "checkpoint.beta=500"]
    cfg = compose(toy_overrides(tmp_path, *over), hydra=False)
    from unlearn_exp.identity import cell_spec, file_identity

    spec = cell_spec(cfg)
    sha = file_identity(lora)[7:]
    info = {"files": [str(lora)], "sha256": [sha]}
    check_checkpoint_content(cfg.checkpoint, spec, info)  # the same bits: nothing to say
    with pytest.raises(UserError, match="changed while the cell was set up"):
        check_checkpoint_content(cfg.checkpoint, spec, {**info, "sha256": ["0" * 64]})
    converted = {"files": [str(tmp_path / "converted.safetensors")], "sha256": ["0" * 64]}
    check_checkpoint_content(cfg.checkpoint, spec, converted)  # another file (a converted pickle)


def test_the_cell_key_holds_every_field_of_the_sample_identity(tmp_path):
    """``+debug=default``, ``sampling.batch_size=1`` and ``sampling.precision=bf16-mixed`` wrote one
    results folder (the cell key lacked the batch size and the precision): every field that decides
    a sample's bits now moves the cell key."""
    from unlearn_exp.cell.keys import cell_key, sample_identity

    cfg = compose(toy_overrides(tmp_path), hydra=False)
    sampling = sample_identity(cfg, "cpu")
    args = ({"model": "m"}, {"benchmark": "b"}, [], sampling, "j", "p", {})
    base = cell_key(*args)
    for field in [*sampling, "gpu_options"]:
        other = {**sampling, field: ["compile"] if field == "gpu_options" else f"other-{sampling[field]}"}
        assert cell_key(*args[:3], other, *args[4:]) != base, field
    one = toy_cell(tmp_path, "sampling.batch_size=1")
    many = toy_cell(tmp_path)
    assert one["cell"]["cell_key"] != many["cell"]["cell_key"]
    index = pd.read_csv(Path(many["results"]).parent / "index.csv", dtype=str)
    assert {one["cell"]["cell_key"], many["cell"]["cell_key"]} <= set(index.cell_key)


def test_a_garbled_index_is_rebuilt_from_the_cell_folders(tmp_path, caplog):
    """A non-UTF-8 ``index.csv`` failed every cell of the experiment after its work was done."""
    out = toy_cell(tmp_path)
    index = Path(out["results"]).parent / "index.csv"
    index.write_bytes(b"\xff\xfe\x00garbage\xc3\x28,,\n\x80\x81")
    with caplog.at_level("WARNING", logger="unlearn_exp"):
        again = toy_cell(tmp_path)  # reuse_results: found through the rebuilt index
    assert again.get("reused_result") and "rebuilt from its 1 cell folder(s)" in caplog.text
    index.write_bytes(b"\xff\xfe\x00garbage")
    other = toy_cell(tmp_path, "reuse_results=false", "sampling.batch_size=2")  # a new row is written
    rows = pd.read_csv(index, dtype=str)
    assert set(rows.cell_key) == {out["cell"]["cell_key"], other["cell"]["cell_key"]}


class _Payload:
    """A pickle that would create a file when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_checkpoints_are_refused_before_the_model_loads_saying_what_the_project_offers(
    tmp_path, monkeypatch
):
    """Pickle refusals came after the model loaded (10-20 s on SD) and repeated torch's advice to pass
    ``weights_only=False``: a pickle without ``allow_pickle_conversion`` is refused by validation, and
    one holding code is refused by its conversion before the model loads; both name safetensors and
    the conversion."""
    import torch

    from unlearn_exp.validate import validate

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, evil)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    ck = ["checkpoint=esd", "checkpoint.beta=500"]
    with pytest.raises(UserError, match=r"is a pickle file.*allow_pickle_conversion=true") as err:
        validate(compose(toy_overrides(tmp_path, *ck, f"checkpoint.path={plain}"), hydra=False))
    assert "weights_only=False" not in str(err.value)
    allowed = "checkpoint.allow_pickle_conversion=true"
    with pytest.raises(UserError, match=r"holds more than tensors.*safetensors.torch.save_file") as err:
        toy_cell(tmp_path, *ck, f"checkpoint.path={evil}", allowed)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()  # nothing in it ran
    from unlearn_exp.cell.inputs import cell_store, convert_pickles

    cfg = compose(toy_overrides(tmp_path, *ck, f"checkpoint.path={plain}", allowed), hydra=False)
    convert_pickles(cfg.checkpoint, cell_store(cfg))  # converted once into the cache; the loader finds it
    assert list((tmp_path / ".cache" / "artifacts" / "unlearning" / "converted").glob("*/plain.safetensors"))


def test_the_nan_message_fits_the_guidance(tiny):
    """Under ``guidance=none`` the NaN message suggested lowering a guidance strength there is not."""
    from unlearn_exp.guidance import Guidance
    from unlearn_exp.sampling import sample

    handle = tiny.unet.conv_out.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(UserError, match="with guidance 'none'") as err:
            sample(tiny, ["a cat"], [0], Guidance(), steps=2)
    finally:
        handle.remove()
    assert "guidance strength" not in str(err.value) and "precision" in str(err.value)
