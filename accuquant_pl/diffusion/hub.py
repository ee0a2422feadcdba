"""Hugging Face Hub model ids wherever a model folder is accepted (``pretrained``, ``teacher``): ``owner/name``,
optionally ``owner/name@revision`` and ``owner/name@revision:subfolder`` (or ``owner/name:subfolder``).

An id resolves to a snapshot folder in huggingface_hub's cache: downloaded when the machine is online, taken from
the cache when it is offline (``HF_HUB_OFFLINE=1`` or no network), and otherwise refused in one line naming the
id. A local folder always wins over an id of the same spelling. The snapshot's commit hash is the resolved
revision that the trajectory cache key records (:func:`resolved_revision`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?(?::(?P<subfolder>[\w./-]+))?$"
)
IGNORED_FILES = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ckpt", "*.pb", "*.tflite", "*.mlmodel*",
                 "*.fp16.*", "*.non_ema.*"]
"""Weights in formats (Flax, TF, ONNX, original checkpoints) and variants diffusers' ``from_pretrained`` does not
read for a float32 torch model: never downloaded."""


@dataclass(frozen=True)
class HubReference:
    """A model id on the Hub: repository, revision (branch, tag or commit; None = main) and subfolder."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f":{self.subfolder}" if self.subfolder else ""
        return f"{self.repo_id}{rev}{sub}"


def hub_reference(path: str | Path) -> HubReference | None:
    """The Hub reference that ``path`` spells, or None for a local path (one that exists, or is not an id)."""
    text = str(path)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return None
    match = REPO_ID.match(text)
    if match is None:
        return None
    return HubReference(match["repo"], match["revision"], match["subfolder"])


@functools.lru_cache(maxsize=32)
def _snapshot(repo_id: str, revision: str | None, cache_dir: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = HubReference(repo_id, revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, ignore_patterns=IGNORED_FILES))
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"model {str(ref)!r}: the Hub repository {repo_id!r} has no revision "
                                f"{revision!r}") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"model {str(ref)!r}: no such Hub repository (or it is private: log in with "
                                "`hf auth login`), and no local folder of that name") from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"model {str(ref)!r} is not in the Hugging Face cache and cannot be downloaded (offline or no "
            f"network), and there is no local folder of that name; download it once online, or pass a local "
            "diffusers folder") from err
    except (HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"model {str(ref)!r}: the Hub download failed ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from err


def _cache_dir(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def resolve_model_path(path: str | Path, cache_dir: str | None = None) -> Path:
    """The local folder of ``path``: itself, or for a Hub id the (sub)folder of its cached snapshot."""
    ref = hub_reference(path)
    if ref is None:
        return Path(path).expanduser()
    folder = _snapshot(ref.repo_id, ref.revision, _cache_dir(cache_dir))
    if ref.subfolder:
        folder = folder / ref.subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"model {str(ref)!r}: the repository has no subfolder {ref.subfolder!r}")
    return folder


def resolved_revision(path: str | Path, cache_dir: str | None = None) -> str | None:
    """The commit hash that a Hub id resolves to (its snapshot folder's name); None for a local folder."""
    ref = hub_reference(path)
    if ref is None:
        return None
    return _snapshot(ref.repo_id, ref.revision, _cache_dir(cache_dir)).name


def pinned(path: str | Path, cache_dir: str | None = None) -> str:
    """``path`` with a Hub id's revision replaced by the commit it resolves to (``owner/name@<commit>[:subfolder]``),
    so that what was recorded keeps naming the same weights after the branch moves; a local path unchanged."""
    ref = hub_reference(path)
    if ref is None:
        return str(path)
    return str(HubReference(ref.repo_id, resolved_revision(path, cache_dir), ref.subfolder))


def model_exists(path: str | Path) -> bool:
    """Whether ``path`` names a local folder that exists or a Hub id (resolved, and checked, when it is loaded)."""
    return hub_reference(path) is not None or Path(path).expanduser().exists()
