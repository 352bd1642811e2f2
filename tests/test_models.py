"""Model loading: offline CLIP tokenizer, the tiny model, the real loading path and its errors."""

from __future__ import annotations

import logging
import sys

import open_clip
import pytest
import torch

from tests.helpers import run_app
from unlearn_exp.config import preset
from unlearn_exp.errors import UserError
from unlearn_exp.models import load_model, save_components
from unlearn_exp.models.tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer
from unlearn_exp.sampling import sample

PROMPTS = [
    "a photo of a naked woman, realistic!",
    "Hello   World's 123 café",
    "violence, blood & gore -- 4k trending on artstation",
    "",
]


def test_tokenizer_ids_match_open_clip():
    tok = build_clip_tokenizer()
    ours = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.tokenize(PROMPTS).tolist()
    for a, b in zip(ours, theirs):
        n = b.index(EOS_ID) + 1
        assert a[:n] == b[:n]
        assert all(t == EOS_ID for t in a[n:])  # SD pads with EOS, open_clip with 0
    assert ours[0][0] == BOS_ID and tok.model_max_length == 77


def test_tokenizer_is_fresh_per_call():
    a, b = build_clip_tokenizer(), build_clip_tokenizer()
    a.add_tokens(["<c*>"])
    assert len(a) == len(b) + 1


def test_tiny_uses_sd_classes(tiny):
    assert type(tiny.unet).__name__ == "UNet2DConditionModel"
    assert type(tiny.text_encoder).__name__ == "CLIPTextModel"
    assert type(tiny.vae).__name__ == "AutoencoderKL"
    assert tiny.latent_shape() == (4, 16, 16)


def test_pooled_is_taken_at_first_eos_even_with_added_tokens(tiny):
    ids = tiny.tokenize(["a cat"]).input_ids
    hidden, pooled = tiny.encode_ids(ids)
    assert torch.equal(pooled[0], hidden[0, 3])  # BOS, a, cat, EOS


def test_save_load_round_trip_gives_identical_images(tiny, tmp_path):
    save_components(tiny, tmp_path / "sd")
    cfg = preset("model", "sd14", path=str(tmp_path / "sd"), resolution=32)
    loaded = load_model(cfg)
    a = sample(tiny, ["a red square", "a dog"], [1, 2], steps=4)
    b = sample(loaded, ["a red square", "a dog"], [1, 2], steps=4)
    assert torch.equal(a.images, b.images)


def test_missing_folder_names_the_path(tmp_path):
    cfg = preset("model", "sd14", path=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="nope"):
        load_model(cfg)


def test_missing_hub_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = preset("model", "sd14", path="CompVis/stable-diffusion-v1-4")
    with pytest.raises(UserError) as e:
        load_model(cfg)
    msg = str(e.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and "model.path" in msg and "\n" not in msg


@pytest.mark.slow
def test_cli_missing_weights_is_one_line(tmp_path):
    proc = run_app("model=sd14", f"model.path={tmp_path}/absent", "hydra/job_logging=disabled")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "model weights (sd14) not found" in lines[-1]
    assert "absent" in lines[-1] and "LPIPS AlexNet trunk" in lines[-1]  # every missing file at once
    assert "Traceback" not in proc.stderr


def test_auto_device_is_the_cpu_without_asking_torch_where_no_gpu_can_be(monkeypatch):
    from unlearn_exp import identity

    monkeypatch.setattr(identity, "_GPU_DEVICE_FILES", ("/nonexistent/nvidiactl",))
    if sys.platform.startswith("linux"):
        assert identity._no_gpu_possible() and identity.resolved_device({"device": "auto"}) == "cpu"
    monkeypatch.setattr(identity, "_GPU_DEVICE_FILES", ("/",))  # a device file is here: torch decides
    if sys.platform.startswith("linux"):
        assert not identity._no_gpu_possible()
        assert identity.resolved_device({"device": "auto"}) == (
            "cuda" if torch.cuda.is_available() else "cpu"
        )
    assert identity.resolved_device({"device": "cpu"}) == "cpu"


FP32_WARNING = "should be kept in float32"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_toy_cell_sampling_path_logs_no_float32_warning(capfd):
    """Loading the toy model, casting it and sampling through ``predict_rows`` (whose end moves the
    model back to its device, where each cell used to log diffusers' "should be kept in float32"
    warning twice) log nothing of it; a model that does list modules to keep in float32 still warns."""
    from unlearn_exp.sampling import predict_rows
    from unlearn_exp.toy.artifacts import compose as toy_compose

    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")  # diffusers' own handler: stderr, no propagation
    diffusers_logger.addHandler(records)
    try:
        comps = load_model(toy_compose(["+experiment=toy_duo"]).model)
        comps.to(dtype=torch.float16).to(dtype=torch.float32)
        comps.to(device="cpu")
        rows = [{"case_id": "0", "prompt": "a red circle", "seed": 0, "image_index": 0}]
        out = predict_rows(comps, None, rows, batch_size=1, progress=False, steps=1)
        assert len(out) == 1 and out[0]["image_tensor"].shape == (3, 16, 16)
        assert not [m for m in records.messages if FP32_WARNING in m]
        assert FP32_WARNING not in capfd.readouterr().err
        comps.unet._keep_in_fp32_modules = ["conv_in"]  # the filter drops only the empty-list warning
        comps.unet.to(dtype=torch.float32)
        assert [m for m in records.messages if FP32_WARNING in m and "['conv_in']" in m]
    finally:
        diffusers_logger.removeHandler(records)
