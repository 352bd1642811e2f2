"""Every external file a run needs, named at once: ``python -m unlearn_exp.assets [overrides]``.

For the composed experiment (every cell of its sweep) it lists each file the run will read that
the project does not ship: the model weights, LPIPS's AlexNet trunk and linear heads, the prompt
lists (benchmark, PP prompts), Q16's prompt embeddings and CLIP ViT-L/14, NudeNet's classifier where
a judge profile uses it, and the user's checkpoint and embedding files. For each: whether it is
here, where it was looked for, the config key that points at it, and where to get it.
``--download`` fetches every one with a public source: pinned files by sha256 into the data cache
or torch's hub cache, hub models through the Hugging Face cache.

``require(cfg)`` is the same check for one cell, run after ``validate`` by a cell and an attack:
the files no run fetches by itself (model, LPIPS, CLIP, the classifier) are named together in one
``UserError`` before any work. Pinned public prompt files are fetched on first use, so they are
listed but never refused here. Imports no torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_exp.config import compose, grid, override_key
from unlearn_exp.errors import UserError, exit_status
from unlearn_exp.evaluation.pp import ALEXNET_FILE, ALEXNET_SHA256, ALEXNET_URL
from unlearn_exp.families import family_of, required_parts
from unlearn_exp.hashing import to_plain
from unlearn_exp.paths import resolve_local_path

CLASSIFIER_URL = "https://github.com/notAI-tech/NudeNet/releases/download/v0/classifier_model.onnx"
FILE_LOADERS = ("i2p", "csv", "prompts_file")


@dataclass(frozen=True)
class Asset:
    """One external file: what it is, the key that points at it, where it was looked for, whether it
    is there, and where to get it. ``fetch`` (``("url", url, sha256, git_blob, dest)`` or ``("hub",
    repo_id)``) is set where it has a public source; ``on_demand`` where the run fetches it itself."""

    what: str
    key: str
    where: str
    present: bool
    source: str
    fetch: tuple | None = None
    on_demand: bool = False


# ----------------------------------------------------------------------------- where things live
def torch_hub_checkpoints() -> Path:
    """``torch.hub.get_dir()/checkpoints`` without importing torch ($TORCH_HOME, else the XDG cache)."""
    home = os.environ.get("TORCH_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
    )
    return Path(home).expanduser() / "hub" / "checkpoints"


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _is_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


def _in_hub_cache(repo_id: str, files: Iterable[str]) -> str | None:
    """The cached path of the first of ``files`` in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for name in files:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except ValueError:
            return None
        if isinstance(found, str):
            return found
    return None


def hf_home() -> str:
    return os.environ.get("HF_HOME", "~/.cache/huggingface")


# ----------------------------------------------------------------------------- per group
def _model(model: dict) -> list[Asset]:
    if model.get("source", "pretrained") != "pretrained" or not model.get("path"):
        return []

    path = resolve_local_path(str(model["path"]))  # a relative folder: the working directory, then the repo
    need = required_parts(model)
    what = f"model weights ({model.get('name')})"
    if _is_hub_id(path):
        found = _in_hub_cache(path, ["model_index.json", f"{family_of(model).denoiser}/config.json"])
        where = f"Hugging Face cache (HF_HOME={hf_home()}) for {path}"
        online = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on")
        source = f"hf download {path}" + (
            " (the loader downloads it on first use: HF_HUB_OFFLINE is unset)" if online else ""
        )
        return [Asset(what, "model.path", where, found is not None, source, ("hub", path), on_demand=online)]
    local = Path(path).expanduser()
    present = local.is_dir() and all((local / s).is_dir() for s in need)
    source = f"a diffusers folder ({', '.join(p + '/' for p in need)})"
    return [Asset(what, "model.path", str(local), present, source)]


def _prompt_list(node: Any, key: str, data_dir: Any) -> list[Asset]:
    node = dict(to_plain(node) or {})
    if isinstance(node.get("base"), dict):  # a generated benchmark: its base list
        return _prompt_list(node["base"], f"{key}.base", data_dir)
    if node.get("loader", "prompts_file") not in FILE_LOADERS and not node.get("path"):
        return []
    what = f"prompt list {node.get('name')}"
    if node.get("path"):
        p = Path(str(node["path"])).expanduser()
        return [Asset(what, f"{key}.path", str(p), p.is_file(), "your file")]
    if not node.get("url") or data_dir is None:  # the loader names the missing path itself
        return [Asset(what, f"{key}.path", "(no path)", False, node.get("source_hint") or "your file")]
    from unlearn_exp.data import pinned_download_path

    dest = pinned_download_path(node, Path(str(data_dir)).expanduser().resolve())
    fetch = ("url", str(node["url"]), node.get("sha256"), None, str(dest))
    return [Asset(what, f"{key}.path", str(dest), dest.is_file(), str(node["url"]), fetch, on_demand=True)]


def _lpips(metric: dict) -> list[Asset]:
    if metric.get("name") != "lpips_alex":
        return []
    trunk = Path(str(metric["trunk_path"])).expanduser() if metric.get("trunk_path") else None
    trunk = trunk or torch_hub_checkpoints() / ALEXNET_FILE
    fetch = ("url", ALEXNET_URL, ALEXNET_SHA256, None, str(trunk))
    out = [
        Asset("LPIPS AlexNet trunk", "pp.metric.trunk_path", str(trunk), trunk.is_file(), ALEXNET_URL, fetch)
    ]
    lin = Path(str(metric["lin_path"])).expanduser() if metric.get("lin_path") else None
    lin = lin or _package_file("lpips", "weights", "v0.1", "alex.pth")
    out.append(
        Asset(
            "LPIPS linear heads (v0.1 alex)",
            "pp.metric.lin_path",
            str(lin),
            lin is not None and lin.is_file(),
            "the lpips wheel (lpips/weights/v0.1/alex.pth)",
        )
    )
    return out


def _judge(judge: dict, key: str) -> list[Asset]:
    kind = judge.get("type")
    if kind == "nudenet_classifier":
        given = judge.get("model_path") or os.environ.get("UNLEARN_EXP_NUDENET_CLASSIFIER")
        p = Path(str(given)).expanduser() if given else None
        where = str(p) if p else "(judge.model_path and UNLEARN_EXP_NUDENET_CLASSIFIER unset)"
        source = f"{CLASSIFIER_URL} (no sha256 is pinned: fetch it yourself)"
        return [Asset("NudeNet v2 classifier", f"{key}.model_path", where, bool(p and p.is_file()), source)]
    if kind != "q16":
        return []
    out = []
    if judge.get("prompts_path"):
        p = Path(str(judge["prompts_path"])).expanduser()
        out.append(Asset("Q16 prompt embeddings", f"{key}.prompts_path", str(p), p.is_file(), "your file"))
    elif judge.get("prompts_url") and judge.get("cache_dir"):
        pin = judge.get("prompts_sha256") or judge.get("prompts_git_blob") or "unpinned"
        dest = (
            Path(str(judge["cache_dir"])).expanduser().resolve()
            / str(pin)[:16]
            / str(judge["prompts_url"]).rsplit("/", 1)[-1]
        )
        fetch = (
            "url",
            judge["prompts_url"],
            judge.get("prompts_sha256"),
            judge.get("prompts_git_blob"),
            str(dest),
        )
        out.append(
            Asset(
                "Q16 prompt embeddings (prompts.p)",
                f"{key}.prompts_path",
                str(dest),
                dest.is_file(),
                str(judge["prompts_url"]),
                fetch,
                on_demand=True,
            )
        )
    if judge.get("backend", "transformers") == "transformers":
        clip = str(judge.get("clip_path") or "")
        if _is_hub_id(clip):
            found = _in_hub_cache(clip, ["model.safetensors", "pytorch_model.bin"])
            where = f"Hugging Face cache (HF_HOME={hf_home()}) for {clip}"
            out.append(
                Asset(
                    "CLIP ViT-L/14 (Q16)",
                    f"{key}.clip_path",
                    where,
                    found is not None,
                    f"hf download {clip}",
                    ("hub", clip),
                )
            )
        else:
            p = Path(clip).expanduser()
            ok = p.is_dir() and any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
            out.append(Asset("CLIP ViT-L/14 (Q16)", f"{key}.clip_path", str(p), ok, "a CLIP ViT-L/14 folder"))
    return out


def _user_files(cfg: dict) -> list[Asset]:
    out = []
    ck, emb = cfg.get("checkpoint") or {}, cfg.get("embedding") or {}
    paths = ck.get("path")
    for p in [paths] if isinstance(paths, str) else list(paths or []):
        q = Path(str(p)).expanduser()
        out.append(
            Asset(f"{ck.get('method')} checkpoint", "checkpoint.path", str(q), q.exists(), "your file")
        )
    for key, p in (
        ("embedding.path", emb.get("path")),
        ("embedding.from_checkpoint.path", (emb.get("from_checkpoint") or {}).get("path")),
    ):
        if p:
            q = Path(str(p)).expanduser()
            out.append(Asset("concept embedding / its checkpoint", key, str(q), q.exists(), "your file"))
    return out


def _filters(cfg: dict) -> list[Asset]:
    """The judges that filter training data, where the cell trains with them."""
    out = []
    ck, task = cfg.get("checkpoint") or {}, cfg.get("task") or {}
    recipe = task.get("duo_recipe") or (ck.get("recipes") or {}).get(task.get("name")) or {}
    checks = any(a.get("check_unsafe") or a.get("check_safe") for a in recipe.get("adapters") or [])
    if ck.get("method") == "duo" and not ck.get("path") and checks and isinstance(ck.get("filter"), dict):
        out += _judge(ck["filter"], "task.duo_filter")
    guided = (cfg.get("guidance") or {}).get("name") != "none"
    emb, image_set = cfg.get("embedding") or {}, (cfg.get("inversion") or {}).get("image_set") or {}
    learns = guided and emb.get("source") != "explicit" and not emb.get("path")
    if learns and image_set.get("source") == "generated" and image_set.get("check"):
        if isinstance(image_set.get("filter"), dict):
            out += _judge(image_set["filter"], "task.inversion_filter")
    return out


def assets_of(cfg) -> list[Asset]:
    """The external files one composed cell config needs."""
    plain = {k: to_plain(cfg[k]) for k in cfg if k != "hydra"}  # a job's hydra node resolves only in its job
    data_dir = (plain.get("paths") or {}).get("data_dir")
    pp = plain.get("pp") or {}
    out = _model(plain.get("model") or {})
    out += _prompt_list(plain.get("benchmark"), "benchmark", data_dir)
    if pp.get("prompts"):
        out += _prompt_list(pp["prompts"], "pp.prompts", data_dir)
    out += _lpips(pp.get("metric") or {})
    out += _judge(plain.get("judge") or {}, "judge")
    out += _filters(plain)
    out += _user_files(plain)
    return out


def sweep_assets(overrides: list[str]) -> list[Asset]:
    """The external files of every cell of the composed sweep (one cell without a sweep), each once."""
    try:
        cells = grid(list(overrides))
    except UserError:
        raise
    except Exception:  # no sweep: the one cell the overrides describe
        cells = [[]]
    swept = {override_key(o) for o in cells[0]}
    base = [o for o in overrides if override_key(o) not in swept]
    seen: dict[tuple[str, str], Asset] = {}
    for cell in cells:
        for a in assets_of(compose([*base, *cell])):
            seen.setdefault((a.key, a.where), a)
    return list(seen.values())


def missing_before_work(cfg) -> list[str]:
    """One line per file this cell needs that is absent and that no run fetches by itself (the model,
    LPIPS, CLIP, the classifier); user files are checked by ``validate`` with their own messages."""
    return missing_lines(assets_of(cfg))


def missing_lines(assets: list[Asset]) -> list[str]:
    """One line per absent asset that no run fetches by itself and that is not the user's own file
    (those are checked by ``validate`` with their own messages)."""
    return [
        f"{a.what} not found ({a.key}; looked at {a.where}; get it: {a.source})"
        for a in assets
        if not a.present and not a.on_demand and a.source != "your file" and not a.where.startswith("(")
    ]


def require(cfg) -> None:
    """One ``UserError`` naming every absent file of ``missing_before_work``: a cell and an attack
    run it right after ``validate``, before any work."""
    missing = missing_before_work(cfg)
    if missing:
        raise UserError(
            f"{len(missing)} file(s) this run needs are missing: " + "; ".join(missing) + " (python -m "
            "unlearn_exp.assets with the same overrides lists every file; --download fetches the public ones)"
        )


# ----------------------------------------------------------------------------- the command
def render(assets: list[Asset]) -> str:
    lines = []
    for a in assets:
        state = "present" if a.present else ("fetched on first use" if a.on_demand else "MISSING")
        lines += [
            f"[{state}] {a.what}",
            f"    key: {a.key}",
            f"    looked at: {a.where}",
            f"    get: {a.source}",
        ]
    missing = [a for a in assets if not a.present and not a.on_demand]
    fetchable = [a for a in assets if not a.present and a.fetch]
    lines.append(
        f"{len(assets)} file(s): {len(assets) - len(missing)} present or fetched on first use, "
        f"{len(missing)} missing" + (f"; --download fetches {len(fetchable)}" if fetchable else "")
    )
    return "\n".join(lines)


def download(assets: list[Asset], fetchers: dict[str, Callable] | None = None) -> list[str]:
    """Fetch every absent asset with a public source (pinned URL files by sha256, hub models through
    the Hugging Face cache); return one line per fetched file."""
    fetchers = fetchers or {"url": _fetch_url, "hub": _fetch_hub}
    done = []
    for a in assets:
        if a.present or not a.fetch:
            continue
        done.append(f"{a.key}: {fetchers[a.fetch[0]](*a.fetch[1:])}")
    return done


def _fetch_url(url: str, sha256: str | None, git_blob: str | None, dest: str) -> str:
    from unlearn_exp.data.download import fetch

    return str(fetch(url, sha256, dest, git_blob=git_blob, local_hint="put the file there yourself"))


def _fetch_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot download {repo_id} from the hub: {first}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unlearn_exp.assets", description=__doc__.splitlines()[0])
    ap.add_argument("--download", action="store_true", help="fetch every absent file with a public source")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m unlearn_exp")
    args = ap.parse_args(argv)

    def run() -> int:
        assets = sweep_assets(list(args.overrides))
        if args.download:
            for line in download(assets):
                print(f"fetched {line}")
            assets = sweep_assets(list(args.overrides))
        print(render(assets))
        return 1 if any(not a.present and not a.on_demand for a in assets) else 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
