"""The toy world and its two models (docs/toy.md): the UNet (``model=toy``, the SD v1 family) and the
MMDiT (``model=toy_mmdit``, the SD3 family), each with its grid experiment, its shipped training
artifacts and its reports folder. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from unlearn_exp.errors import UserError


@dataclass(frozen=True)
class ToyModel:
    experiment: str  # the paper's grid on it (conf/experiment/)
    artifacts: str  # its shipped DUO checkpoints and C*, under unlearn_exp/toy/
    scale: str  # its reports folder and table scale (reports/<scale>/)
    denoiser: str  # what the demo's last line counts rows of
    methods: str  # its methods grid (conf/experiment/; python -m unlearn_exp.demo --methods)


TOY_MODELS = {
    "toy": ToyModel("toy_duo", "artifacts", "toy", "UNet", "toy_methods"),
    "toy_mmdit": ToyModel(
        "toy_mmdit_duo", "artifacts_mmdit", "toy_mmdit", "transformer", "toy_mmdit_methods"
    ),
}


def toy_model(name: str) -> ToyModel:
    if name not in TOY_MODELS:
        raise UserError(f"unknown toy model '{name}': choose one of {sorted(TOY_MODELS)}")
    return TOY_MODELS[name]
