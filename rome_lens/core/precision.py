"""Where rome_lens's work runs, and in what precision: the policy, written once.

A researcher hands rome_lens a model that is already where it should be, often
a GPU and bfloat16. Every computation follows the model:

* **device.** Activations, sums, solves and scores stay on :func:`model_device`;
  a result moves to the CPU once, when it is saved or shown (:func:`to_host`),
  never per batch.
* **compute.** Nothing is summed, solved or optimised in half precision: a
  bfloat16 or float16 model's activations are promoted to
  :func:`compute_dtype` (float32) first. Edits are solved in float64 and
  rounded once to the weight's dtype when written back.
* **accumulation.** Sums over a corpus (key statistics, Kronecker factors,
  the Microscope's moments) are held in :func:`accumulator_dtype` of the
  device: float64 where the device does float64 at speed (the CPU, where a
  float64 matmul costs twice a float32 one, and the data-centre GPUs with
  full-rate float64: P100, V100, A100, H100, H200, B200); float32 with Kahan
  compensation (:class:`RunningSum`) where it does not (consumer GPUs run
  float64 at 1/32 to 1/64 of float32; Apple's MPS has none). The choice shows
  in the result: its ``.dtype`` and ``.device``.

>>> import torch
>>> from rome_lens.core.precision import RunningSum, accumulator_dtype, compute_dtype
>>> accumulator_dtype(torch.device("cpu")), accumulator_dtype(torch.device("mps"))
(torch.float64, torch.float32)
>>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
(torch.float32, torch.float64)
>>> naive, kahan = torch.zeros(1), RunningSum(torch.float32)
>>> for _ in range(10_000):
...     step = torch.full((1,), 0.1)
...     naive += step
...     kahan.add(step)
>>> abs(naive.item() - 1000.0) > 1e-3, abs(kahan.value.item() - 1000.0) < 1e-4
(True, True)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "FULL_RATE_FLOAT64",
    "RunningSum",
    "accumulator_dtype",
    "available_memory",
    "compute_dtype",
    "dtype_name",
    "model_device",
    "model_dtype",
    "to_host",
]

FULL_RATE_FLOAT64: frozenset[tuple[int, int]] = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
"""CUDA compute capabilities whose float64 runs at half the float32 rate or better
(P100, V100, A100, H100/H200, B200); elsewhere float64 is 1/32 to 1/64 of it."""

_HALF = (torch.float16, torch.bfloat16)
_MEMINFO = Path("/proc/meminfo")


def model_device(model: nn.Module) -> torch.device:
    """The device the model's weights live on: where all of rome_lens's work runs.

    Read from the weights rather than ``cfg.device``, which ``model.cuda()`` or
    a bridge's ``.to()`` may leave stale.

    Args:
        model: any TransformerLens model (or torch module).

    Returns:
        The device of its first parameter.
    """
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights.

    Args:
        model: any TransformerLens model (or torch module).

    Returns:
        The dtype of its first floating-point parameter.
    """
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is promoted to before it is summed, solved or optimised.

    Half precision's 8 or 11 bits of mantissa lose a sum over a corpus.

    Args:
        dtype: the model's or the activations' dtype.

    Returns:
        ``torch.float32`` for float16 and bfloat16, else ``dtype`` itself.
    """
    return torch.float32 if dtype in _HALF else dtype


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of running sums on ``device``: float64 where it is fast, else float32.

    Args:
        device: where the sums live (the model's device).

    Returns:
        ``torch.float64`` on the CPU and on CUDA devices with full-rate float64
        (:data:`FULL_RATE_FLOAT64`); ``torch.float32`` (summed with Kahan
        compensation by :class:`RunningSum`) on the rest.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float64
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return torch.float64 if capability in FULL_RATE_FLOAT64 else torch.float32
    return torch.float32


def available_memory(device: torch.device | str) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, or the host's available memory.

    Args:
        device: the device.

    Returns:
        The bytes free (on devices that do not say, the host's).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    for line in _MEMINFO.read_text().splitlines() if _MEMINFO.exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def dtype_name(dtype: torch.dtype) -> str:
    """How saved results record a dtype.

    Args:
        dtype: the dtype.

    Returns:
        Its name without the ``torch.`` prefix (``"bfloat16"`` for ``torch.bfloat16``).
    """
    return str(dtype).removeprefix("torch.")


def to_host(tensor: Tensor) -> Tensor:
    """The one move a result makes, when it is saved or shown.

    Args:
        tensor: a result on any device.

    Returns:
        The tensor on the CPU, detached.
    """
    return tensor.detach().cpu()


class RunningSum:
    """A running sum in a given dtype, Kahan-compensated when that dtype is float32.

    Each ``add`` keeps the low-order bits the float32 sum dropped in a
    compensation term and feeds them back into the next ``add``, so a sum of
    millions of terms keeps float32's relative precision (about 1e-7) instead of
    losing it in proportion to the number of terms. In float64 it is a plain sum.
    The sum is created on the device and with the shape of the first tensor added.

    Args:
        dtype: the accumulator's dtype (see :func:`accumulator_dtype`).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.value: Tensor = torch.zeros(0, dtype=dtype)
        self._lost: Tensor | None = None  # Kahan's compensation, float32 only
        self._started = False

    @property
    def started(self) -> bool:
        """Whether anything was added yet."""
        return self._started

    def add(self, term: Tensor) -> None:
        """Add ``term`` (any dtype; promoted to the accumulator's)."""
        term = term.to(self.dtype)
        if not self._started:
            self.value = torch.zeros_like(term)
            self._lost = torch.zeros_like(term) if self.dtype != torch.float64 else None
            self._started = True
        if self._lost is None:
            self.value += term
            return
        corrected = term - self._lost
        total = self.value + corrected
        self._lost = (total - self.value) - corrected
        self.value = total
