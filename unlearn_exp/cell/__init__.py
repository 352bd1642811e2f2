"""One grid cell: ``run.py`` tells the story (the orchestrator, then the stages in order, handing
each other the dataclasses of ``stages``); ``keys``, ``inputs``, ``samples``, ``concept_source`` and
``records`` hold what the stages use. The names below are the package's public face."""

from unlearn_exp.cell.concept_source import ImageSetRef, ensure_image_set, image_set_ref, resolve_concept
from unlearn_exp.cell.inputs import apply_unlearning, benchmark_rows, cell_store, load_model, method_filter
from unlearn_exp.cell.keys import (
    ORIGINAL,
    cell_key,
    checkpoint_for_inversion,
    image_set_key,
    inversion_key,
    rows_identity,
    sample_identity,
    sampling_settings,
)
from unlearn_exp.cell.records import checkpoint_label, collapse_flag, recorded_result
from unlearn_exp.cell.run import (
    concept,
    judge,
    needs_learned_concept,
    open_cell,
    original_model,
    originals,
    record,
    run_cell,
    run_stages,
    sample,
    score,
    unlearn,
)
from unlearn_exp.cell.samples import Chunk, chunk_images, chunk_meta, generate_samples, judge_chunks
from unlearn_exp.cell.stages import Cell, ConceptGuidance, Judged, Originals, Samples, Scores, Unlearned
from unlearn_exp.identity import model_identity

__all__ = [
    "ORIGINAL",
    "Cell",
    "Chunk",
    "ConceptGuidance",
    "ImageSetRef",
    "Judged",
    "Originals",
    "Samples",
    "Scores",
    "Unlearned",
    "apply_unlearning",
    "benchmark_rows",
    "cell_key",
    "cell_store",
    "checkpoint_for_inversion",
    "checkpoint_label",
    "chunk_images",
    "chunk_meta",
    "collapse_flag",
    "concept",
    "ensure_image_set",
    "generate_samples",
    "image_set_key",
    "image_set_ref",
    "inversion_key",
    "judge",
    "judge_chunks",
    "load_model",
    "method_filter",
    "model_identity",
    "needs_learned_concept",
    "open_cell",
    "original_model",
    "originals",
    "record",
    "recorded_result",
    "resolve_concept",
    "rows_identity",
    "run_cell",
    "run_stages",
    "sample",
    "sample_identity",
    "sampling_settings",
    "score",
    "unlearn",
]
