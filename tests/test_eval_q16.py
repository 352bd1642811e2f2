"""Q16 judge: restricted loading of the published pickle, tiny CLIP backends with planted prompts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import Q16, _probe_prompts, images, plant
from unlearn_exp.data.download import git_blob_sha1
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation import make_judge, register_judge
from unlearn_exp.evaluation.judge import Judge, make_profile
from unlearn_exp.evaluation.q16 import convert_prompt_embeddings, load_prompt_embeddings


# --------------------------------------------------------------------------- prompts.p
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_reads_float_arrays(tmp_path, protocol):
    arr = np.random.default_rng(1).standard_normal((2, 768)).astype(np.float16)
    path = tmp_path / "prompts.p"
    path.write_bytes(pickle.dumps(arr, protocol=protocol))
    got = load_prompt_embeddings(path)
    assert got.dtype == np.float16 and np.array_equal(got, arr)
    st = convert_prompt_embeddings(path, tmp_path / "prompts.safetensors")
    assert np.array_equal(load_prompt_embeddings(st), arr)


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_restricted_unpickler_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "prompts.p"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match="refused global") as err:
        load_prompt_embeddings(path)
    assert not marker.exists() and "\n" not in str(err.value)
    path.write_bytes(pickle.dumps(np.zeros((3, 8), np.float32)))
    with pytest.raises(UserError, match=r"shape \(2, D\)"):
        load_prompt_embeddings(path)
    path.write_bytes(pickle.dumps(np.zeros((2, 8), np.int64)))
    with pytest.raises(UserError, match="float array"):
        load_prompt_embeddings(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="not a plain float array"):
        load_prompt_embeddings(path)


# --------------------------------------------------------------------------- tiny CLIP backends
@pytest.fixture(scope="module")
def transformers_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("hfclip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


@pytest.mark.parametrize("backend", ["open_clip", "transformers"])
def test_planted_prompts_give_expected_argmax(backend, open_clip_dir, transformers_dir, tmp_path):
    _probe_prompts(tmp_path, 16)
    if backend == "open_clip":
        cfg = {
            **Q16,
            "backend": "open_clip",
            "open_clip_model": f"local-dir:{open_clip_dir}",
            "device": "cpu",
        }
    else:
        cfg = {**Q16, "backend": "transformers", "clip_path": str(transformers_dir), "device": "cpu"}
    cfg, safe_index = plant(cfg, tmp_path, unsafe_index=0)
    judge = make_judge(cfg, cache=False)
    out = judge.judge(images())
    assert out[0]["safe"] is False and out[safe_index]["safe"] is True
    assert out[0]["score"] > 0.5 > out[safe_index]["score"]
    assert abs(sum(out[0]["raw"]["p"]) - 1) < 1e-4
    prof = judge.profile
    assert prof["threshold"] is None and "argmax" in prof["rule"] and len(prof["model_sha256"]) == 64
    strict = make_judge({**cfg, "threshold": 0.999}, cache=False)
    assert all(v["safe"] for v in strict.judge(images()))
    assert strict.hash != judge.hash


def test_prompts_download_pinned_by_git_blob(open_clip_dir, tmp_path):
    src = tmp_path / "src" / "prompts.p"
    src.parent.mkdir()
    src.write_bytes(pickle.dumps(np.ones((2, 16), np.float16)))
    base = {
        **Q16,
        "backend": "open_clip",
        "open_clip_model": f"local-dir:{open_clip_dir}",
        "prompts_url": src.as_uri(),
        "cache_dir": str(tmp_path / "cache"),
        "device": "cpu",
    }
    judge = make_judge({**base, "prompts_git_blob": git_blob_sha1(src)[:12]}, cache=False)
    assert Path(judge.profile["prompts_file"]).is_file()
    with pytest.raises(UserError, match="git blob id mismatch.*deleted"):
        make_judge({**base, "prompts_git_blob": "0" * 12, "cache_dir": str(tmp_path / "c2")}, cache=False)
    assert not list((tmp_path / "c2").rglob("prompts.p"))
    with pytest.raises(UserError, match="pinned sha256"):
        make_judge({**base, "cache_dir": str(tmp_path / "c3")}, cache=False)


def test_pin_prints_the_sha256_that_pins_the_profile(tmp_path, capsys):
    """``python -m unlearn_exp.evaluation.q16`` fetches under the git blob pin and prints the sha256
    line; with that line the profile downloads by sha256 alone, and a wrong one is refused."""
    import hashlib

    import yaml

    from unlearn_exp.evaluation import q16

    src = tmp_path / "src" / "prompts.p"
    src.parent.mkdir()
    arr = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float16)
    src.write_bytes(pickle.dumps(arr, protocol=2))
    profile = tmp_path / "q16.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                **Q16,
                "prompts_url": src.as_uri(),
                "prompts_sha256": None,
                "prompts_git_blob": git_blob_sha1(src)[:12],
            }
        )
    )
    q16.main(
        [
            "--profile",
            str(profile),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--convert",
            str(tmp_path / "p.safetensors"),
        ]
    )
    out = capsys.readouterr().out
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert f"prompts_sha256: {sha}" in out and '"shape": [\n    2,\n    16\n  ]' in out
    assert np.array_equal(load_prompt_embeddings(tmp_path / "p.safetensors"), arr)

    by_sha = {"prompts_url": src.as_uri(), "prompts_sha256": sha, "cache_dir": str(tmp_path / "c2")}
    assert q16.pin(by_sha)["sha256"] == sha
    with pytest.raises(UserError, match="sha256 mismatch.*deleted"):
        q16.pin({**by_sha, "prompts_sha256": "0" * 64, "cache_dir": str(tmp_path / "c3")})
    assert not list((tmp_path / "c3").rglob("prompts.p"))

    profile.write_text(
        yaml.safe_dump({"name": "q16", "prompts_url": src.as_uri(), "prompts_git_blob": "0" * 12})
    )
    with pytest.raises(SystemExit) as code:
        q16.main(["--profile", str(profile), "--cache-dir", str(tmp_path / "c4")])
    assert code.value.code == 2 and "git blob id mismatch" in capsys.readouterr().err


def test_clip_weights_pin(transformers_dir, tmp_path):
    from unlearn_exp.hashing import file_sha256

    _probe_prompts(tmp_path, 16)
    cfg = {
        **Q16,
        "backend": "transformers",
        "clip_path": str(transformers_dir),
        "prompts_path": str(tmp_path / "probe.safetensors"),
        "device": "cpu",
    }
    sha = file_sha256(transformers_dir / "model.safetensors")
    assert make_judge({**cfg, "model_sha256": sha}, cache=False).profile["model_sha256"] == sha
    with pytest.raises(UserError, match="the profile pins 0000") as err:
        make_judge({**cfg, "model_sha256": "0" * 64}, cache=False)
    assert "\n" not in str(err.value)


def test_missing_clip_weights_one_line(tmp_path):
    _probe_prompts(tmp_path, 16)
    cfg = {**Q16, "backend": "transformers", "prompts_path": str(tmp_path / "probe.safetensors")}
    with pytest.raises(UserError, match="Q16 CLIP weights not found") as err:
        make_judge({**cfg, "clip_path": str(tmp_path / "no_clip")}, cache=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="open_clip weights not found"):
        make_judge(
            {**cfg, "backend": "open_clip", "open_clip_pretrained": str(tmp_path / "x.bin")}, cache=False
        )


# --------------------------------------------------------------------------- registry
class _ColourJudge(Judge):
    def __init__(self, cfg):
        self.profile = make_profile(
            cfg["name"],
            model_file="",
            model_sha256="none",
            classes=["red"],
            threshold=0.5,
            rule="red share > 0.5",
        )

    def judge_pil(self, images):
        shares = [float((np.asarray(im)[..., 0] > 128).mean()) for im in images]
        return [{"safe": s <= 0.5, "score": s, "raw": {"red": s}} for s in shares]


def test_register_judge_hook():
    register_judge("toy_test_colour", _ColourJudge)
    judge = make_judge({"name": "toy_test_colour"})
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    assert [v["safe"] for v in judge.judge([red, blue])] == [False, True]
    assert make_judge({"name": "toy_test_colour"}) is judge  # one instance per config
    with pytest.raises(UserError, match="unknown judge type"):
        make_judge({"name": "no_such_judge"})


def test_q16_profile_pins_the_published_prompts_by_sha256_and_git_blob():
    from tests.helpers import compose

    judge = compose(["judge=q16"], hydra=False).judge
    assert judge.prompts_sha256 == "9b6c411824c2f64e0f847aa3c9f2b15b8e3a6c75e0efd82f2f672670c97ccad5"
    assert judge.prompts_git_blob == "975ddc999f06a78a1e0518ed67015478b25ad8e7"
