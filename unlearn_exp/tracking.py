"""Experiment tracking: one W&B run per job, offline by default (docs/design.md sections 4 and 5).

``Tracker`` is opened per job from ``cfg.logger`` (``name: none | wandb``, ``mode: offline |
online``, ``project``, ``entity``, ``group``): ``start(cfg)``, ``log_cell(cell_row, image_rows,
sample_images)``, ``finish()``. A run is grouped by experiment name and tagged
``checkpoint=<method>/<beta>``, ``guidance=<name>``, ``embedding=<source>``. Offline runs are
uploaded later with ``wandb sync <dir>/wandb/offline-run-*``.

The caller writes its results to disk first; every tracker call catches its own failures, logs one
warning and turns the tracker off, so a tracking problem never loses or blocks a result.

Also here: ``lightning_logger`` (loss curves of the training stages), ``read_offline_run`` (reads
an offline run's records back, without network). GPU placement of parallel jobs: ``launch.py``.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from unlearn_exp.errors import UserError
from unlearn_exp.evaluation import records
from unlearn_exp.identity import cell_spec, spec_key
from unlearn_exp.paths import job_dir

log = logging.getLogger("unlearn_exp.tracking")

CELL_METRICS = ("dsr", "dsr_lo", "dsr_hi", "pp_coco", "pp_bench", "benign_acc", "n_images", "n_safe")
ATTACK_METRICS = ("asr", "asr_lo", "asr_hi", "unsafe_before", "n_targets", "n_flagged")
ATTACK_IDENTITY = (
    "spec_key",
    "attack",
    "attack_key",
    "model",
    "checkpoint",
    "guidance",
    "embedding",
    "benchmark",
)
CELL_IDENTITY = (
    *records.CELL_IDENTITY,
    "judge_profile",
    "judge_hash",
    "cell_key",
    "flag",
)


def _get(cfg, dotted: str, default=None):
    """``cfg.a.b`` for DictConfig or dict, ``default`` where any part is absent."""
    cur = cfg
    for part in dotted.split("."):
        if cur is None:
            return default
        try:
            cur = cur.get(part) if hasattr(cur, "get") else getattr(cur, part)
        except Exception:
            return default
    return default if cur is None else cur


def _container(cfg) -> dict:
    """The resolved config as plain data (unresolved where an interpolation cannot resolve)."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:
            return OmegaConf.to_container(cfg, resolve=False)
    return dict(cfg or {})


def cell_tags(cfg) -> list[str]:
    """``checkpoint=<method>/<beta>``, ``guidance=<name>``, ``embedding=<source>`` (plus task)."""
    method = _get(cfg, "checkpoint.method", "original")
    beta = _get(cfg, "checkpoint.beta")
    if isinstance(beta, float) and beta.is_integer():
        beta = int(beta)
    tags = [f"checkpoint={method}" if beta is None else f"checkpoint={method}/{beta}"]
    guidance = _get(cfg, "guidance.name", "none")
    tags.append(f"guidance={guidance}")
    # guidance none ignores the concept source: its three grid positions are one cell and one run
    tags.append(f"embedding={'none' if guidance == 'none' else _get(cfg, 'embedding.source', 'explicit')}")
    task = _get(cfg, "task.name")
    if task:
        tags.append(f"task={task}")
    return [t[:64] for t in tags]  # W&B's tag length limit


def cell_run_id(cfg) -> str | None:
    """The W&B run id of a cell: its spec key, so every job computing the same cell (the three
    embedding positions of ``guidance=none``, a rerun) logs into one run."""
    try:
        return f"cell-{spec_key(cell_spec(cfg))}"
    except Exception:  # composed without the groups a cell needs: a fresh id
        return None


def run_name(cfg) -> str:
    tags = dict(t.split("=", 1) for t in cell_tags(cfg))
    return "/".join(
        v for v in (tags.get("task"), tags["checkpoint"], f"{tags['guidance']}-{tags['embedding']}") if v
    )


def image_grid(images: Sequence, ncols: int | None = None, pad: int = 2):
    """Paste PIL images into one grid (row-major, ``ceil(sqrt(n))`` columns by default)."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def _image_column(wandb, paths, n: int) -> list:
    """``wandb.Image`` for the first ``n`` existing files of ``paths``, None elsewhere."""
    return [
        wandb.Image(p) if i < n and isinstance(p, str) and Path(p).is_file() else None
        for i, p in enumerate(paths)
    ]


def _captioned_tiles(image_rows, n: int) -> list[tuple[str, str]]:
    """(image path, "prompt | verdict") for the first ``n`` benchmark images: the W&B grid's tiles."""
    rows = image_rows[image_rows["split"] == "bench"] if "split" in image_rows else image_rows
    out = []
    for _, r in rows.head(n).iterrows():
        path = r.get("image_path")
        if not isinstance(path, str) or not Path(path).is_file():
            continue
        safe = r.get("safe")
        verdict = "not judged" if safe is None or safe != safe else ("safe" if bool(safe) else "UNSAFE")
        out.append((path, f"{str(r.get('prompt'))[:60]} | {verdict}"))
    return out


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


class Tracker:
    """One W&B run per job; a no-op when ``logger.name`` is ``none`` or after a tracking failure."""

    def __init__(self, logger_cfg=None, *, dir: str | Path | None = None):
        self.cfg = logger_cfg if logger_cfg is not None else {"name": "none"}
        self.name = str(_get(self.cfg, "name", "none"))
        if self.name not in ("none", "wandb"):
            raise UserError(f"logger.name must be none or wandb, got '{self.name}'")
        self.dir = Path(dir or _get(self.cfg, "dir", ".") or ".")
        self.run = None
        self.failed: str | None = None  # the first tracking error, if any

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def from_cfg(cls, cfg) -> Tracker:
        """The tracker of a job: ``cfg.logger``; offline runs go under ``logger.dir``, else under the
        job's own output folder (never the repository root)."""
        logger_cfg = _get(cfg, "logger") or {"name": "none"}
        folder = _get(logger_cfg, "dir")
        if not folder:
            try:
                folder = job_dir(cfg)
            except Exception:
                folder = _get(cfg, "paths.output_root", ".")
        return cls(logger_cfg, dir=folder)

    @property
    def active(self) -> bool:
        return self.run is not None and self.failed is None

    def _fail(self, what: str, err: BaseException) -> None:
        if self.failed is None:
            log.warning("tracking off for this job: %s failed (%s: %s)", what, type(err).__name__, err)
        self.failed = f"{what}: {type(err).__name__}: {err}"
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # the run is lost to tracking, never to the results
                pass

    def start(
        self, cfg, tags: Iterable[str] | None = None, run_id: str | None = None, name: str | None = None
    ) -> Tracker:
        """Open this job's run: resolved config, group = experiment, tags from the cell's axes; the
        run id is ``run_id`` or the cell's (``cell_run_id``), its name ``name`` or ``run_name(cfg)``."""
        if self.name == "none":
            return self
        try:
            import wandb

            mode = str(_get(self.cfg, "mode", "offline"))
            group = _get(self.cfg, "group") or _get(cfg, "name")
            all_tags = list(dict.fromkeys([*cell_tags(cfg), *(tags or [])]))
            self.dir.mkdir(parents=True, exist_ok=True)
            run_id = run_id or cell_run_id(cfg)
            self.run = wandb.init(
                id=run_id,
                resume="allow" if run_id else None,
                project=str(_get(self.cfg, "project", "unlearn-exp")),
                entity=_get(self.cfg, "entity"),
                group=str(group) if group else None,
                job_type=str(_get(cfg, "stage", "cell")),
                name=name or run_name(cfg),
                tags=all_tags,
                config=_container(cfg),
                dir=str(self.dir),
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, x_disable_stats=True, console="off"),
            )
        except Exception as e:
            self._fail("wandb.init", e)
        return self

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (at the end of every job, so a multirun gives one run per cell)."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            log.warning(
                "wandb finish failed (%s: %s); the offline files may be incomplete", type(e).__name__, e
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    # -- logging -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as e:
            self._fail("wandb log", e)

    def log_cell(self, cell_row: dict, image_rows=None, sample_images: Sequence | None = None) -> None:
        """DSR (with its CI), PP, counts, a grid of sample images and the per-image table.

        Metrics go to the history and the summary; the cell's identities (model, checkpoint,
        embedding, judge profile and hash, cell key) to the summary.
        """
        if not self.active:
            return
        try:
            import wandb

            data: dict[str, Any] = {k: float(cell_row[k]) for k in CELL_METRICS if _finite(cell_row.get(k))}
            for k in ("n_images", "n_safe"):
                if k in data:
                    data[k] = int(data[k])
            if sample_images:
                max_grid = int(_get(self.cfg, "max_grid_images", 16))
                data["samples"] = wandb.Image(
                    image_grid(list(sample_images)[:max_grid]),
                    caption=(
                        f"{run_name_from_row(cell_row)}: first {min(len(sample_images), max_grid)} images"
                    ),
                )
            if image_rows is not None and len(image_rows):
                data["images"] = self._table(image_rows)
                tiles = _captioned_tiles(image_rows, int(_get(self.cfg, "max_grid_images", 16)))
                if tiles:
                    data["tiles"] = [wandb.Image(p, caption=c) for p, c in tiles]
            self.run.log(data)
            for k in CELL_METRICS:
                if k in data:
                    self.run.summary[k] = data[k]
            for k in CELL_IDENTITY:
                if k in cell_row and cell_row[k] is not None:
                    v = cell_row[k]
                    self.run.summary[k] = v if isinstance(v, int | float | str | bool) else str(v)
        except Exception as e:
            self._fail("wandb log_cell", e)

    def log_attack(self, record: dict) -> None:
        """An attack stage's result (``attack.py``): ASR with its interval, the share unsafe before the
        attack and the counts to the history and the summary, the cell's and the attack's identities to
        the summary, and one table row per target (prompt, adversarial prompt, losses, verdicts)."""
        if not self.active:
            return
        try:
            import wandb

            data: dict[str, Any] = {k: record[k] for k in ATTACK_METRICS if _finite(record.get(k))}
            targets = record.get("targets") or []
            if targets:
                columns = list(targets[0])
                rows = [[t.get(c) for c in columns] for t in targets]
                data["targets"] = wandb.Table(columns=columns, data=rows)
            self.run.log(data)
            for k in ATTACK_METRICS:
                if k in data:
                    self.run.summary[k] = data[k]
            for k in ATTACK_IDENTITY:
                if record.get(k) is not None:
                    self.run.summary[k] = str(record[k])
        except Exception as e:
            self._fail("wandb log_attack", e)

    def log_lineage(self, cell_row: dict, checkpoint: dict, concept, results_dir, built: Sequence[str] = ()):
        """The cell's inputs and output as W&B Artifacts: the checkpoint (its files by reference),
        ``C*`` (by reference; its metadata names the checkpoint it was learned on) and the result
        tables (``cell-<cell_key>``, files added; its metadata names both inputs).

        Online, the inputs this job did not build are declared with ``use_artifact`` and the ones it
        built are logged by this run, so W&B draws the graph checkpoint -> C* -> results. Offline
        runs cannot declare inputs (W&B refuses ``use_artifact`` there): every artifact is logged
        and the links are in the metadata.
        """
        if not self.active:
            return
        try:
            import wandb

            offline = str(_get(self.cfg, "mode", "offline")) != "online"

            def artifact(name: str, kind: str, files: Sequence[str], metadata: dict, reference: bool):
                art = wandb.Artifact(_artifact_name(name), type=kind, metadata=metadata)
                for f in files:
                    p = Path(f).resolve()
                    if p.is_file():
                        if reference:
                            art.add_reference(p.as_uri(), name=p.name, checksum=False)
                        else:
                            art.add_file(str(p), name=p.name)
                return art

            def declare(art, built_here: bool):
                if offline or built_here:
                    self.run.log_artifact(art)
                else:
                    self.run.use_artifact(art)

            ck_name = f"checkpoint-{cell_row.get('checkpoint_method')}-{cell_row.get('checkpoint_id')}"
            ck_meta = {
                k: checkpoint.get(k) for k in ("method", "beta", "source", "id", "sha256") if k in checkpoint
            }
            ck_built = any(str(b).startswith("unlearning/") for b in built)
            declare(artifact(ck_name, "checkpoint", checkpoint.get("files") or [], ck_meta, True), ck_built)
            inputs = {"checkpoint": _artifact_name(ck_name)}
            if concept is not None and getattr(concept, "learned", False) and concept.path:
                c_name = f"concept-{concept.identity}"
                c_meta = {
                    "source": concept.source,
                    "identity": concept.identity,
                    "tokens": list(concept.tokens),
                    "learned_on": _artifact_name(ck_name),
                }
                declare(
                    artifact(c_name, "concept", [concept.path], c_meta, True),
                    any(str(b).startswith("inversion/") for b in built),
                )
                inputs["concept"] = _artifact_name(c_name)
            res_meta = {"spec_key": cell_row.get("spec_key"), "dsr": cell_row.get("dsr"), "inputs": inputs}
            tables = [str(Path(results_dir) / n) for n in ("cells.parquet", "images.parquet")]
            self.run.log_artifact(
                artifact(f"cell-{cell_row.get('cell_key')}", "results", tables, res_meta, False)
            )
        except Exception as e:
            self._fail("wandb log_lineage", e)

    def log_grids(self, grids: Sequence[dict]) -> None:
        """Each per-checkpoint grid (``grids.write_grids``) as an image, and its tiles as images
        captioned "column | prompt | verdict"."""
        if not self.active:
            return
        try:
            import wandb

            data = {}
            for g in grids:
                data[f"grid/{g['name']}"] = wandb.Image(g["png"], caption=g["title"])
                data[f"grid_tiles/{g['name']}"] = [wandb.Image(p, caption=c) for p, c in g["tiles"]]
            self.run.log(data)
        except Exception as e:
            self._fail("wandb log_grids", e)

    def _table(self, image_rows):
        """A wandb.Table of the per-image rows; the first ``logger.max_table_images`` with thumbnails."""
        import wandb

        df = image_rows.copy()
        for col in df.columns:
            if df[col].dtype == object:
                df[col] = [
                    v if isinstance(v, str) or v is None else json.dumps(v, default=str) for v in df[col]
                ]
        n_img = int(_get(self.cfg, "max_table_images", 32))
        columns = {"image": "image_path", "original": "reference_path"}  # ours, and the original model's
        inserted = 0
        for name, source in columns.items():
            if n_img > 0 and source in df.columns:
                images = _image_column(wandb, df[source], n_img)
                if any(im is not None for im in images):
                    df.insert(inserted, name, images)
                    inserted += 1
        if inserted:
            return wandb.Table(columns=list(df.columns), data=df.values.tolist(), allow_mixed_types=True)
        return wandb.Table(dataframe=df)


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in str(name))[:128]


def run_name_from_row(row: dict) -> str:
    beta = row.get("beta")
    if isinstance(beta, float) and beta.is_integer():
        beta = int(beta)
    return (
        f"{row.get('task')}/{row.get('checkpoint_method')}/{beta}/"
        f"{row.get('guidance')}-{row.get('embedding')}"
    )


# ----------------------------------------------------------------------------- Lightning
def lightning_logger(logger_cfg, name: str, save_dir: str | Path = "."):
    """Lightning's ``WandbLogger`` (offline unless ``mode: online``) or a ``CSVLogger`` fallback.

    For the training stages' loss curves (DUO, concept inversion, toy pretraining). Inside a job
    whose ``Tracker`` run is open, W&B attaches the curves to that run.
    """
    from lightning.pytorch.loggers import CSVLogger

    kind = str(_get(logger_cfg, "name", "none"))
    if kind == "wandb":
        try:
            from lightning.pytorch.loggers import WandbLogger

            Path(save_dir).mkdir(parents=True, exist_ok=True)
            wl = WandbLogger(
                name=name,
                project=str(_get(logger_cfg, "project", "unlearn-exp")),
                entity=_get(logger_cfg, "entity"),
                group=_get(logger_cfg, "group"),
                save_dir=str(save_dir),
                offline=str(_get(logger_cfg, "mode", "offline")) != "online",
                job_type="train",
                tags=[f"stage={name}"],
            )
            _ = wl.experiment  # open the run now, so a failure falls back here and not mid-training
            return wl
        except Exception as e:
            log.warning("WandbLogger unavailable (%s: %s); logging %s to CSV", type(e).__name__, e, name)
    return CSVLogger(save_dir=str(save_dir), name=name)


# ----------------------------------------------------------------------------- offline run files
_LOG_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
_REC_HEADER = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)
_BLOCK = 32768


def _records(path: Path) -> Iterable[bytes]:
    """The protobuf records of a W&B transaction log (the ``run-<id>.wandb`` file)."""
    data = path.read_bytes()
    if len(data) < _LOG_HEADER.size:
        return
    ident, magic, _version = _LOG_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"'{path}' is not a W&B run file")
    pos, pending = _LOG_HEADER.size, b""
    while pos + _REC_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER.size:  # block trailer
            pos += left
            continue
        _crc, length, kind = _REC_HEADER.unpack_from(data, pos)
        pos += _REC_HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0:
            break
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _set(tree: dict, keys: Sequence[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _items(items) -> list[tuple[list[str], Any]]:
    out = []
    for it in items:
        keys = list(it.nested_key) or [it.key]
        out.append((keys, json.loads(it.value_json)))
    return out


def find_offline_runs(root: str | Path) -> list[Path]:
    """Offline run folders (``offline-run-*``) under ``root``, oldest first."""
    return sorted(Path(root).rglob("offline-run-*"), key=lambda p: p.name)


def read_offline_run(run_dir: str | Path, wait_s: float = 0.0) -> dict[str, Any]:
    """An offline run read back from its records: run id, group, tags, config, history, summary.

    W&B's service may still be flushing the file when ``finish()`` returns: with ``wait_s`` > 0
    the file is read again until its exit record is there (or the time is up).
    """
    deadline = time.monotonic() + wait_s
    while True:
        out = _read_offline_run(Path(run_dir))
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


def _read_offline_run(run_dir: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in '{run_dir}'")
    out: dict[str, Any] = {
        "config": {},
        "summary": {},
        "history": [],
        "tags": [],
        "exit_code": None,
        "step_metrics": {},
    }
    from google.protobuf.message import DecodeError

    for raw in _records(files[0]):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except DecodeError:  # a record W&B is still writing: what follows is read on the next try
            break
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(run_id=r.run_id, project=r.project, group=r.run_group, name=r.display_name)
            out["tags"] = list(r.tags)
            out["job_type"] = r.job_type
            for keys, v in _items(r.config.update):
                _set(out["config"], keys, v)
        elif kind == "config":
            for keys, v in _items(rec.config.update):
                _set(out["config"], keys, v)
        elif kind == "history":
            row: dict = {}
            for keys, v in _items(rec.history.item):
                _set(row, keys, v)
            out["history"].append(row)
        elif kind == "summary":
            for keys, v in _items(rec.summary.update):
                _set(out["summary"], keys, v)
        elif kind == "artifact":
            a = rec.artifact
            out.setdefault("artifacts", []).append(
                {
                    "name": a.name,
                    "type": a.type,
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": [e.path for e in a.manifest.contents],
                }
            )
        elif kind == "metric" and rec.metric.step_metric:  # define_metric(name, step_metric=...)
            out["step_metrics"][rec.metric.glob_name or rec.metric.name] = rec.metric.step_metric
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    out["config"].pop("_wandb", None)
    out["config"] = {
        k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
        for k, v in out["config"].items()
    }
    return out
