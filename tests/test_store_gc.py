"""The artifact cache's maintenance: ``gc`` never removes what a running build uses, refuses a folder
that is not a cache, runs as ``python -m unlearn_exp.store``; cache files follow the umask."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import ROOT
from unlearn_exp import atomic, store
from unlearn_exp.atomic import atomic_dir
from unlearn_exp.store import KEY_FILE, ArtifactStore, gc, verify_folder


def _stale_cache(root: Path, n: int = 20) -> list[Path]:
    """Temporary folders left by killed builds in ``n`` kind folders (no lock held)."""
    stale = []
    for i in range(n):
        tmp = root / f"kind{i}" / f".{i:016x}.x.tmp"
        tmp.mkdir(parents=True)
        (tmp / "part.bin").write_bytes(b"half")
        stale.append(tmp)
    return stale


@pytest.mark.parametrize("kind", ["unlearning/duo", "inversion"])
def test_gc_keeps_a_build_that_starts_during_its_walk(kind, tmp_path, monkeypatch):
    """A build that takes its lock after gc read the held locks: its temporary folder and the temporary
    files in its resumable work folder (``<h>.work``, ``inversion_work/<h>``) stay, and it completes."""
    stale = _stale_cache(tmp_path)
    started, gc_done, seen = threading.Event(), threading.Event(), {}

    def build(tmp: Path) -> None:
        name = tmp.name.lstrip(".").split(".")[0]
        work = tmp.parent / f"{name}.work" if kind != "inversion" else tmp_path / "inversion_work" / name
        work.mkdir(parents=True)
        (work / ".last.ckpt.abc.tmp").write_text("being written")
        seen["tmp"], seen["work"] = tmp, work
        started.set()
        assert gc_done.wait(10)
        (tmp / "weights.txt").write_text("done")  # FileNotFoundError if gc took the folder

    def builder() -> None:
        try:
            seen["folder"] = ArtifactStore(tmp_path).get_or_build(kind, {"beta": 500}, build)
        except BaseException as exc:  # reported below
            seen["error"] = exc
            started.set()

    snapshot = store.held_artifacts
    thread = threading.Thread(target=builder)

    def held_then_build_starts(root: Path) -> set[str]:
        held = snapshot(root)
        thread.start()
        assert started.wait(10)
        return held

    monkeypatch.setattr(store, "held_artifacts", held_then_build_starts)
    try:
        removed = gc(tmp_path, 0)
    finally:
        gc_done.set()
        thread.join(10)
    assert "error" not in seen, seen.get("error")
    assert sorted(removed) == sorted(stale)  # what killed builds left goes
    assert seen["tmp"] not in removed and (seen["work"] / ".last.ckpt.abc.tmp").is_file()
    assert (seen["folder"] / "weights.txt").read_text() == "done" and verify_folder(seen["folder"]) is None


def test_gc_refuses_a_folder_that_is_not_an_artifact_cache(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "typo", "no artifact cache at .*typo: no such folder"),
        (tmp_path / "notes" / "todo.txt", "is a file, not an artifact cache folder"),
        (tmp_path / "notes", "notes is not an artifact cache: .* nothing was removed"),
    ]
    for folder, message in cases:
        assert store.main(["gc", "--cache", str(folder), "--hours", "0"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("error: ")
        assert re.search(message, out.err), out.err
    assert (tmp_path / "notes" / "todo.txt").is_file()
    assert store.main(["gc", "--cache", str(empty)]) == 0  # a new, empty cache: nothing to remove
    assert "0 stale item(s) removed" in capsys.readouterr().out
    built = tmp_path / "cache"
    ArtifactStore(built).get_or_build("samples", {"a": 1}, lambda t: (t / "x.txt").write_text("x"))
    assert store.main(["gc", "--cache", str(built)]) == 0


def test_store_command_runs_without_a_runpy_warning(tmp_path):
    """``python -m unlearn_exp.store``: the package does not import the store before it runs as the
    command (runpy's "found in sys.modules" RuntimeWarning), and gc works."""
    stale = _stale_cache(tmp_path, 1)[0]
    out = subprocess.run(
        [sys.executable, "-m", "unlearn_exp.store", "gc", "--cache", str(tmp_path), "--hours", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "RuntimeWarning" not in out.stderr, out.stderr
    assert f"removed {stale}" in out.stdout and "1 stale item(s) removed" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "unlearn_exp.store", "gc", "--cache", str(tmp_path / "typo")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and out.stderr.startswith("error: no artifact cache at"), out.stderr
    assert out.stderr.count("\n") == 1


def test_cache_files_follow_the_umask(tmp_path):
    """Under umask 022 every atomic writer leaves 0644 files (0755 folders), those written through a
    writer's own temporary file (safetensors) included, so a group can read a shared cache."""
    import torch
    from safetensors.torch import save_file

    from unlearn_exp.unlearning.weights import save_safetensors

    old = os.umask(0o022)
    try:
        files = [
            atomic.atomic_write_text(tmp_path / "a.txt", "x"),
            atomic.atomic_write_bytes(tmp_path / "b.bin", b"x"),
            atomic.atomic_write_json(tmp_path / "c.json", {"a": 1}),
            save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors", {"converted_from": "w.pt"}),
        ]
        with atomic.atomic_file(tmp_path / "d.safetensors") as tmp:
            save_file({"w": torch.ones(2)}, str(tmp))
        files.append(tmp_path / "d.safetensors")
        with atomic_dir(tmp_path / "lora") as tmp:  # a LoRA file as diffusers writes it, in a subfolder
            (tmp / "unet").mkdir()
            save_file({"w": torch.ones(2)}, str(tmp / "unet" / "lora.safetensors"))
        files.append(tmp_path / "lora" / "unet" / "lora.safetensors")
        folder = ArtifactStore(tmp_path / "cache").get_or_build(
            "unlearning/converted",
            {"a": 1},
            lambda t: save_file({"w": torch.ones(2)}, str(t / "x.safetensors")),
        )
        files += [folder / "x.safetensors", folder / KEY_FILE]
    finally:
        os.umask(old)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}
    for d in (tmp_path / "lora", tmp_path / "lora" / "unet", folder):
        assert d.stat().st_mode & 0o777 == 0o755, d


def test_a_full_disk_is_one_line_naming_the_folder_and_the_size(tmp_path, monkeypatch, capsys):
    """ENOSPC mid-run was a traceback: the atomic writers say which folder and how much, and any
    command turns a stray ENOSPC into one line; nothing half-written is left behind."""
    import errno

    from unlearn_exp.atomic import atomic_dir, atomic_write_bytes
    from unlearn_exp.errors import UserError, exit_status

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    needed = r"no space left on the disk holding '.*cache'.*3\.0 MiB needed"
    with pytest.raises(UserError, match=needed) as err:
        atomic_write_bytes(tmp_path / "cache" / "lora.safetensors", b"x" * (3 << 20))
    assert "\n" not in str(err.value) and "MiB free" in str(err.value)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"while writing chunk/ \(1\.0 MiB written"):
        with atomic_dir(tmp_path / "cache" / "chunk") as tmp:
            (tmp / "a.png").write_bytes(b"x" * (1 << 20))
            full()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no temporary folder left
    assert exit_status(full) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_full_disk_reported_by_a_writer_that_wraps_it_is_one_line_too(tmp_path):
    """safetensors and torch.save report ENOSPC in their own exception types."""
    from unlearn_exp.errors import UserError

    with pytest.raises(UserError, match="no space left on the disk holding"):
        with atomic.atomic_file(tmp_path / "lora.safetensors"):
            raise RuntimeError("PytorchStreamWriter failed writing file: No space left on device")
    with pytest.raises(ValueError, match="unrelated"):
        with atomic.atomic_file(tmp_path / "x.bin"):
            raise ValueError("unrelated")
