"""On-disk cache of FP sampler trajectories: keyed, checksummed, written atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.io import atomic_directory, sha256_file

TENSORS_FILE = "trajectories.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CacheError(RuntimeError):
    """A trajectory cache that cannot be used as it is (wrong key, corrupt, half-written)."""


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def write_cache(folder: Path, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors + manifest (key, checksum, shapes) into ``folder``, replacing it atomically."""
    with atomic_directory(folder) as tmp:
        torch.save(tensors, tmp / TENSORS_FILE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "key_hash": key_hash(key),
            "sha256": sha256_file(tmp / TENSORS_FILE),
            "shapes": {name: list(t.shape) for name, t in tensors.items()},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    keys = sorted(set(expected) | set(found))
    return [f"{k}: cache has {found.get(k)!r}, config asks {expected.get(k)!r}" for k in keys
            if json.dumps(expected.get(k), default=str) != json.dumps(found.get(k), default=str)]


def check_cache(folder: Path, key: dict[str, Any]) -> None:
    """Raise :class:`CacheError` naming the problem unless ``folder`` holds a complete cache for ``key``."""
    manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
    if not manifest_path.is_file() or not tensors_path.is_file():
        raise CacheError(f"trajectory cache {folder} is incomplete (no {MANIFEST_FILE} or {TENSORS_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"trajectory cache {folder}: corrupt {MANIFEST_FILE} ({err})") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"trajectory cache {folder}: format version {manifest.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    found_key = manifest.get("key", {})
    if found_key != json.loads(json.dumps(key, default=str)):
        diff = "; ".join(_differences(key, found_key))
        raise CacheError(f"trajectory cache {folder} was built for another configuration ({diff})")
    checksum = sha256_file(tensors_path)
    if checksum != manifest.get("sha256"):
        raise CacheError(f"trajectory cache {folder} is corrupt: {TENSORS_FILE} has sha256 {checksum[:12]}..., "
                         f"manifest says {str(manifest.get('sha256'))[:12]}...")


def read_cache(folder: Path, key: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Validated tensors of a cache (see :func:`check_cache`)."""
    check_cache(folder, key)
    return torch.load(folder / TENSORS_FILE, map_location="cpu", weights_only=True)
