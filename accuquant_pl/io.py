"""Atomic file writes: a crash or a kill never leaves a half-written file behind."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _temp_prefix(path: Path) -> str:
    # Host and pid in the name let a later write tell a dead writer's leftovers from a live writer's file.
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def _writer_is_dead(temp: Path, path: Path) -> bool:
    """True for a temp file / folder of ``path`` left by a process of this host that no longer runs."""
    ours = f".{path.name}.{socket.gethostname()}."
    if not temp.name.startswith(ours):
        return False  # another machine's (on a shared filesystem), or not one of ours: not ours to judge
    pid = temp.name[len(ours):].partition(".")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders that killed writes of ``path`` left beside it; returns what went."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _writer_is_dead(temp, path):
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            else:
                temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on POSIX).

    Temp files of earlier writes of ``path`` whose process was killed are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _swap_folder(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_directory(path: str | os.PathLike) -> bool:
    """Finish what a replacement by :func:`atomic_directory` that was killed half-way left behind.

    The replacement renames the old folder to ``.<name>.old`` and then the new one to ``<name>``. A kill between
    the two renames leaves ``<name>`` missing: the old folder is moved back (returns True). A kill after them
    leaves a stale ``.<name>.old``, which is removed.
    """
    path = Path(path)
    old = _swap_folder(path)
    if not old.exists():
        return False
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    os.replace(old, path)
    return True


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` (an existing one is removed).

    A folder that an earlier, killed replacement left missing is restored first (:func:`recover_directory`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        yield tmp
        if path.exists():
            # Two renames: in the instant between them ``path`` is missing; recover_directory (called by the
            # next write and by the loaders) moves the old folder back if a kill lands there.
            old = _swap_folder(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(folder: str | os.PathLike, include: Callable[[Path], bool] = lambda p: True) -> str:
    """SHA-256 over the relative paths and contents of every file below ``folder`` (sorted)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and include(p)):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
