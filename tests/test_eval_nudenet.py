"""NudeNet judge: colour-order convention, profiles, batching and bad input (docs/methods.md 7.2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.evaluation import make_judge
from unlearn_exp.evaluation.nudenet import DUO_CLASSES, NINE_EXPOSED_CLASSES, detector_labels

CONF = Path(__file__).resolve().parents[1] / "conf" / "judge"
skimage_data = pytest.importorskip("skimage.data")


def profile_cfg(profile: str, **over):
    return preset("judge", profile, num_threads=1, **over)


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    rgb = skimage_data.astronaut()  # a real photograph shipped in scikit-image's wheel
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(rgb).save(path)
    return rgb, path


def test_path_pil_and_rgb_array_agree_and_follow_duo(astronaut):
    from nudenet import NudeDetector

    rgb, path = astronaut
    judge = make_judge(profile_cfg("nudenet_duo"))
    by_path, by_pil, by_array = judge.judge([path, Image.fromarray(rgb), rgb])
    assert by_path["raw"] == by_pil["raw"] == by_array["raw"]
    classes = [d["class"] for d in by_path["raw"]["detections"]]
    assert "FACE_FEMALE" in classes
    assert by_path["safe"] is True and by_path["score"] == 0.0  # a face is not counted
    # the trap: upstream reads a path as BGR, an ndarray as given; we match DUO's np.array(pil) call
    upstream = NudeDetector()
    duo = upstream.detect(np.array(Image.open(path).convert("RGB")))
    assert [d["class"] for d in duo] == classes
    assert [round(d["score"], 6) for d in duo] == [d["score"] for d in by_path["raw"]["detections"]]
    via_path = upstream.detect(str(path))
    assert via_path == upstream.detect(np.ascontiguousarray(rgb[..., ::-1]))
    assert via_path[0]["score"] != pytest.approx(duo[0]["score"], abs=1e-4)


def test_synthetic_images_are_safe_and_batched(astronaut):
    rng = np.random.default_rng(0)
    imgs = [
        Image.new("RGB", (64, 48), (128, 128, 128)),
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), np.uint8)),
    ]
    imgs += [Image.fromarray(astronaut[0])] * 3  # more than one batch of 4
    judge = make_judge(profile_cfg("nudenet_9cls_045", batch_size=4))
    out = judge.judge(imgs)
    assert len(out) == 5 and out[0]["safe"] and out[0]["raw"]["detections"] == []
    assert out[2]["raw"] == out[4]["raw"]
    json.dumps(out)  # raw is JSON-able


def test_profile_switching_changes_counted_classes(astronaut):
    duo = make_judge(profile_cfg("nudenet_duo"))
    nine45 = make_judge(profile_cfg("nudenet_9cls_045"))
    nine6 = make_judge(profile_cfg("nudenet_9cls_06"))
    assert set(duo.profile["classes"]) == set(DUO_CLASSES)
    assert set(nine45.profile["classes"]) == set(NINE_EXPOSED_CLASSES)
    assert len({duo.hash, nine45.hash, nine6.hash}) == 3
    belly = [{"class": "BELLY_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]}]
    breast = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]}]
    assert [j.verdict(belly)["safe"] for j in (duo, nine45, nine6)] == [True, False, True]
    assert [j.verdict(breast)["safe"] for j in (duo, nine45, nine6)] == [False, True, True]
    # on the real photograph: a profile that counts faces finds it unsafe
    faces = make_judge(profile_cfg("nudenet_duo", name="faces", classes=["FACE_FEMALE"]))
    verdict = faces.judge([astronaut[1]])[0]
    assert not verdict["safe"] and verdict["score"] > 0.5
    assert faces.hash != duo.hash and faces.profile["model_sha256"] == duo.profile["model_sha256"]


def test_nine_classes_match_the_reference_list():
    root = os.environ.get("UNLEARN_EXP_SHARED_DATASETS")
    if not root:
        pytest.skip("UNLEARN_EXP_SHARED_DATASETS is unset: the NudeNet class reference is not available")
    ref = json.loads((Path(root) / "nudenet_classes" / "nudenet_classes.json").read_text())
    assert detector_labels() == ref["nudenet_v3_detector_labels"]["labels_in_model_output_order"]
    assert set(NINE_EXPOSED_CLASSES) == set(ref["unsafe_subsets"]["v3_nine_exposed_classes"]["labels"])


def test_bad_model_file_and_bad_images(tmp_path):
    with pytest.raises(UserError, match="not found"):
        make_judge(profile_cfg("nudenet_duo", model_path=str(tmp_path / "absent.onnx")), cache=False)
    corrupt = tmp_path / "320n.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="corrupt or a different model"):
        make_judge(profile_cfg("nudenet_duo", model_path=str(corrupt)), cache=False)
    with pytest.raises(UserError, match="cannot load model") as err:
        make_judge(profile_cfg("nudenet_duo", model_path=str(corrupt), model_sha256=None), cache=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown NudeNet classes"):
        make_judge(profile_cfg("nudenet_duo", classes=["EXPOSED_BREAST_F"]), cache=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    judge = make_judge(profile_cfg("nudenet_duo"))
    with pytest.raises(UserError, match="cannot decode image"):
        judge.judge([broken])
