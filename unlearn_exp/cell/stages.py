"""The stage dataclasses of one grid cell (``run.py`` runs the stages): what each stage hands the
next. A leaf module: it imports no stage, so the stages and the records annotate with it freely."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from unlearn_exp.store import ArtifactStore

if TYPE_CHECKING:  # annotations only
    from unlearn_exp.cell.concept_source import ImageSetRef
    from unlearn_exp.cell.samples import Chunk
    from unlearn_exp.guidance import Concept, Guidance
    from unlearn_exp.models import Components


@dataclass
class Cell:
    """What every stage reads: the config, the store, the loaded model and the prompt sets."""

    cfg: DictConfig
    store: ArtifactStore
    comps: Components
    model_id: str
    out_dir: Path
    bench: list[dict[str, Any]]
    bench_attrs: dict[str, Any]
    pp_sets: dict[str, list[dict[str, Any]]]  # "coco" (the PP prompts) and/or "bench"
    set_name: dict[str, str]
    spec: dict[str, Any]  # identity.cell_spec: what the report matches the cell on
    judge: Any  # the evaluation judge
    metric: Any  # the PP metric
    unlearned: bool = False  # a checkpoint has been applied to ``comps`` (stage 1)

    def loggers(self, stage: str):
        from unlearn_exp.tracking import lightning_logger

        return lightning_logger(self.cfg.logger, stage, save_dir=self.out_dir)


@dataclass
class Originals:
    """Stage 0: what the original model makes before it is unlearned (PP references, C*'s images)."""

    refs: dict[str, list[Chunk]]
    image_set: ImageSetRef | None


@dataclass
class Unlearned:
    """Stage 1: the checkpoint applied to ``cell.comps``."""

    checkpoint_id: str
    info: dict[str, Any]


@dataclass
class ConceptGuidance:
    """Stage 2: the concept embedding (words or ``C*``), the guidance built on it, and the identity
    of what is sampled."""

    concept: Concept
    guidance: Guidance
    identity: dict[str, Any]
    what: str


@dataclass
class Samples:
    """Stage 3: the image chunks per prompt set ("bench", and "coco" for PP)."""

    chunks: dict[str, list[Chunk]]


@dataclass
class Judged:
    """Stage 4: the judge's verdicts on the benchmark images and on the PP sets, and benign fidelity."""

    verdicts: list[dict[str, Any]]
    pp_verdicts: dict[str, list[dict[str, Any]]]
    benign_ok: dict[str, list[bool | None]]


@dataclass
class Scores:
    """Stage 5: DSR with its interval, PP per prompt set (and per image), benign accuracy."""

    stats: dict[str, Any]
    pp_values: dict[str, float]
    lpips_by_split: dict[str, list[float]]
    benign_acc: float
    n_benign: int
