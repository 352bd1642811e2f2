"""Benchmark loaders: published layouts, subsets, seeds per image, downloads and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from unlearn_exp.data import SCHEMA_COLUMNS, fetch, load_benchmark, read_prompts
from unlearn_exp.errors import UserError
from unlearn_exp.hashing import file_sha256

CONF = Path(__file__).resolve().parents[1] / "conf" / "benchmark"


def shared() -> Path:
    root = os.environ.get("UNLEARN_EXP_SHARED_DATASETS")
    if not root:
        pytest.skip("UNLEARN_EXP_SHARED_DATASETS is unset: the real published prompt files are not available")
    return Path(root)


def bench_cfg(name: str, **over):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.merge(cfg, over)


# --------------------------------------------------------------------------- real published files
REAL = [
    ("i2p_all", "i2p/unsafe-prompts4703.csv", 4703),
    ("i2p_hf", "i2p/i2p_benchmark.csv", 4703),
    ("i2p_nudity", "i2p/unsafe-prompts4703.csv", 95),
    ("i2p_sexual", "i2p/unsafe-prompts4703.csv", 931),
    ("i2p_violence", "i2p/unsafe-prompts4703.csv", 756),
    ("ring_a_bell_violence_k38", "ring_a_bell/Violence_eta_5.5_K_38.csv", 250),
    ("ring_a_bell_violence_eta5", "ring_a_bell/Violence_eta_5_K_77.csv", 250),
    ("ring_a_bell_nudity", "ring_a_bell/nudity-ring-a-bell.csv", 79),
    ("unlearndiffatk_nudity", "unlearndiffatk/nudity.csv", 142),
    ("unlearndiffatk_violence", "unlearndiffatk/violence.csv", 756),
    ("unlearndiffatk_vangogh", "unlearndiffatk/vangogh.csv", 50),
    ("p4d_nudity_esd", "p4d/unsafe-prompts-nudity_esd.csv", 361),
    ("coco_30k", "coco/coco_30k.csv", 30000),
    ("coco_10k", "coco/coco_10k.csv", 9969),
    ("coco_1k", "coco/coco1k.csv", 1000),
    ("coco_pp", "coco/coco_30k.csv", 1000),
]


@pytest.mark.parametrize("name,rel,rows", REAL)
def test_real_file_row_counts(name, rel, rows):
    path = shared() / rel
    cfg = bench_cfg(name, path=str(path), images_per_prompt=1)
    assert cfg.expected_prompts == rows
    assert file_sha256(path) == cfg.sha256  # the pinned hash is the published file's
    df = load_benchmark(cfg, None)
    assert list(df.columns) == SCHEMA_COLUMNS
    assert len(df) == rows
    assert df["case_id"].is_unique and df["seed"].dtype == "int64"
    assert df.attrs["file_sha256"] == cfg.sha256


def test_i2p_both_layouts_agree_and_null_prompt():
    root = shared()
    esd = read_prompts(root / "i2p/unsafe-prompts4703.csv", loader="i2p")
    hf = read_prompts(root / "i2p/i2p_benchmark.csv", loader="i2p")
    assert (esd.prompt == hf.prompt).all() and (esd.seed == hf.seed).all()
    assert (esd.guidance == hf.guidance).all() and (esd.case_id == hf.case_id).all()
    # row 2260 is "Null" in one copy and an empty cell in the other: both read as ""
    assert esd.prompt[2260] == "" and hf.prompt[2260] == ""
    assert hf.loc[15, "seed"] == 3705364562 and hf.loc[15, "guidance"] == 7.0
    nud = read_prompts(root / "i2p/i2p_benchmark.csv", loader="i2p", subset="nudity")
    assert len(nud) == 95


def test_ring_a_bell_violence_three_seeds_per_prompt():
    path = shared() / "ring_a_bell/Violence_eta_5.5_K_77.csv"
    df = load_benchmark(bench_cfg("ring_a_bell_violence", path=str(path)), None)
    assert len(df) == 750 and df.attrs["n_prompts"] == 250
    first = df[df.case_id == "0"]
    assert first.image_index.tolist() == [0, 1, 2]
    assert first.seed.tolist() == [41, 42, 43]  # evaluation_seed 41 + j
    limited = load_benchmark(bench_cfg("ring_a_bell_violence", path=str(path), limit=4), None)
    assert len(limited) == 12 and limited.case_id.unique().tolist() == ["0", "1", "2", "3"]


def test_coco_ids_and_multiline_prompts():
    root = shared()
    full = read_prompts(root / "coco/coco_30k.csv", loader="csv")
    small = read_prompts(root / "coco/coco1k.csv", loader="csv")
    assert full.case_id[0] == "203564" and full.seed[0] == 41337
    assert (full.case_id[:1000] == small.case_id).all() and (full.seed[:1000] == small.seed).all()
    assert full.prompt.str.contains("\n").sum() > 0  # quoted multi-line captions kept whole
    assert not full.prompt.str.contains("\r").any()


def test_ring_a_bell_nudity_uses_sensitive_prompt_and_default_seed():
    df = load_benchmark(
        bench_cfg("ring_a_bell_nudity", path=str(shared() / "ring_a_bell/nudity-ring-a-bell.csv"))
    )
    assert df.prompt[0].startswith("The painting depicted a woman in a bedroom, bare")
    assert (df.seed == 42).all() and df.guidance.isna().all()


# --------------------------------------------------------------------------- synthetic files
def test_prompts_file_csv_and_txt(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_bytes(b'case_id,prompt,seed\r\na,"a cat\r\non a mat",7\r\nb,NuLL,9\r\n')
    cfg = bench_cfg("prompts_file", path=str(csv), images_per_prompt=2)
    df = load_benchmark(cfg)
    assert df.case_id.tolist() == ["a", "a", "b", "b"]
    assert df.seed.tolist() == [7, 8, 9, 10]
    assert df.prompt[0] == "a cat\non a mat" and df.prompt[2] == ""
    txt = tmp_path / "p.txt"
    txt.write_text("a dog\n\na red car\n")
    df = load_benchmark(bench_cfg("prompts_file", path=str(txt)))
    assert df.prompt.tolist() == ["a dog", "a red car"] and (df.seed == 42).all()
    assert df.case_id.tolist() == ["0", "1"] and df.source_row.tolist() == [0, 1]


def test_prompt_file_with_expected_labels(tmp_path):
    """A labelled benign set keeps its ``expected`` column through the images (benign accuracy)."""
    csv = tmp_path / "benign.csv"
    csv.write_text('prompt,seed,Expected\na red ball,1,red\na blue cup,2," blue,green "\nno label,3,\n')
    df = load_benchmark(bench_cfg("prompts_file", path=str(csv), images_per_prompt=2))
    assert list(df.columns) == [*SCHEMA_COLUMNS, "expected"]
    assert df.expected.tolist() == ["red", "red", "blue,green", "blue,green", None, None]
    plain = tmp_path / "plain.csv"
    plain.write_text("prompt,seed\na red ball,1\n")
    assert list(load_benchmark(bench_cfg("prompts_file", path=str(plain))).columns) == SCHEMA_COLUMNS


def test_unnamed_index_column_is_dropped(tmp_path):
    p = tmp_path / "u.csv"
    pd.DataFrame({"prompt": ["x", "y"], "evaluation_seed": [1, 2], "case_number": [5, 6]}).to_csv(p)
    df = read_prompts(p, loader="csv")
    assert df.case_id.tolist() == ["5", "6"] and df.seed.tolist() == [1, 2]


@pytest.mark.parametrize(
    "content,message",
    [
        ("title,seed\nhello,1\n", "none of the known prompt columns"),
        ("prompt,evaluation_seed\nhello,abc\n", "'abc' is not an integer seed"),
        ("prompt,evaluation_seed\nhello,1.5\n", "not an integer seed"),
        ("prompt,seed\nhello,9223372036854775808\n", "does not fit in int64"),  # was OverflowError
        ("prompt,seed\nhello,1e30\n", "does not fit in int64"),
    ],
)
def test_bad_csv_one_line_error(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_benchmark(bench_cfg("prompts_file", path=str(p)))
    assert "\n" not in str(err.value)


def test_seeds_near_int64_max_and_repeated_prompts(tmp_path, caplog):
    p = tmp_path / "edge.csv"
    p.write_text("prompt,seed\nhello,9223372036854775807\nhello,3\nworld,4\n")
    with caplog.at_level("INFO", logger="unlearn_exp"):
        rows = load_benchmark(bench_cfg("prompts_file", path=str(p)))
    assert list(rows["seed"]) == [2**63 - 1, 3, 4]
    assert "1 prompt(s) repeat an earlier prompt" in caplog.text  # each copy counts in DSR
    with pytest.raises(UserError, match="does not fit in int64"):
        load_benchmark(bench_cfg("prompts_file", path=str(p), images_per_prompt=2))


def test_registered_loader_and_unknown_loader():
    from unlearn_exp.data import register_loader

    table = pd.DataFrame(
        {
            "case_id": ["a"],
            "prompt": ["p"],
            "seed": [1],
            "guidance": [float("nan")],
            "image_index": [0],
            "source_row": [0],
        }
    )
    register_loader("test_fixed", lambda cfg, data_dir: table)
    assert load_benchmark({"name": "x", "loader": "test_fixed"}) is table
    with pytest.raises(UserError, match="unknown benchmark loader .nope.; registered:"):
        load_benchmark({"name": "x", "loader": "nope", "path": "/x"})


def test_missing_path_and_no_url():
    with pytest.raises(UserError, match="benchmark.path"):
        load_benchmark(bench_cfg("mma_diffusion"), "/nonexistent")
    with pytest.raises(UserError, match="does not exist"):
        load_benchmark(bench_cfg("prompts_file", path="/nonexistent/x.csv"))


def test_download_file_url_and_sha256_mismatch(tmp_path):
    src = tmp_path / "src" / "bench.csv"
    src.parent.mkdir()
    src.write_text("prompt,evaluation_seed,case_number\na cat,3,0\na dog,4,1\n")
    good = file_sha256(src)
    data_dir = tmp_path / "data"
    cfg = OmegaConf.create(
        {
            "name": "mini",
            "loader": "csv",
            "path": None,
            "url": src.as_uri(),
            "sha256": good,
            "images_per_prompt": 1,
        }
    )
    df = load_benchmark(cfg, data_dir)
    cached = data_dir / "mini" / good[:16] / "bench.csv"
    assert cached.is_file() and df.prompt.tolist() == ["a cat", "a dog"]
    src.write_text(
        "prompt,evaluation_seed\na cat,3\n"
    )  # the source changes: the cache still serves the pinned copy
    assert len(load_benchmark(cfg, data_dir)) == 2

    bad = OmegaConf.merge(cfg, {"name": "mini2", "sha256": "0" * 64})
    with pytest.raises(UserError, match="sha256 mismatch.*deleted"):
        load_benchmark(bad, data_dir)
    assert not any(p.is_file() for p in (data_dir / "mini2").rglob("*") if not p.name.endswith(".lock"))
    with pytest.raises(UserError, match="cannot download"):
        fetch((tmp_path / "absent.csv").as_uri(), "0" * 64, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("yaml", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_benchmark_configs_are_complete(yaml):
    cfg = OmegaConf.load(yaml)
    assert cfg.name == yaml.stem
    if cfg.get("loader") == "toy":  # generated from a seed: no file, the prompt count is its own
        from unlearn_exp.data import load_benchmark

        df = load_benchmark(cfg)
        assert len(df) == cfg.n * cfg.images_per_prompt and df.prompt.str.len().gt(0).all()
        return
    if cfg.get("loader") == "ring_a_bell":  # generated against the cell's model from a base benchmark
        raw = OmegaConf.to_container(cfg, resolve=False)
        assert cfg.base.name and cfg.base.loader and raw["model"] == "${model}" and raw["cache_dir"]
        assert all(
            cfg.get(k) is not None for k in ("eta", "k", "population", "generations", "images_per_prompt")
        )
        return
    for key in ("path", "images_per_prompt", "limit"):
        assert key in cfg
    assert cfg.loader in ("i2p", "csv", "prompts_file")
    if cfg.get("url"):
        assert cfg.url.startswith("https://raw.githubusercontent.com/") and len(cfg.sha256) == 64
        assert cfg.file == cfg.url.rsplit("/", 1)[-1] and cfg.expected_prompts > 0
    else:
        assert cfg.get("source_hint")  # names the file the user must supply


def test_headerless_csv_with_an_unbalanced_quote_is_read_as_lines(tmp_path, caplog):
    """Published prompt lists are often one prompt per line saved as .csv, some with an unbalanced
    quote (e.g. a Ring-A-Bell nudity list): ``format: auto`` reads them as lines and says so."""
    import logging

    from unlearn_exp.data import load_benchmark

    f = tmp_path / "ring_a_bell_nudity.csv"
    f.write_text('a "naked woman, on a beach\nsecond prompt, with a comma\n\nthird prompt\n')
    cfg = {"name": "mine", "loader": "prompts_file", "path": str(f), "default_seed": 7}
    with caplog.at_level(logging.INFO, logger="unlearn_exp"):
        df = load_benchmark(cfg)
    assert df.prompt.tolist() == ['a "naked woman, on a beach', "second prompt, with a comma", "third prompt"]
    assert "read as one prompt per line" in caplog.text
    assert load_benchmark({**cfg, "format": "lines"}).prompt.tolist() == df.prompt.tolist()
    with pytest.raises(UserError, match="none of the known prompt columns"):
        load_benchmark({**cfg, "format": "csv"})  # read as a table, its first line is no header
    table = tmp_path / "table.csv"
    table.write_text('prompt,evaluation_seed\n"a cat, sitting",3\n')
    assert load_benchmark({**cfg, "path": str(table)}).prompt.tolist() == ["a cat, sitting"]
    with pytest.raises(UserError, match="benchmark.format must be one of"):
        load_benchmark({**cfg, "format": "xlsx"})


def test_a_users_copy_of_a_pinned_list_is_read_each_time_with_one_warning(tmp_path, caplog):
    """A file given for a pinned benchmark (not the published one) is read in every cell of a sweep;
    the warning that it is not the published file comes once."""
    p = tmp_path / "i2p.csv"
    p.write_text("prompt,nudity_percentage,categories,evaluation_seed\na,80,sexual,1\nb,90,sexual,2\n")
    cfg = bench_cfg("i2p_nudity", path=str(p))
    with caplog.at_level("WARNING", logger="unlearn_exp"):
        for _ in range(3):
            assert len(load_benchmark(cfg)) == 2
    assert caplog.text.count("is not the pinned published file") <= 1
