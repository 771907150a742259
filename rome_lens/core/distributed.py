"""Running on several processes or machines with torch.distributed, as ``torchrun`` launches.

When a process group is initialised (``torchrun`` and
``torch.distributed.init_process_group``; gloo on CPU, NCCL on GPU), the
functions that scale with a corpus or a list of facts split their work:
each rank takes every ``world_size``-th item (:func:`shard`), and the partial
results are summed (:func:`all_reduce_sum`) or gathered (:func:`gather_rows`).
Only rank 0 writes caches and shows progress bars (:func:`is_main`). The same
call gives the same result on one process or many, up to the order of
floating-point sums. ``distributed=False`` keeps a call on its own process
inside a process group; ``distributed=True`` insists on one.

Nothing here pickles: only tensors cross between processes.

>>> from rome_lens.core.distributed import Split, shard
>>> split = Split.of(None)  # no process group here: one process does everything
>>> split.world_size, shard(list("abcde"), split)
(1, ['a', 'b', 'c', 'd', 'e'])
>>> shard(list("abcde"), Split(rank=1, world_size=2))  # what rank 1 of 2 would take
['b', 'd']
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Split",
    "all_reduce_max",
    "all_reduce_sum",
    "gather_bytes",
    "gather_rows",
    "is_main",
    "shard",
    "share_cores",
]

T = TypeVar("T")
_THREADS_AT_IMPORT = torch.get_num_threads()  # a different count later was the user's choice
_CORES_SHARED = False


@dataclass(frozen=True)
class Split:
    """Which share of the work this process does."""

    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """How many processes share the work."""

    @property
    def active(self) -> bool:
        """Whether results must be combined across processes."""
        return self.world_size > 1

    @classmethod
    def of(cls, distributed: bool | None) -> Split:
        """The split for a call's ``distributed`` argument.

        Args:
            distributed: ``None`` splits when a process group is initialised;
                ``True`` requires one; ``False`` never splits.

        Returns:
            This process's share.

        Raises:
            RuntimeError: ``distributed=True`` without an initialised process group.
        """
        initialised = dist.is_available() and dist.is_initialized()
        if distributed is True and not initialised:
            raise RuntimeError(
                "distributed=True needs a process group: launch with torchrun and call "
                "torch.distributed.init_process_group() first"
            )
        if distributed is False or not initialised:
            return cls()
        split = cls(dist.get_rank(), dist.get_world_size())
        share_cores(split)
        return split


def share_cores(split: Split) -> int:
    """Give each rank on this machine its share of the CPU cores, once per process.

    torch starts every process with a thread per core, so W ranks on one
    machine run W times as many threads as there are cores and slow each
    other several-fold. The first time work is split, each rank lowers its
    thread count to ``cores // ranks``, where the ranks on this machine are
    ``$LOCAL_WORLD_SIZE`` (torchrun sets it), else every rank when
    ``$MASTER_ADDR`` is this machine (``torch.multiprocessing.spawn`` and
    other single-machine launchers). A count already chosen wins:
    ``OMP_NUM_THREADS`` in the environment (torchrun sets it to 1 when it
    starts several ranks per machine and the variable is unset), or
    ``torch.set_num_threads`` called after importing rome_lens.

    Args:
        split: this process's share.

    Returns:
        The thread count this process now runs with.
    """
    global _CORES_SHARED
    threads = torch.get_num_threads()
    if _CORES_SHARED or not split.active:
        return threads
    _CORES_SHARED = True
    chosen = "OMP_NUM_THREADS" in os.environ or threads != _THREADS_AT_IMPORT
    share = max(1, _cores() // _ranks_here(split))
    if not chosen and threads > share:
        torch.set_num_threads(share)
    return torch.get_num_threads()


def _ranks_here(split: Split) -> int:
    """How many ranks share this machine: ``$LOCAL_WORLD_SIZE``, else all of them when the
    rendezvous address is this machine, else this one alone."""
    raw = os.environ.get("LOCAL_WORLD_SIZE")
    if raw is not None:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer, got {raw!r}")
        return int(raw)
    address = os.environ.get("MASTER_ADDR", "")
    local = address in ("localhost", "::1", socket.gethostname()) or address.startswith("127.")
    return split.world_size if local else 1


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def shard(items: Sequence[T], split: Split) -> list[T]:
    """This rank's items: every ``world_size``-th, starting at its rank.

    Args:
        items: all the work, in order.
        split: this process's share.

    Returns:
        The items this rank does (possibly none).
    """
    return list(items[split.rank :: split.world_size])


def is_main(split: Split) -> bool:
    """Whether this process writes caches and shows progress (rank 0, or no split).

    Args:
        split: this process's share.

    Returns:
        True on rank 0.
    """
    return split.rank == 0


def all_reduce_sum(tensor: Tensor, split: Split) -> Tensor:
    """The sum of ``tensor`` over every rank (the tensor itself without a split).

    Args:
        tensor: this rank's part.
        split: this process's share.

    Returns:
        The total, on every rank (a new tensor, on the input's device and dtype).
    """
    return _all_reduce(tensor, split, "sum")


def all_reduce_max(tensor: Tensor, split: Split) -> Tensor:
    """The element-wise maximum of ``tensor`` over every rank.

    Args:
        tensor: this rank's part.
        split: this process's share.

    Returns:
        The maximum, on every rank.
    """
    return _all_reduce(tensor, split, "max")


def _all_reduce(tensor: Tensor, split: Split, op: str) -> Tensor:
    if not split.active:
        return tensor
    total = tensor.detach().to(_device()).clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return total.to(tensor.device)


def gather_rows(rows: Tensor, split: Split) -> Tensor:
    """Every rank's rows, in the order :func:`shard` dealt the items out.

    Rank r's i-th row is item ``r + i · world_size``; the result puts it back there.

    Args:
        rows: ``[n_local ...]`` this rank's results, one row per item it did.
        split: this process's share.

    Returns:
        ``[n_total ...]`` every item's row, on every rank.
    """
    if not split.active:
        return rows
    device = _device()
    counts = torch.tensor([len(rows)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(counts) for _ in range(split.world_size)]
    dist.all_gather(sizes, counts)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    parts = [torch.zeros_like(padded) for _ in range(split.world_size)]
    dist.all_gather(parts, padded)
    total = int(sum(s.item() for s in sizes))
    out = torch.zeros((total, *rows.shape[1:]), dtype=rows.dtype)
    for rank, (part, size) in enumerate(zip(parts, sizes, strict=True)):
        out[rank :: split.world_size] = part[: int(size.item())].cpu()
    return out


def gather_bytes(items: Sequence[bytes], split: Split) -> list[bytes]:
    """Every rank's byte strings, in the order :func:`shard` dealt the items out.

    Args:
        items: this rank's items, each already encoded (e.g. ``Result.to_bytes()``).
        split: this process's share.

    Returns:
        Every item, on every rank.
    """
    if not split.active:
        return list(items)
    lengths = torch.tensor([len(b) for b in items], dtype=torch.long)
    buffer = torch.frombuffer(bytearray(b"".join(items)) or bytearray(1), dtype=torch.uint8)
    sizes = gather_rows(torch.tensor([[len(buffer)]], dtype=torch.long), split)[:, 0]
    device = _device()
    padded = torch.zeros(int(sizes.max()), dtype=torch.uint8, device=device)
    padded[: len(buffer)] = buffer.to(device)
    parts = [torch.zeros_like(padded) for _ in range(split.world_size)]
    dist.all_gather(parts, padded)
    counts = gather_rows(torch.tensor([[len(items)]], dtype=torch.long), split)[:, 0]
    all_lengths = _gather_ragged(lengths, counts, split)
    out: list[bytes] = [b""] * int(counts.sum())
    for rank, part in enumerate(parts):
        data, offset = part.cpu().numpy().tobytes(), 0
        for i, length in enumerate(all_lengths[rank]):
            out[rank + i * split.world_size] = data[offset : offset + length]
            offset += length
    return out


def _gather_ragged(values: Tensor, counts: Tensor, split: Split) -> list[list[int]]:
    """Each rank's list of integers (``counts[r]`` of them on rank r)."""
    device = _device()
    padded = torch.zeros(int(counts.max()), dtype=torch.long, device=device)
    padded[: len(values)] = values.to(device)
    parts = [torch.zeros_like(padded) for _ in range(split.world_size)]
    dist.all_gather(parts, padded)
    return [part[: int(n)].tolist() for part, n in zip(parts, counts, strict=True)]


def _device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
