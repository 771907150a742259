"""Every hook rome_lens puts on a model, in one place.

Hooks are plain functions of ``(activation, hook)`` built by the factories
below, and they are only ever attached with :func:`attached`, which removes
them on exit, error or not.
So an exception anywhere in rome_lens never leaves a hook on your model, and
hooks you added yourself are never touched.

>>> import torch
>>> from rome_lens import tiny_model
>>> from rome_lens.hooks import add_at_positions, attached
>>> model = tiny_model()
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> noise = torch.ones(2, 1, model.cfg.d_model)  # two samples, one position
>>> hooks = [("hook_embed", add_at_positions(noise, slice(1, 2)))]
>>> with attached(model, hooks):
...     logits = model(tokens.expand(2, -1))
>>> logits.shape
torch.Size([2, 4, 400])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

__all__ = [
    "add_at_positions",
    "add_at_rows",
    "add_product",
    "attached",
    "capture",
    "set_at_position",
]

Hook = Callable[[Tensor, HookPoint], Tensor]
_levels = itertools.count(1_000_000)  # context levels of our own, apart from model.hooks()'s


@contextmanager
def attached(model: HookedTransformer, fwd_hooks: Sequence[tuple[str, Hook]]) -> Iterator[None]:
    """Attach forward hooks for the duration of a ``with`` block, then remove exactly those.

    Like ``model.hooks(fwd_hooks=...)``, but the clean-up touches only the named
    hook points instead of every hook point in the model, which matters in a
    loop of thousands of short forward calls.
    """
    level = next(_levels)
    points = [model.hook_dict[name] for name, _ in fwd_hooks]
    try:
        for point, (_, fn) in zip(points, fwd_hooks, strict=True):
            point.add_hook(fn, dir="fwd", level=level)  # type: ignore[arg-type]
        yield
    finally:
        for point in points:
            point.remove_hooks("fwd", level=level)


def add_at_positions(values: Float[Tensor, "batch n_pos d"], positions: slice) -> Hook:
    """Add ``values`` to the activation at ``positions`` (the corruption of causal tracing)."""

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        act = act.clone()
        act[:, positions] += values.to(act)
        return act

    return hook


def set_at_position(
    rows: Int[Tensor, " n"], position: int, values: Float[Tensor, "n d"] | Float[Tensor, " d"]
) -> Hook:
    """Overwrite batch ``rows`` of the activation at ``position`` (restoring or freezing)."""

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        act[rows.to(act.device), position] = values.to(act)
        return act

    return hook


def capture(store: list[Tensor]) -> Hook:
    """Append a detached copy of the activation to ``store`` (reading keys and values)."""

    def hook(act: Tensor, hook: HookPoint) -> Tensor:
        store.append(act.detach().clone())
        return act

    return hook


def add_at_rows(
    rows: Int[Tensor, " n"], positions: Int[Tensor, " n"], values: Float[Tensor, "n d"] | Tensor
) -> Hook:
    """Add ``values[i]`` at ``(rows[i], positions[i])``, keeping the autograd graph (ROME's δ)."""

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        shift = torch.zeros_like(act)
        shift = shift.index_put((rows, positions), values.to(act).expand(len(rows), -1))
        return act + shift

    return hook


def add_product(keys: list[Tensor], weight: Tensor) -> Hook:
    """Add ``keys[-1] @ weight`` (the last captured MLP key times a weight change)."""

    def hook(act: Tensor, hook: HookPoint) -> Tensor:
        return act + keys[-1] @ weight.to(act)

    return hook
