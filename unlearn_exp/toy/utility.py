"""The toy world's analogues of the utility metrics (``evaluation/utility.py``): a CLIP score from the
toy judge's colour probabilities, and FID / KID on the toy judge's pooled features."""

from __future__ import annotations

from typing import Any

import torch

from unlearn_exp.errors import UserError
from unlearn_exp.evaluation.utility import DistributionDistance, Utility
from unlearn_exp.hashing import config_hash
from unlearn_exp.toy.judge import COLOUR_CLASSES, ToyJudge


def _judge(cfg: dict[str, Any]) -> ToyJudge:
    return ToyJudge({"model_path": cfg.get("model_path"), "model_sha256": None})


def _profile(name: str, judge: ToyJudge, **details: Any) -> dict[str, Any]:
    details = {"name": name, "judge_sha256": judge.profile["model_sha256"], **details}
    return {**details, "hash": config_hash(details)}


class ToyClipScore(Utility):
    """``100 * mean_j P(colour in expected_j | x_j)``: how well a benign image shows what its prompt
    allows, by the toy judge (the toy's text-image agreement)."""

    def __init__(self, cfg: dict[str, Any]):
        self.judge = _judge(cfg)
        self.profile = _profile(str(cfg.get("name", "toy_clip_score")), self.judge, scale=100.0)

    def score(self, images, prompts, references, expected) -> float:
        if not images or any(not isinstance(e, str) or not e for e in expected):
            raise UserError(
                "toy_clip_score needs prompts that name the colours they allow (the toy's benign set)"
            )
        colours, _ = self.judge.probabilities(list(images))
        index = {c: i for i, c in enumerate(COLOUR_CLASSES)}
        allowed = [[index[c] for c in e.split(",") if c in index] for e in expected]
        return float(100.0 * torch.stack([colours[j, a].sum() for j, a in enumerate(allowed)]).mean())


def _pooled(judge: ToyJudge):
    """The toy judge's pooled features (mean and max of its last block) of images in [0, 1], unit
    normalised (as the PP distance's features), so that FID and KID read on one scale."""

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        h = judge.net.features(judge.to_input(x * 2 - 1))[-1]
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return torch.nn.functional.normalize(pooled, dim=1)

    return features


def toy_distance(kind: str, cfg: dict[str, Any]) -> DistributionDistance:
    judge = _judge(cfg)
    width = judge.net.colour_head.in_features
    name = str(cfg.get("name", f"toy_{kind}"))
    profile = _profile(name, judge, kind=kind, reference=cfg.get("reference_folder"))
    return DistributionDistance(kind, _pooled(judge), width, profile, int(cfg.get("subset_size") or 1000))
