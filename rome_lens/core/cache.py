"""The on-disk cache shared by every part of rome_lens.

Converted model weights and key statistics are expensive to compute and cheap
to store, so both live under one folder:

1. ``$ROME_LENS_CACHE`` if it is set,
2. else ``$XDG_CACHE_HOME/rome_lens``,
3. else ``~/.cache/rome_lens``.

Every entry is a safetensors file written atomically (to a temporary name, then
renamed), with its size, a SHA-256 digest of its bytes and free-form metadata in
a small JSON sidecar. A file that does not match its sidecar is reported as
corrupt, discarded and rebuilt, so an interrupted write or a flipped bit never
turns into a silently wrong model.

:func:`cached` is the one cache-or-compute every cached computation goes
through: each caller says how its entry is named (with :func:`cache_key`), read
and saved; the helper reads, discards an untrustworthy entry with a warning
that gives the reason, computes and saves. :func:`read_cached` is its read half,
for a computation that fills several entries at once.

>>> import tempfile
>>> from rome_lens.core.cache import cache_dir, load_tensors, save_tensors
>>> root = cache_dir(tempfile.mkdtemp())  # an explicit folder wins over the variables
>>> save_tensors(root / "demo.safetensors", {"C": torch.eye(2)}, {"layer": 3})
>>> tensors, meta = load_tensors(root / "demo.safetensors")
>>> meta
{'layer': 3}
>>> def load(path):
...     return load_tensors(path)[0]["C"]
>>> def save(path, value):
...     save_tensors(path, {"C": value}, {})
>>> cached(root / "eye.st", lambda: torch.eye(3), load=load, save=save).shape  # computed, saved
torch.Size([3, 3])
>>> cached(root / "eye.st", lambda: torch.zeros(1), load=load, save=save).shape  # read back
torch.Size([3, 3])
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

from rome_lens.core.distributed import Split, all_reduce_sum, is_main

T = TypeVar("T")

__all__ = [
    "CacheError",
    "cache_dir",
    "cached",
    "cache_key",
    "discard",
    "hit_on_every_rank",
    "load_tensors",
    "read_cached",
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


def read_cached(path: Path, load: Callable[[Path], T]) -> T | None:
    """The entry at ``path`` if it loads and verifies; ``None`` if there is none or it
    cannot be trusted, in which case it is discarded with a warning that gives the reason.

    The read half of :func:`cached`, for a caller that fills several entries in one
    computation (one pass over a corpus computes every missing hook's moments).

    Args:
        path: the entry's file.
        load: reads and verifies the entry; raises ``FileNotFoundError`` when there is
            none, and :class:`CacheError` (or ``ValueError``, ``KeyError``,
            ``TypeError``) when it cannot be trusted.

    Returns:
        The entry, or ``None``.
    """
    try:
        return load(path)
    except FileNotFoundError:
        return None
    except (CacheError, ValueError, KeyError, TypeError) as err:
        discard(path, str(err))
        return None


def cached(
    path: Path,
    compute: Callable[[], T],
    *,
    load: Callable[[Path], T],
    save: Callable[[Path, T], object],
    use_cache: bool = True,
    split: Split | None = None,
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
        save: writes the value (atomically, as :func:`save_tensors` does); what it
            returns is ignored (``Result.save`` returns the path).
        use_cache: ``False`` computes without reading or writing.
        split: the processes of a distributed computation: they all take the same
            branch (the entry is used only when every rank read it, otherwise every
            rank computes, so that the collectives in ``compute`` match), and only
            the main rank writes. ``None``: this process alone.

    Returns:
        The loaded or computed value.
    """
    found = read_cached(path, load) if use_cache else None
    if hit_on_every_rank(found is not None, split) and found is not None:
        return found
    value = compute()
    if use_cache and (split is None or is_main(split)):
        save(path, value)
    return value


def hit_on_every_rank(hit: bool, split: Split | None) -> bool:
    """Whether ``hit`` holds on every rank of ``split`` (on this process alone for ``None``).

    A collective: under a process group every rank must call it.

    Args:
        hit: this rank's answer (did it read its cache entry?).
        split: the processes, or ``None``.

    Returns:
        True only if every rank's ``hit`` is true.
    """
    if split is None:
        return hit
    misses = all_reduce_sum(torch.tensor([0 if hit else 1]), split)
    return int(misses) == 0
