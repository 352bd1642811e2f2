"""Image sets for concept inversion: folders and judge-filtered generated sets (docs/methods.md 6.3)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_exp.errors import UserError
from unlearn_exp.inversion.image_sets import generate_image_set, load_image_folder, read_image_folder
from unlearn_exp.models import build_tiny


class RedJudge:
    """Flags an image as unsafe when its mean red channel exceeds ``threshold`` (0..255)."""

    name = "red"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def judge(self, images):
        reds = [float(np.asarray(im.convert("RGB"))[..., 0].mean()) for im in images]
        return [{"safe": r <= self.threshold, "red": r} for r in reds]


def test_folder_of_mixed_sizes_and_modes_is_converted(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (20, 12), 128).save(tmp_path / "b.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 255)).save(tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("ignored")
    image_set = read_image_folder(tmp_path, 16)
    assert image_set.images.shape == (3, 3, 16, 16)
    assert image_set.files == ["a.png", "b.png", "c.png"]
    assert torch.allclose(image_set.images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert any("to RGB" in n and "'L': 1" in n and "'RGBA': 1" in n for n in image_set.notes)
    assert any("resized 1 image" in n and "20x12" in n for n in image_set.notes)
    assert read_image_folder(tmp_path, 16).identity == image_set.identity
    Image.new("RGB", (16, 16), (255, 0, 1)).save(tmp_path / "a.png")
    assert read_image_folder(tmp_path, 16).identity != image_set.identity
    assert load_image_folder(tmp_path, 8).shape == (3, 3, 8, 8)


def test_empty_missing_or_unreadable_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no images"):
        load_image_folder(tmp_path, 16)
    with pytest.raises(UserError, match="not found"):
        load_image_folder(tmp_path / "absent", 16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image .*bad.png"):
        load_image_folder(tmp_path, 16)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(resolution=16)


def test_generated_set_keeps_only_flagged_images(tiny, tmp_path):
    kwargs = {"steps": 2, "guidance_scale": 1.0}
    probe = generate_image_set(tiny, ["a dog"], [0], RedJudge(-1), tmp_path / "probe", 4, 4, kwargs)
    reds = sorted(e["judge"]["red"] for e in probe["images"])
    threshold = (reds[1] + reds[2]) / 2  # about half the images count as unsafe
    out = tmp_path / "set"
    manifest = generate_image_set(
        tiny, ["a dog", "a cat"], [0, 1], RedJudge(threshold), out, 2, 40, kwargs, batch_size=2
    )
    assert len(manifest["images"]) == 2
    assert all(not e["judge"]["safe"] and e["judge"]["red"] > threshold for e in manifest["images"])
    assert sorted(e["prompt"] for e in manifest["images"]) == ["a cat", "a dog"]  # quota per prompt
    assert json.loads((out / "manifest.json").read_text())["tries"] == manifest["tries"]
    assert load_image_folder(out, 16).shape == (2, 3, 16, 16)
    seeds = [e["seed"] for e in manifest["images"]]
    assert len(set(seeds)) == len(seeds)


def test_generated_set_fails_cleanly_when_too_few_are_flagged(tiny, tmp_path):
    out = tmp_path / "set"
    with pytest.raises(UserError, match="flagged prompt 'a dog' on 0 of 3 tries; it needs 2"):
        generate_image_set(tiny, ["a dog"], [0], RedJudge(255), out, 2, 3, {"steps": 2}, batch_size=2)
    assert not out.exists()
