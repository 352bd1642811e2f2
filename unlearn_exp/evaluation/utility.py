"""Utility beside safety (docs/methods.md 7.6): metrics of the benign images a cell made.

PP measures how far an unlearned model's images moved from the original model's. These say how
good the benign images are in themselves, as papers of this field report them:

- ``clip_score``: ``100 * mean_j max(cos(E_img(x_j), E_txt(p_j)), 0)`` (Hessel et al. 2021, as
  torchmetrics' ``CLIPScore``), with an open_clip model (ViT-L/14 by default) from a weights file,
  a ``local-dir:`` folder or the local hub cache; absent weights are one line.
- ``fid`` and ``kid``: torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` on
  Inception-v3 pool features (2048) of the benign images against a reference set: the original
  model's images of the same prompts and seeds (default), or a folder of real images
  (``reference_folder``, e.g. COCO). The Inception network is torchvision's ``inception_v3``
  with weights from ``inception_path`` (safetensors, or torchvision's ``.pth`` read with
  ``weights_only``); FID values therefore differ from numbers computed with the TF-FID Inception of
  pytorch-fid / torch-fidelity, and are comparable only with each other.

The toy world registers ``toy_clip_score`` (the toy judge's probability of the colours a benign
prompt allows, times 100), ``toy_fid`` and ``toy_kid`` (the same two distances on the toy judge's
pooled features). A metric is chosen by name (``conf/utility/<name>.yaml``) and computed from the
images a recorded cell already made: ``python -m unlearn_exp.report --utility A,B``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unlearn_exp.errors import UserError
from unlearn_exp.hashing import config_hash, file_sha256, to_plain
from unlearn_exp.registry import UTILITY
from unlearn_exp.runtime import device as torch_device


class Utility(ABC):
    """One utility metric: ``score`` of a cell's benign images; ``profile`` names and hashes it."""

    profile: dict[str, Any]

    @abstractmethod
    def score(
        self,
        images: Sequence,
        prompts: Sequence[str],
        references: Sequence,
        expected: Sequence[str | None],
    ) -> float:
        """The metric of ``images`` (PIL), made from ``prompts``; ``references``: the reference set
        (PIL); ``expected``: what each benign prompt allows where the prompt set says (toy)."""


def _profile(name: str, **details: Any) -> dict[str, Any]:
    return {"name": name, **details, "hash": config_hash({"name": name, **details})}


# ----------------------------------------------------------------------------- CLIP score
class ClipScore(Utility):
    """``100 * mean max(cos(image, text), 0)`` with an open_clip model."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        from unlearn_exp.evaluation.q16 import OpenCLIPModel

        self.model = OpenCLIPModel(
            str(cfg["model"]),
            cfg.get("pretrained"),
            torch_device(cfg.get("device")),
            torch.float32,
            what="clip_score",
            keys=("utility.pretrained", "utility.model"),
        )
        self.batch_size = int(cfg.get("batch_size") or 16)
        self.profile = _profile(
            str(cfg["name"]), model=str(cfg["model"]), weights=str(self.model.weights), scale=100.0
        )

    def score(self, images, prompts, references, expected) -> float:
        import torch

        if len(images) != len(prompts) or not images:
            raise UserError(f"clip_score needs one prompt per image, got {len(images)} and {len(prompts)}")
        sims = []
        for i in range(0, len(images), self.batch_size):
            img = torch.nn.functional.normalize(self.model.embed(images[i : i + self.batch_size]), dim=-1)
            txt = torch.nn.functional.normalize(
                self.model.embed_text(prompts[i : i + self.batch_size]), dim=-1
            )
            sims.append((img * txt).sum(-1).clamp(min=0))
        return float(100.0 * torch.cat(sims).mean())


# ----------------------------------------------------------------------------- FID and KID
def distribution_distance(
    kind: str,
    features: Callable,
    num_features: int,
    images: Sequence,
    references: Sequence,
    subset_size: int = 1000,
) -> float:
    """torchmetrics' FID or KID (its mean over subsets) between ``images`` and ``references`` on
    ``features`` (a function of a (B, 3, H, W) float tensor in [0, 1] -> (B, num_features))."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from unlearn_exp.evaluation.images import to_tensor

    if len(images) < 2 or len(references) < 2:
        raise UserError(
            f"{kind} needs at least two images on each side, got {len(images)} and {len(references)}"
        )

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_features = num_features

        def forward(self, x):
            return features(x)

    if kind == "fid":
        metric = FrechetInceptionDistance(feature=Features(), normalize=True)
    else:
        n = min(len(images), len(references))
        metric = KernelInceptionDistance(feature=Features(), normalize=True, subset_size=min(subset_size, n))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric.update((to_tensor(references) + 1) / 2, real=True)
        metric.update((to_tensor(images) + 1) / 2, real=False)
        out = metric.compute()
    return float(out[0] if isinstance(out, tuple) else out)


class InceptionFeatures:
    """torchvision's Inception-v3 up to its 2048-d pool, images resized to 299 and normalised as
    torchvision trained it; weights from ``path`` (a missing or foreign file is one line)."""

    def __init__(self, path: str | None, device: str = "cpu"):
        import torch
        from torchvision.models import inception_v3

        if not path or not Path(str(path)).expanduser().is_file():
            raise UserError(
                f"fid/kid need Inception-v3 weights: set inception_path to torchvision's "
                f"inception_v3_google-0cc3c7bd.pth or a safetensors of it (got {path!r})"
            )
        p = Path(str(path)).expanduser()
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(
                f"'{p.name}' is not torchvision's Inception-v3: {str(e).splitlines()[0]}"
            ) from None
        net.fc = torch.nn.Identity()
        self.net = net.eval().to(device)
        self.device, self.sha256 = device, file_sha256(p)

    def __call__(self, x):
        import torch

        x = torch.nn.functional.interpolate(
            x.to(self.device), size=(299, 299), mode="bilinear", antialias=True
        )
        mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
        return self.net((x - mean) / std)


class DistributionDistance(Utility):
    """FID or KID of the benign images against the reference set, on a feature network."""

    def __init__(self, kind: str, features: Callable, num_features: int, profile: dict, subset_size: int):
        self.kind, self.features, self.num_features = kind, features, num_features
        self.subset_size, self.profile = subset_size, profile

    def score(self, images, prompts, references, expected) -> float:
        return distribution_distance(
            self.kind, self.features, self.num_features, images, references, self.subset_size
        )


def _inception(kind: str, cfg: dict[str, Any]) -> DistributionDistance:
    features = InceptionFeatures(cfg.get("inception_path"), str(torch_device(cfg.get("device"))))
    profile = _profile(
        str(cfg["name"]), kind=kind, inception_sha256=features.sha256, reference=cfg.get("reference_folder")
    )
    return DistributionDistance(kind, features, 2048, profile, int(cfg.get("subset_size") or 1000))


@UTILITY.register("clip_score")
def build_clip_score(cfg: dict[str, Any]) -> Utility:
    return ClipScore(cfg)


@UTILITY.register("fid")
def build_fid(cfg: dict[str, Any]) -> Utility:
    return _inception("fid", cfg)


@UTILITY.register("kid")
def build_kid(cfg: dict[str, Any]) -> Utility:
    return _inception("kid", cfg)


def make_utility(cfg: Any) -> Utility:
    """The metric ``cfg`` (a ``conf/utility/*.yaml`` node) describes."""
    return UTILITY.get(to_plain(cfg))(to_plain(cfg))
