"""Judges with versioned profiles (docs/methods.md 7.2, 7.3) and the registry ``make_judge`` reads.

A *profile* fixes everything that decides a verdict: the model file and its sha256, the classes
counted, the threshold and the decision rule. Its ``name`` and ``hash`` (``config_hash`` of the
profile without the hash itself) go into every result row, so two numbers are comparable only when
their judge hashes are equal.

``Judge.judge(images)`` takes PIL images (RGB; file paths and RGB uint8 arrays are accepted and
decoded the same way) and returns one dict per image: ``safe`` (bool), ``score`` (float, the
unsafe score the rule compares) and ``raw`` (a JSON-able summary of the model's output).

Judge types are registered by name in ``registry.JUDGES`` (each judge's own module registers it);
a config selects one with ``type`` (default: its ``name``) or ``_target_``::

    register_judge("toy", make_toy_judge)      # unlearn_exp/toy/plugin.py
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from unlearn_exp.evaluation.images import ImageLike, load_rgb_all
from unlearn_exp.hashing import config_hash, to_plain
from unlearn_exp.registry import JUDGES

PROFILE_KEYS = ("name", "model_file", "model_sha256", "classes", "threshold", "rule")


def make_profile(
    name: str,
    *,
    model_file: str,
    model_sha256: str,
    classes: Sequence[str],
    threshold: float | None,
    rule: str,
    **extra: Any,
) -> dict:
    """The profile dict with its ``hash``. ``extra`` (versions, input convention, ...) is hashed too.

    The model file's *path* is recorded but not hashed: the same weights at another place are the same judge.
    """
    profile = {
        "name": str(name),
        "model_file": str(model_file),
        "model_sha256": str(model_sha256),
        "classes": [str(c) for c in classes],
        "threshold": None if threshold is None else float(threshold),
        "rule": str(rule),
        **extra,
    }
    hashed = {k: v for k, v in profile.items() if k != "model_file"}
    profile["hash"] = config_hash(hashed)
    return profile


class Judge(ABC):
    """A safety judge; subclasses set ``self.profile`` and implement ``judge_pil``."""

    profile: dict

    @property
    def name(self) -> str:
        return self.profile["name"]

    @property
    def hash(self) -> str:
        return self.profile["hash"]

    def judge(self, images: Sequence[ImageLike]) -> list[dict]:
        """One ``{"safe", "score", "raw"}`` per image, in order."""
        pil = load_rgb_all(images)
        if not pil:
            return []
        out = self.judge_pil(pil)
        if len(out) != len(pil):  # pragma: no cover - a broken subclass
            raise RuntimeError(f"judge {self.name} returned {len(out)} verdicts for {len(pil)} images")
        return out

    @abstractmethod
    def judge_pil(self, images: list) -> list[dict]: ...

    def fidelity(self, verdicts: Sequence[dict], rows: Sequence[dict]) -> list[bool] | None:
        """Whether each image shows what its benign prompt asked for (benign accuracy, docs/design.md 2),
        from the judge's verdicts and the prompt rows' ``expected`` labels; ``None`` where this judge
        cannot tell (NudeNet and Q16 see only the harmful concept)."""
        return None


JudgeFactory = Callable[[Any], Judge]


def register_judge(kind: str, factory: JudgeFactory) -> None:
    """Make ``judge.type: <kind>`` (or a profile named ``<kind>``) build its judge with ``factory(cfg)``."""
    JUDGES.register(kind, factory)


def registered_judges() -> list[str]:
    return JUDGES.names()


def _plain(cfg: Any) -> dict:
    return dict(to_plain(cfg))


def make_judge(cfg: Any, *, cache: bool = True) -> Judge:
    """Build the judge ``cfg`` (a ``conf/judge/*.yaml`` node) describes; one instance per config per
    process."""
    return JUDGES.build(_plain(cfg), cache=cache)
