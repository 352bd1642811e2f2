"""The settings of each judge (``conf/judge/*.yaml``, docs/methods.md 7): one typed dataclass per judge
type, its group's schema and the object the judge receives (``unlearn_exp/settings.py``). A judge
profile (``judge``, ``task.duo_filter``, ``task.inversion_filter``) is one of these. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from unlearn_exp.checks import Checks
from unlearn_exp.settings import Settings, choice, declare, listed, number, probability


class Q16Backend(StrEnum):
    """Which library loads Q16's CLIP ViT-L/14."""

    transformers = "transformers"
    open_clip = "open_clip"


@dataclass
class NudeNetJudgeConfig(Settings):
    """``conf/judge/nudenet_*.yaml`` (docs/methods.md 7.2): unsafe iff a detection of a counted class
    scores above ``threshold``."""

    GROUP = "judge"
    name: str = MISSING
    type: str = MISSING
    model_path: Any = MISSING  # null: the detector in the nudenet wheel
    model_sha256: Any = MISSING
    classes: list[str] = listed()
    threshold: Any = probability()
    batch_size: int = number(int, lo=1)
    num_threads: Any = number(int, lo=1, optional=True)  # null: min(4, cpu count)


@dataclass
class NudeNetClassifierJudgeConfig(Settings):
    """``conf/judge/nudenet_classifier.yaml`` (docs/methods.md 7.2): NudeNet v2's image classifier, as
    SAFREE judges nudity; unsafe iff P(unsafe) >= ``threshold``."""

    GROUP = "judge"
    name: str = MISSING
    type: str = MISSING
    model_path: Any = MISSING  # classifier_model.onnx; not in the nudenet wheel, so it must be given
    model_sha256: Any = MISSING  # checked when set; the file's sha256 is always in the profile
    threshold: Any = probability()
    image_size: int = number(int, lo=1)
    batch_size: int = number(int, lo=1)
    num_threads: Any = number(int, lo=1, optional=True)  # null: min(4, cpu count)

    def rules(self, c: Checks) -> None:
        if not self.model_path:
            c.fail(
                f"{self.GROUP}.model_path: the NudeNet v2 classifier (classifier_model.onnx) is not in the "
                "nudenet wheel; give its file (judge.model_path=FILE or UNLEARN_EXP_NUDENET_CLASSIFIER=FILE)"
            )


@dataclass
class Q16JudgeConfig(Settings):
    """``conf/judge/q16.yaml`` (docs/methods.md 7.3): argmax of Q16's two prompts, or p >= threshold."""

    GROUP = "judge"
    name: str = MISSING
    type: str = MISSING
    backend: Q16Backend = MISSING
    clip_path: Any = MISSING
    open_clip_model: Any = MISSING
    open_clip_pretrained: Any = MISSING
    model_sha256: Any = MISSING
    prompts_path: Any = MISSING
    prompts_url: Any = MISSING
    prompts_sha256: Any = MISSING
    prompts_git_blob: Any = MISSING
    cache_dir: Any = MISSING
    threshold: Any = probability(optional=True)  # null: argmax
    batch_size: int = number(int, lo=1)
    device: str = MISSING
    dtype: str = choice("float32", "float16")


declare("judge", "nudenet", NudeNetJudgeConfig, "unlearn_exp.evaluation.nudenet")
declare(
    "judge", "nudenet_classifier", NudeNetClassifierJudgeConfig, "unlearn_exp.evaluation.nudenet_classifier"
)
declare("judge", "q16", Q16JudgeConfig, "unlearn_exp.evaluation.q16")
