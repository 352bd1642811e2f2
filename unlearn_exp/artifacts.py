"""Find and export what was built: ``python -m unlearn_exp.artifacts {list,show,export}``.

- ``list [--kind K] [--method M] [--beta B] [--task T]``: every artifact of the cache in human terms
  (kind, method, beta, task, model, learned on, size, created, key), every value in full; for a
  concept embedding ``C*`` the checkpoint it was learned on (its key's ``checkpoint``, a content id),
  named by the unlearned artifact of this cache or the toy's shipped cache that has that id;
- ``show KEY``: its key (the config it was built from), its files with sizes, and whether they still
  match their manifest;
- ``export KEY OUT [--scheduler original|grid] [--no-safety-checker] [-- model overrides]``: an
  unlearned checkpoint (DUO LoRA fused, ESD/UCE weights) as a complete diffusers pipeline folder that
  ``StableDiffusionPipeline.from_pretrained(OUT)`` loads; a concept embedding ``C*`` as a
  textual-inversion file for ``load_textual_inversion``. The base model comes from the overrides
  (default: the toy model) and must be the one the artifact was built on (checked by content
  identity). Only the UNet is changed; the rest is the base model's, and the source model folder's
  parts that the sampler never loads are carried over: its ``scheduler/`` is copied as it is
  (``--scheduler grid`` writes the grid's sampler, ``sampling.scheduler``, instead), and its
  ``safety_checker/`` and ``feature_extractor/`` with their ``model_index.json`` entries
  (``--no-safety-checker`` leaves both out). Export prints one line per part (what was kept, what
  was changed, what is absent) and writes them to ``OUT/export.md`` and ``OUT/export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from unlearn_exp.atomic import atomic_write_json
from unlearn_exp.config import compose
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.hashing import config_hash
from unlearn_exp.identity import model_folder
from unlearn_exp.store import KEY_FILE, verify_folder


def _cache(root: str | None) -> Path:
    return Path(root or os.environ.get("UNLEARN_EXP_CACHE", ".cache/artifacts"))


def _summary(folder: Path, root: Path) -> dict[str, Any]:
    meta = json.loads((folder / KEY_FILE).read_text())
    key = meta.get("key") or {}
    ck = key.get("checkpoint") if isinstance(key.get("checkpoint"), dict) else {}
    model = key.get("model")
    if isinstance(model, dict):
        model = model.get("id")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    kind = folder.parent.relative_to(root).as_posix()
    method = ck.get("method") or (
        kind.split("/", 1)[1].removesuffix("_pairs") if kind.startswith("unlearning/") else ""
    )
    learned_on = (
        key.get("checkpoint") if kind == "inversion" and isinstance(key.get("checkpoint"), str) else ""
    )
    return {
        "kind": kind,
        "method": method,
        "beta": ck.get("beta", ""),
        "task": key.get("task", ""),
        "model": model or "",
        "learned_on": learned_on,
        "size_mb": round(size / 1e6, 2),
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime((folder / KEY_FILE).stat().st_mtime)),
        "key": folder.name,
        "path": str(folder),
    }


def list_artifacts(root: Path, **filters: Any) -> list[dict[str, Any]]:
    """Every artifact under ``root`` (quarantined ones left out), filtered on any summary field."""
    out = []
    for f in sorted(root.rglob(KEY_FILE)):
        if "quarantine" in f.relative_to(root).parts:
            continue
        row = _summary(f.parent, root)
        if all(
            v is None or str(row.get(k)) == str(v) or str(row.get(k)).startswith(str(v))
            for k, v in filters.items()
        ):
            out.append(row)
    return out


def content_id(folder: Path) -> str | None:
    """The content id a cell gives an unlearned artifact (``checkpoint_id``; what a ``C*`` key names
    as the checkpoint it was learned on), from the file hashes of its ``_key.json``: for DUO the
    adapters' files and weights (``duo.adapters_id``), for ESD and UCE the weight file's sha256[:16].
    None for any other kind."""
    meta = json.loads((folder / KEY_FILE).read_text())
    files = meta.get("files") or {}
    kind = folder.parent.name
    if folder.parent.parent.name != "unlearning":
        return None
    if kind == "duo" and (folder / "manifest.json").is_file():
        adapters = json.loads((folder / "manifest.json").read_text())["adapters"]
        shas = [files.get(a["file"], {}).get("sha256") for a in adapters]
        if None in shas:
            return None
        # duo.adapters_id, without importing the trainer
        return config_hash({"files": shas, "weights": [float(a["weight"]) for a in adapters]})
    weights = [rel for rel in files if rel in ("esd_unet.safetensors", "uce_cross_attention.safetensors")]
    return files[weights[0]]["sha256"][:16] if len(weights) == 1 else None


def name_learned_on(rows: list[dict[str, Any]], root: Path) -> None:
    """Name each ``C*`` row's checkpoint: ``original``, or ``<method> beta=<b> <key>`` of the unlearned
    artifact with that content id in ``root`` or the toy's shipped cache, else the id itself."""
    wanted = {r["learned_on"] for r in rows if r.get("learned_on") and r["learned_on"] != "original"}
    if not wanted:
        return
    from unlearn_exp.toy.artifacts import SHIPPED

    names: dict[str, str] = {}
    for where in (Path(SHIPPED), root):  # the user's cache last: its names win
        if not where.is_dir():
            continue
        for f in sorted(where.glob(f"unlearning/*/*/{KEY_FILE}")):
            if "quarantine" in f.parts:
                continue
            cid = content_id(f.parent)
            if cid in wanted:
                r = _summary(f.parent, where)
                names[cid] = " ".join(
                    x for x in (r["method"], f"beta={r['beta']}" if r["beta"] != "" else "", r["key"]) if x
                )
    for r in rows:
        if r.get("learned_on") in names:
            r["learned_on"] = f"{names[r['learned_on']]} (id {r['learned_on']})"


def table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> list[str]:
    """Rows as aligned text, every value in full (each column as wide as its widest value)."""
    heads = [c.replace("_", " ") for c in cols]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in [heads, *cells]]


def find(root: Path, key: str) -> Path:
    """The artifact whose key starts with ``key``: in ``root``, else in the toy's shipped cache."""
    from unlearn_exp.toy.artifacts import SHIPPED

    hits = []
    for where in (root, SHIPPED):
        hits = [
            f.parent
            for f in Path(where).rglob(KEY_FILE)
            if f.parent.name.startswith(key) and "quarantine" not in f.parts
        ]
        if hits:
            break
    if not hits:
        raise UserError(f"no artifact with key '{key}' under {root}: `python -m unlearn_exp.artifacts list`")
    if len(hits) > 1:
        raise UserError(f"key '{key}' names {len(hits)} artifacts: give more of it")
    return hits[0]


def show(folder: Path) -> str:
    meta = json.loads((folder / KEY_FILE).read_text())
    problem = verify_folder(folder, "full")
    lines = [f"{folder}", f"verified: {'yes' if problem is None else 'NO: ' + problem}", "key:"]
    lines += ["  " + ln for ln in json.dumps(meta.get("key"), indent=2, sort_keys=True).splitlines()]
    lines.append("files:")
    for rel, info in sorted((meta.get("files") or {}).items()):
        lines.append(f"  {rel}  {info['size']} bytes  sha256 {info['sha256'][:16]}")
    return "\n".join(lines)


SCHEDULER_CHOICES = ("original", "grid")
SAFETY_PARTS = ("safety_checker", "feature_extractor")
# a part's model_index.json entry where the source folder has the part but its index does not name it
SAFETY_ENTRIES = {
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}
REPORT_MD, REPORT_JSON = "export.md", "export.json"


def _write_report(out: Path, what: dict[str, Any], changes: list[str]) -> None:
    atomic_write_json(out / REPORT_JSON, {**what, "changes": changes})
    head = f"# Export of {what['artifact']} ({what['kind']})\n\n"
    (out / REPORT_MD).write_text(head + "".join(f"- {line}\n" for line in changes))


def _source_scheduler(src: Path | None) -> str | None:
    """The class name of the source folder's scheduler, None where it has no ``scheduler/``."""
    cfg = src / "scheduler" / "scheduler_config.json" if src is not None else None
    if cfg is None or not cfg.is_file():
        return None
    return str(json.loads(cfg.read_text()).get("_class_name") or "scheduler")


def _carry_over(
    out: Path, src: Path | None, scheduler: str, sampler, sampler_name: str, safety: bool, has_vae: bool
) -> list[str]:
    """Put the source folder's scheduler and safety parts into the saved pipeline folder ``out`` (as
    ``scheduler`` and ``safety`` ask); one line per part saying what was done."""
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    src_index = {}
    if src is not None and (src / "model_index.json").is_file():
        src_index = json.loads((src / "model_index.json").read_text())
    where = f"the source model {src}" if src is not None else "the base model (built in memory, no folder)"
    lines = []

    original = _source_scheduler(src)
    written = f"{type(sampler).__name__} (sampling.scheduler={sampler_name})"
    if scheduler == "original" and original is not None:
        shutil.rmtree(out / "scheduler")
        shutil.copytree(src / "scheduler", out / "scheduler")
        index["scheduler"] = ["diffusers", original]
        lines.append(f"scheduler: kept the original {original} (scheduler/ copied from {src})")
    elif original is None:
        lines.append(f"scheduler: {where} has none; wrote the grid's sampler {written}")
    else:
        lines.append(
            f"scheduler: replaced the original {original} by the grid's sampler {written}, "
            "as --scheduler grid asks"
        )

    for part in SAFETY_PARTS:
        shutil.rmtree(out / part, ignore_errors=True)  # from an earlier export into the same folder
        there = src is not None and (src / part).is_dir()
        if not there:
            lines.append(f"{part}: not in {where}, none written")
        elif not has_vae:
            lines.append(f"{part}: in the source model, not written (a pipeline without a VAE has no {part})")
        elif not safety:
            lines.append(f"{part}: in the source model, left out (--no-safety-checker)")
        else:
            shutil.copytree(src / part, out / part)
            entry = src_index.get(part)
            if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
                entry = SAFETY_ENTRIES[part]
            index[part] = entry
            lines.append(f"{part}: kept the original {entry[1]} ({part}/ copied from {src})")
    if has_vae and "requires_safety_checker" in index:
        kept = safety and src is not None and (src / "safety_checker").is_dir()
        index["requires_safety_checker"] = (
            bool(src_index.get("requires_safety_checker", True)) if kept else False
        )
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return lines


def _export_concept(folder: Path, out: Path) -> Path:
    """A ``C*`` is already in diffusers' textual-inversion format: copied, with what it was learned on."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "learned_embeds.safetensors", out / "learned_embeds.safetensors")
    rows = [_summary(folder, folder.parent.parent)]
    name_learned_on(rows, folder.parent.parent)
    changes = [
        "learned_embeds.safetensors: copied as it is (diffusers' textual-inversion format)",
        f"learned on: {rows[0]['learned_on'] or 'unknown'}",
    ]
    for line in changes:
        print(line)
    _write_report(out, {"artifact": folder.name, "kind": "inversion", "model": rows[0]["model"]}, changes)
    return out / "learned_embeds.safetensors"


def _apply_artifact(comps, folder: Path, kind: str) -> str:
    """Put an unlearned checkpoint's weights into the denoiser (DUO's LoRA fused); the line saying so."""
    from unlearn_exp.unlearning.weights import load_unet_weights, read_safetensors

    if kind == "duo":
        manifest = json.loads((folder / "manifest.json").read_text())["adapters"]
        from unlearn_exp.unlearning.duo import load_adapters

        load_adapters(
            comps,
            [folder / a["file"] for a in manifest],
            [f"duo_{a['name']}" for a in manifest],
            [a["weight"] for a in manifest],
        )
        comps.denoiser.fuse_lora()
        comps.denoiser.unload_lora()
        what = "transformer" if comps.family == "sd3" else "unet"
        return f"{what}: DUO LoRA fused ({', '.join(a['name'] for a in manifest)})"
    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        n += len(load_unet_weights(comps.unet, read_safetensors(f), f"{kind} artifact '{f.name}'"))
    return f"unet: {kind.upper()} weights loaded ({n} tensors changed)"


def export(
    folder: Path, out: Path, overrides: list[str], *, scheduler: str = "original", safety: bool = True
) -> Path:
    """Write the artifact at ``folder`` in a format plain diffusers loads (see the module docstring),
    print one line per part saying what was kept or changed, and write those lines to
    ``out/export.md`` and ``out/export.json``."""
    if scheduler not in SCHEDULER_CHOICES:
        raise UserError(f"--scheduler must be one of {list(SCHEDULER_CHOICES)}, got '{scheduler}'")
    kind = folder.parent.name
    key = json.loads((folder / KEY_FILE).read_text())["key"]
    if (folder / "learned_embeds.safetensors").is_file():  # C*: already diffusers' textual-inversion file
        return _export_concept(folder, out)
    if folder.parent.parent.name != "unlearning" or kind not in ("duo", "esd", "uce"):
        raise UserError(
            f"artifact kind '{folder.parent.name}' cannot be exported (unlearned checkpoints and C* can)"
        )
    from unlearn_exp.models import load_model

    cfg = compose(overrides or ["+experiment=toy_duo"])
    comps = load_model(cfg.model)
    want = key["model"]["id"] if isinstance(key.get("model"), dict) else key.get("model")
    if want and comps.identity != want:
        raise UserError(
            f"artifact {folder.name} was built on model {want}, the overrides load {comps.identity}: "
            "pass the same model (e.g. model.path=...)"
        )
    unet = _apply_artifact(comps, folder, kind)
    src = model_folder(cfg.model) if cfg.model.get("source") == "pretrained" else None
    src = src.resolve() if src is not None else None
    sampler_name = str(cfg.sampling.scheduler)
    sampler = comps.sampling_scheduler(sampler_name)
    pipe = comps.to_diffusers(scheduler=sampler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    parts = ", ".join(p for p in comps.modules() if p != ("transformer" if comps.family == "sd3" else "unet"))
    changes = [
        f"{unet}, written in {str(comps.dtype).removeprefix('torch.')}",
        f"{parts}: the base model's, unchanged",
        *_carry_over(out, src, scheduler, sampler, sampler_name, safety, comps.vae is not None),
    ]
    for line in changes:
        print(line)
    what = {
        "artifact": folder.name,
        "kind": f"unlearning/{kind}",
        "model": comps.identity,
        "source": str(src) if src is not None else None,
        "scheduler": scheduler,
        "safety_checker": safety,
    }
    _write_report(out, what, changes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unlearn_exp.artifacts", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cache", default=None, help="the artifact cache (paths.cache_dir; default .cache/artifacts)"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list artifacts (filters: --kind --method --beta --task)")
    for f in ("kind", "method", "beta", "task"):
        ls.add_argument(f"--{f}", default=None)
    sh = sub.add_parser("show", help="one artifact's key, files and verification")
    sh.add_argument("key")
    ex = sub.add_parser(
        "export", help="a checkpoint as a diffusers pipeline folder, C* as a textual-inversion file"
    )
    ex.add_argument("key")
    ex.add_argument("out")
    ex.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        default="original",
        help="original (default): copy the source model's scheduler/; grid: the sampler the grid used "
        "(sampling.scheduler)",
    )
    ex.add_argument(
        "--no-safety-checker",
        dest="safety",
        action="store_false",
        help="leave the source model's safety_checker/ and feature_extractor/ out",
    )
    ex.add_argument("overrides", nargs="*", help="Hydra overrides naming the base model (after --)")
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = argv[argv.index("--") + 1 :] if "--" in argv else []  # the model overrides, after --
    args, extra = ap.parse_known_args(argv[: len(argv) - len(tail) - (1 if "--" in argv else 0)])
    if [a for a in extra if a.startswith("-")] or ((extra or tail) and args.command != "export"):
        ap.error(f"unrecognized arguments: {' '.join(extra + tail)}")
    if args.command == "export":  # overrides may also stand before or among the options
        args.overrides = [*args.overrides, *extra, *tail]
    root = _cache(args.cache)

    def run() -> int:
        if args.command == "list":
            rows = list_artifacts(root, kind=args.kind, method=args.method, beta=args.beta, task=args.task)
            name_learned_on(rows, root)
            cols = ("kind", "method", "beta", "task", "model", "learned_on", "size_mb", "created", "key")
            print("\n".join(table(rows, cols)))
            print(f"{len(rows)} artifact(s) under {root}")
        elif args.command == "show":
            print(show(find(root, args.key)))
        else:
            path = export(
                find(root, args.key),
                Path(args.out),
                list(args.overrides),
                scheduler=args.scheduler,
                safety=args.safety,
            )
            print(f"exported to {path} (what was kept and changed: {Path(args.out) / REPORT_MD})")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
