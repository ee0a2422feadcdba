"""Atomic file writes: a crash or a kill never leaves a half-written file behind."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _lock(fd: int) -> None:
    # Held by a writer for as long as its temp file or folder exists; the kernel drops it when the writer dies,
    # however it dies, which is how a later write tells a killed writer's leftovers from a live writer's.
    fcntl.flock(fd, fcntl.LOCK_EX)


def _writer_is_gone(temp: Path) -> bool:
    """True when no process holds the lock of ``temp`` (its writer finished or was killed)."""
    try:
        fd = os.open(temp, os.O_RDONLY)
    except OSError:
        return False  # vanished meanwhile, or unreadable: not ours to remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders that killed writes of ``path`` left beside it; returns what went.

    A temp file or folder whose writer still runs is kept (the writer holds its lock)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for temp in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
        if _writer_is_gone(temp):
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        _lock(fd)
        yield tmp_path
        tmp_path.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd)
        yield tmp
        if path.exists():
            # Two renames: in the instant between them ``path`` is missing. Readers then read the old folder
            # (readable_directory); if a kill lands there, the next write moves it back (recover_directory).
            old = _swap_folder(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def readable_directory(path: str | os.PathLike) -> Path:
    """The folder to read ``path`` from: ``path``, or, while a replacement by :func:`atomic_directory` is between
    its two renames (or was killed there), the old folder moved aside. Readers never rename: the next write
    restores the folder (:func:`recover_directory`)."""
    path = Path(path)
    old = _swap_folder(path)
    return old if not path.exists() and old.is_dir() else path


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
