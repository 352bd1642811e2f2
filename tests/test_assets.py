"""The preflight of external files (``python -m unlearn_exp.assets``): every file a sweep needs named
at once, with its key, where it was looked for and where to get it; validation refuses the absent
ones together, before any work; ``--download`` fetches what has a public source, pinned."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers import compose
from unlearn_exp import assets
from unlearn_exp.errors import UserError


@pytest.fixture
def offline_homes(tmp_path, monkeypatch):
    """Empty hub and torch caches: nothing is found unless a test puts it there."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _sd_folder(root: Path) -> Path:
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _by_key(found):
    return {a.key: a for a in found}


def test_every_file_of_the_nudity_sweep_is_listed_with_its_key_and_source(offline_homes):
    over = [
        "+experiment=nudity_duo",
        f"model.path={offline_homes / 'sd14'}",
        f"paths.root_dir={offline_homes}",
    ]
    found = _by_key(assets.sweep_assets(over))
    assert set(found) == {
        "model.path",
        "benchmark.path",
        "pp.prompts.path",
        "pp.metric.trunk_path",
        "pp.metric.lin_path",
    }
    model, trunk, coco = found["model.path"], found["pp.metric.trunk_path"], found["pp.prompts.path"]
    assert not model.present and str(offline_homes / "sd14") in model.where
    assert not trunk.present and trunk.where.startswith(str(offline_homes / "torch" / "hub" / "checkpoints"))
    assert trunk.fetch == ("url", assets.ALEXNET_URL, assets.ALEXNET_SHA256, None, trunk.where)
    assert coco.on_demand and "coco_30k.csv" in coco.source and coco.key == "pp.prompts.path"
    assert found["pp.metric.lin_path"].present  # the lpips wheel ships the linear heads
    text = assets.render(list(found.values()))
    assert "[MISSING] model weights (sd14)" in text and "key: pp.metric.trunk_path" in text

    _sd_folder(offline_homes / "sd14")
    (offline_homes / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (offline_homes / "torch" / "hub" / "checkpoints" / assets.ALEXNET_FILE).write_bytes(b"x")
    found = _by_key(assets.sweep_assets(over))
    assert found["model.path"].present and found["pp.metric.trunk_path"].present


def test_violence_names_q16s_files_and_the_hub_model(offline_homes):
    over = ["+experiment=violence_duo", "+debug=default", f"paths.root_dir={offline_homes}"]
    found = _by_key(assets.sweep_assets(over))
    assert found["model.path"].fetch == ("hub", "CompVis/stable-diffusion-v1-4")
    assert not found["judge.clip_path"].present
    assert found["judge.clip_path"].source == "hf download openai/clip-vit-large-patch14"
    assert found["judge.prompts_path"].on_demand  # the pinned prompts.p is fetched on first use


def test_a_cell_names_every_missing_file_at_once_before_any_work(offline_homes, monkeypatch):
    from unlearn_exp.cell import run_cell

    monkeypatch.setattr("unlearn_exp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = compose(
        [
            "+experiment=nudity_duo",
            f"model.path={offline_homes / 'absent'}",
            f"paths.root_dir={offline_homes}",
        ],
        hydra=False,
    )
    with pytest.raises(UserError) as err:
        run_cell(cfg)
    msg = str(err.value)
    assert msg.startswith("2 file(s) this run needs are missing") and "\n" not in msg
    assert "model weights (sd14) not found (model.path" in msg and "LPIPS AlexNet trunk" in msg
    assert "python -m unlearn_exp.assets" in msg
    assert not (offline_homes / "results").exists() and not (offline_homes / "outputs").exists()


def test_download_fetches_public_files_pinned(offline_homes):
    src = offline_homes / "published.csv"
    src.write_text("prompt,seed\na cat,1\n")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = offline_homes / "data" / "x.csv"
    pinned = assets.Asset(
        "list", "benchmark.path", str(dest), False, "url", ("url", src.as_uri(), sha, None, str(dest))
    )
    assert assets.download([pinned]) == [f"benchmark.path: {dest}"] and dest.read_bytes() == src.read_bytes()
    wrong = assets.Asset(
        "l",
        "k",
        str(offline_homes / "y.csv"),
        False,
        "u",
        ("url", src.as_uri(), "0" * 64, None, str(offline_homes / "y.csv")),
    )
    with pytest.raises(UserError, match="sha256 mismatch"):
        assets.download([wrong])
    assert not (offline_homes / "y.csv").exists()
    calls = []
    fake = {"url": lambda *a: calls.append(a) or a[-1], "hub": lambda repo: calls.append(repo) or repo}
    found = assets.sweep_assets(
        ["+experiment=nudity_duo", "+debug=default", f"paths.root_dir={offline_homes}"]
    )
    assets.download(found, fake)
    assert "CompVis/stable-diffusion-v1-4" in calls
    assert any(
        c[0] == assets.ALEXNET_URL and c[1] == assets.ALEXNET_SHA256 for c in calls if isinstance(c, tuple)
    )


def test_the_command_lists_and_exits_1_while_files_are_missing(offline_homes, capsys):
    rc = assets.main(["+experiment=nudity_duo", "+debug=default", f"paths.root_dir={offline_homes}"])
    out = capsys.readouterr().out
    assert rc == 1 and "[MISSING] LPIPS AlexNet trunk" in out and "5 file(s)" in out
    assert assets.main(["+experiment=toy_duo", "+debug=default"]) == 0  # the toy needs nothing from outside
