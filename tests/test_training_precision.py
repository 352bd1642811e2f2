"""The dtypes of the training stages on a half-precision model (docs/methods.md 13), on the CPU with the
tiny model: DUO encodes its pairs with a float32 VAE outside mixed precision (DUO's script), concept
inversion runs a float32 text encoder, and so float32 learned rows, beside the half-precision UNet and
VAE (CCE / diffusers' textual-inversion example); each module is back in its dtype afterwards."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from unlearn_exp.config import preset
from unlearn_exp.inversion.concept_inversion import invert
from unlearn_exp.inversion.textual_inversion import read_textual_inversion, token_ids
from unlearn_exp.models import build_tiny
from unlearn_exp.unlearning.duo import train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

# (model dtype, Lightning precision): bf16 weights under CPU autocast, as 16-mixed runs on a GPU; and
# float16 weights without autocast (CPU autocast has no float16 here)
HALF = [(torch.bfloat16, "bf16-mixed"), (torch.float16, "32-true")]


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _half_tiny(dtype: torch.dtype):
    comps = build_tiny(resolution=16)
    comps.to(dtype=dtype)
    return comps


@pytest.mark.parametrize(("dtype", "precision"), HALF)
def test_duo_encodes_its_pairs_with_a_float32_vae_and_trains_the_half_unet(tmp_path, dtype, precision):
    comps = _half_tiny(dtype)
    seen: dict[str, list] = {"vae": [], "unet": []}
    hooks = [
        comps.vae.encoder.conv_in.register_forward_hook(
            lambda m, args, out: seen["vae"].append((m.weight.dtype, args[0].dtype, out.dtype))
        ),
        comps.unet.conv_in.register_forward_hook(lambda m, args, out: seen["unet"].append(m.weight.dtype)),
    ]
    g = torch.Generator().manual_seed(0)
    unsafe = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.5
    safe = -torch.rand(2, 3, 16, 16, generator=g) * 0.5 - 0.5
    hp = preset(
        "checkpoint", "duo", steps=2, batch=2, rank=4, alpha=4, lr_override=1e-3, precision=precision, seed=3
    )
    try:
        info = train_adapter(comps, (unsafe, safe), hp, adapter_name="duo_t", work_dir=tmp_path / "w")
    finally:
        for h in hooks:
            h.remove()
    assert info["steps"] == 2
    # every pair encoding: float32 weights, float32 pixels, float32 output (no autocast inside)
    assert len(seen["vae"]) == 2 and set(seen["vae"]) == {(torch.float32,) * 3}
    assert seen["unet"] and set(seen["unet"]) == {dtype}  # policy and reference UNet in the half dtype
    # after training every module is back in the model's dtype (sampling keeps its precision)
    assert {name: _dtype(m) for name, m in comps.modules().items()} == dict.fromkeys(comps.modules(), dtype)


class _Dtypes(L.Callback):
    """The dtypes of the model's parts at each training step."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(
            {
                "text_encoder": {
                    p.dtype for n, p in pl_module.text_encoder.named_parameters() if not n.endswith("learned")
                },
                "token_table": pl_module.embedding.base.weight.dtype,
                "learned": pl_module.embedding.learned.dtype,
                "unet": _dtype(pl_module.unet),
                "vae": _dtype(pl_module.vae),
            }
        )


@pytest.mark.parametrize(("dtype", "precision"), HALF)
def test_inversion_runs_a_float32_text_encoder_beside_the_half_unet_and_vae(tmp_path, dtype, precision):
    comps = _half_tiny(dtype)
    cfg = preset("inversion", "default", init_word="dog", steps=2, lr=5e-2, eval_draws=1, precision=precision)
    seen = _Dtypes()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    out = invert(comps, images, cfg, tmp_path / "out", progress=False, callbacks=[seen])
    f32 = torch.float32
    expected = {"text_encoder": {f32}, "token_table": f32, "learned": f32, "unet": dtype, "vae": dtype}
    assert len(seen.steps) == 2 and all(step == expected for step in seen.steps)
    assert out["eval_loss_init"] is not None and out["eval_loss_final"] is not None
    # afterwards the text encoder is back in the half dtype, holding the learned row (rounded to it)
    assert {name: _dtype(m) for name, m in comps.modules().items()} == dict.fromkeys(comps.modules(), dtype)
    _, rows, _ = read_textual_inversion(out["embeds_path"])
    assert rows.dtype == f32
    table = comps.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[token_ids(comps, out["tokens"])], rows.to(dtype))
