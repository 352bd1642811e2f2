"""Find and export what was built: ``python -m unlearn_exp.artifacts {list,show,export}``.

- ``list [--kind K] [--method M] [--beta B] [--task T]``: every artifact of the cache in human terms
  (kind, method, beta, task, model, size, created, key);
- ``show KEY``: its key (the config it was built from), its files with sizes, and whether they still
  match their manifest;
- ``export KEY OUT [-- model overrides]``: an unlearned checkpoint (DUO LoRA fused, ESD/UCE weights)
  as a complete diffusers pipeline folder that ``StableDiffusionPipeline.from_pretrained(OUT)``
  loads; a concept embedding ``C*`` as a textual-inversion file for ``load_textual_inversion``.
  The base model comes from the overrides (default: the toy model) and must be the one the artifact
  was built on (checked by content identity).
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

from unlearn_exp.errors import UserError, exit_status
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
    return {
        "kind": folder.parent.relative_to(root).as_posix(),
        "method": ck.get("method") or ("duo" if "unlearning/duo" in str(folder) else ""),
        "beta": ck.get("beta", ""),
        "task": key.get("task", ""),
        "model": model or "",
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


def export(folder: Path, out: Path, overrides: list[str]) -> Path:
    """Write the artifact at ``folder`` in a format plain diffusers loads (see the module docstring)."""
    kind = folder.parent.name
    if (folder / "learned_embeds.safetensors").is_file():  # C*: already diffusers' textual-inversion file
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "learned_embeds.safetensors", out / "learned_embeds.safetensors")
        return out / "learned_embeds.safetensors"
    if folder.parent.parent.name != "unlearning" or kind not in ("duo", "esd", "uce"):
        raise UserError(
            f"artifact kind '{folder.parent.name}' cannot be exported (unlearned checkpoints and C* can)"
        )
    from unlearn_exp.config import compose
    from unlearn_exp.models import load_model

    key = json.loads((folder / KEY_FILE).read_text())["key"]
    cfg = compose(overrides or ["+experiment=toy_duo"])
    comps = load_model(cfg.model)
    want = key["model"]["id"] if isinstance(key.get("model"), dict) else key.get("model")
    if want and comps.identity != want:
        raise UserError(
            f"artifact {folder.name} was built on model {want}, the overrides load {comps.identity}: "
            "pass the same model (e.g. model.path=...)"
        )
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
        comps.unet.fuse_lora()
        comps.unet.unload_lora()
    else:
        for f in sorted(folder.glob("*.safetensors")):
            load_unet_weights(comps.unet, read_safetensors(f), f"{kind} artifact '{f.name}'")
    pipe = comps.to_diffusers()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
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
    ex.add_argument("overrides", nargs="*", help="Hydra overrides naming the base model (after --)")
    args = ap.parse_args(argv)
    root = _cache(args.cache)

    def run() -> int:
        if args.command == "list":
            rows = list_artifacts(root, kind=args.kind, method=args.method, beta=args.beta, task=args.task)
            cols = ("kind", "method", "beta", "task", "model", "size_mb", "created", "key")
            print("  ".join(f"{c:<16}" for c in cols))
            for r in rows:
                print("  ".join(f"{str(r[c])[:16]:<16}" for c in cols))
            print(f"{len(rows)} artifact(s) under {root}")
        elif args.command == "show":
            print(show(find(root, args.key)))
        else:
            path = export(find(root, args.key), Path(args.out), list(args.overrides))
            print(f"exported to {path}")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
