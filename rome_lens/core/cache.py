"""The on-disk cache shared by every part of rome_lens.

Converted model weights and key statistics are expensive to compute and cheap
to store, so both live under one folder:

1. ``$ROME_LENS_CACHE`` if it is set,
2. else ``$XDG_CACHE_HOME/rome_lens``,
3. else ``~/.cache/rome_lens``.

Every entry is a safetensors file written atomically (to a temporary name, then
renamed), with its size, a SHA-256 digest of its bytes and free-form metadata in
a small JSON sidecar. A file that does not match its sidecar is reported as
corrupt and rebuilt by the caller, so an interrupted write or a flipped bit never
turns into a silently wrong model.

>>> import tempfile
>>> from rome_lens.core.cache import cache_dir, load_tensors, save_tensors
>>> root = cache_dir(tempfile.mkdtemp())  # an explicit folder wins over the variables
>>> save_tensors(root / "demo.safetensors", {"C": torch.eye(2)}, {"layer": 3})
>>> tensors, meta = load_tensors(root / "demo.safetensors")
>>> meta
{'layer': 3}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

T = TypeVar("T")

__all__ = [
    "CacheError",
    "cache_dir",
    "cached",
    "cache_key",
    "discard",
    "load_tensors",
    "save_tensors",
]


class CacheError(RuntimeError):
    """A cache entry exists but cannot be trusted (truncated, corrupt or mismatched)."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The folder rome_lens caches into (created on first use).

    Args:
        override: a folder to use instead of the variables' choice.

    Returns:
        The folder, created if it did not exist.
    """
    if override is not None:
        root = Path(override)
    elif os.environ.get("ROME_LENS_CACHE"):
        root = Path(os.environ["ROME_LENS_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "rome_lens"
    else:
        root = Path.home() / ".cache" / "rome_lens"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """Write ``tensors`` and JSON-able ``metadata`` atomically, with a digest for later checks.

    Args:
        path: the safetensors file to write.
        tensors: the tensors, by name.
        metadata: JSON-able values kept in the sidecar.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        sidecar = {"sha256": _digest(tmp), "size": tmp.stat().st_size, "metadata": metadata}
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar(path).write_text(json.dumps(sidecar, indent=1, sort_keys=True))


def load_tensors(
    path: Path, *, what: str = "cache entry"
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a file written by :func:`save_tensors`, checking it against its sidecar.

    Args:
        path: the safetensors file; its sidecar is ``path`` + ``.json``.
        what: what the file is, for error messages ("cache entry", "edit file", ...).

    Returns:
        The tensors and the metadata.

    Raises:
        FileNotFoundError: the file or its sidecar is missing (the message names which).
        CacheError: the file is truncated, corrupt or has an unreadable sidecar.
    """
    side = _sidecar(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not side.exists():
        raise FileNotFoundError(
            f"{what} {path} has no sidecar: {side.name} (its metadata and checksum) is missing"
        )
    try:
        sidecar = json.loads(side.read_text())
        expected_size, expected_sha = int(sidecar["size"]), str(sidecar["sha256"])
        metadata = dict(sidecar["metadata"])
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"the sidecar {side} of {what} {path.name} is unreadable: {err}") from err
    size = path.stat().st_size
    if size != expected_size:
        raise CacheError(f"{what} {path} has {size} bytes, expected {expected_size}")
    if _digest(path) != expected_sha:
        raise CacheError(f"{what} {path} does not match its SHA-256 digest")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CacheError(f"{what} {path} cannot be parsed: {err}") from err
    return tensors, metadata


def discard(path: Path, reason: str) -> None:
    """Warn that a cache entry is unusable and delete it so that it gets rebuilt.

    Args:
        path: the unusable file (its sidecar goes too).
        reason: what is wrong with it, for the warning.
    """
    warnings.warn(f"rome_lens: rebuilding cache entry {path.name}: {reason}", stacklevel=3)
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def cache_key(*parts: object, length: int = 24) -> str:
    """A short hex digest of JSON-able ``parts``: the name of a cache entry.

    Everything that changes an entry's content must be among the parts (the model's
    fingerprint, the settings, the inputs); dictionaries are keyed in sorted order.

    Args:
        *parts: JSON-able values.
        length: hex digits kept.

    Returns:
        The digest.
    """
    text = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def cached(
    path: Path,
    compute: Callable[[], T],
    *,
    load: Callable[[Path], T],
    save: Callable[[Path, T], None],
    use_cache: bool = True,
    write: bool = True,
) -> T:
    """The entry at ``path`` if it loads and verifies; else ``compute()``, saved there.

    The one cache-or-compute of rome_lens. ``load`` raises ``FileNotFoundError``
    when there is no entry, and :class:`CacheError` (or ``ValueError``, ``KeyError``,
    ``TypeError``) when the entry cannot be trusted: such an entry is discarded with
    a warning that gives the reason, then rebuilt.

    Args:
        path: the entry's file.
        compute: makes the value when no usable entry exists.
        load: reads and verifies the entry.
        save: writes the value (atomically: :func:`save_tensors` does).
        use_cache: ``False`` computes without reading or writing.
        write: ``False`` reads but never writes (on the ranks that do not save).

    Returns:
        The loaded or computed value.
    """
    if use_cache:
        try:
            return load(path)
        except FileNotFoundError:
            pass
        except (CacheError, ValueError, KeyError, TypeError) as err:
            discard(path, str(err))
    value = compute()
    if use_cache and write:
        save(path, value)
    return value
