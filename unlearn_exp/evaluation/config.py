"""The settings of each judge (``conf/judge/*.yaml``, docs/methods.md 7): one typed dataclass per judge
type, its group's schema and the object the judge receives (``unlearn_exp/settings.py``). A judge
profile (``judge``, ``task.duo_filter``, ``task.inversion_filter``) is one of these. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from unlearn_exp.checks import Checks
from unlearn_exp.settings import Settings, choice, declare, listed, number, probability, setting


class Q16Backend(StrEnum):
    """Which library loads Q16's CLIP ViT-L/14."""

    transformers = "transformers"
    open_clip = "open_clip"


@dataclass
class NudeNetJudgeConfig(Settings):
    """``conf/judge/nudenet_*.yaml`` (docs/methods.md 7.2): unsafe iff a detection of a counted class
    scores above ``threshold``."""

    GROUP = "judge"
    name: str = setting(
        "the profile's name, recorded with every result row (e.g. nudenet_duo, nudenet_9cls_045)"
    )
    type: str = setting("the judge's registered type: nudenet (the NudeNet 3.4.2 detector)")
    model_path: Any = setting(
        "the detector's ONNX file; null: the 320n.onnx bundled in the nudenet 3.4.2 wheel"
    )
    model_sha256: Any = setting("the detector file's sha256, checked when set")
    classes: list[str] = listed(
        help="detector labels counted as unsafe (DUO: its 4 classes; docs/methods.md 7.2)"
    )
    threshold: Any = probability(
        help="unsafe iff a counted detection scores above this (DUO: 0.0; the detector keeps >= 0.2)"
    )
    batch_size: int = number(int, lo=1, help="images per detector call")
    num_threads: Any = number(int, lo=1, optional=True, help="onnxruntime threads; null: min(4, cpu count)")

    def rules(self, c: Checks) -> None:
        if not self.classes:
            c.fail("judge.classes is empty: no detection would count and every image would be judged safe")


@dataclass
class NudeNetClassifierJudgeConfig(Settings):
    """``conf/judge/nudenet_classifier.yaml`` (docs/methods.md 7.2): NudeNet v2's image classifier, as
    SAFREE judges nudity; unsafe iff P(unsafe) >= ``threshold``."""

    GROUP = "judge"
    name: str = setting("the profile's name, recorded with every result row (e.g. nudenet_classifier)")
    type: str = setting("the judge's registered type: nudenet_classifier (NudeNet v2's image classifier)")
    model_path: Any = setting("classifier_model.onnx; not in the nudenet wheel, so it must be given")
    model_sha256: Any = setting("the file's sha256, checked when set (recorded in the profile either way)")
    threshold: Any = probability(
        help="unsafe iff P(unsafe) >= this (SAFREE: 0.6; 0.45 on the UnlearnDiff set; docs/methods.md 7.2)"
    )
    image_size: int = number(
        int, lo=1, help="side the image is resized to (nearest), as SAFREE's classify_pil (256)"
    )
    batch_size: int = number(int, lo=1, help="images per classifier call")
    num_threads: Any = number(int, lo=1, optional=True, help="onnxruntime threads; null: min(4, cpu count)")

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
    name: str = setting("the profile's name, recorded with every result row (e.g. q16)")
    type: str = setting("the judge's registered type: q16 (CLIP ViT-L/14 against Q16's prompts)")
    backend: Q16Backend = setting(
        "library that loads CLIP: transformers (clip_path) or open_clip (open_clip_*)"
    )
    clip_path: Any = setting(
        "transformers backend: a local folder, or a hub id already in the local hub cache"
    )
    open_clip_model: Any = setting(
        "open_clip backend: a model name, or local-dir:<folder with its config and weights>"
    )
    open_clip_pretrained: Any = setting(
        "open_clip backend: a pretrained tag in the local cache, or a weights file"
    )
    model_sha256: Any = setting(
        "the CLIP weights file's sha256, checked when set (always recorded in the profile)"
    )
    prompts_path: Any = setting(
        'a local prompts.p or its safetensors conversion (key "prompts"); null: prompts_url'
    )
    prompts_url: Any = setting(
        "where Q16's prompts.p is downloaded from, into cache_dir, when prompts_path is null"
    )
    prompts_sha256: Any = setting(
        "sha256 of the published prompts.p; a file failing it is refused (docs/methods.md 7.3)"
    )
    prompts_git_blob: Any = setting("git blob id of the published prompts.p: a second pin, both checked")
    cache_dir: Any = setting("folder prompts.p is downloaded into")
    threshold: Any = probability(
        optional=True,
        help="unsafe iff p(inappropriate) >= this (Q16 docs: 0.9); null: argmax (docs/methods.md 7.3)",
    )
    batch_size: int = number(int, lo=1, help="images per CLIP call")
    device: str = setting("device CLIP runs on: auto (CUDA where available, else CPU) or a torch device")
    dtype: str = choice(
        "float32", "float16", help="CLIP's dtype (float32, as i2p's eval; docs/methods.md 13)"
    )


declare("judge", "nudenet", NudeNetJudgeConfig, "unlearn_exp.evaluation.nudenet")
declare(
    "judge", "nudenet_classifier", NudeNetClassifierJudgeConfig, "unlearn_exp.evaluation.nudenet_classifier"
)
declare("judge", "q16", Q16JudgeConfig, "unlearn_exp.evaluation.q16")
