"""Every hook rome_lens puts on a model, in one place.

Hooks are plain functions of ``(activation, hook)`` built by the factories
below, and they are only ever attached with :func:`attached`, which removes
them on exit, error or not. Forward hooks see (and may replace) an
activation; backward hooks see the gradient arriving at it.
So an exception anywhere in rome_lens never leaves a hook on your model, and
hooks you added yourself are never touched.

>>> import torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.core.hooks import add_at_positions, attached
>>> model = tiny_model()
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> noise = torch.ones(2, 1, model.cfg.d_model)  # two samples, one position
>>> hooks = [("hook_embed", add_at_positions(noise, slice(1, 2)))]
>>> with attached(model, hooks):
...     logits = model(tokens.expand(2, -1))
>>> logits.shape
torch.Size([2, 4, 400])

A backward hook reads gradients the same way:

>>> from rome_lens.core.hooks import record
>>> grads = []
>>> with attached(model, [], bwd_hooks=[("blocks.0.hook_mlp_out", record(grads))]):
...     model(tokens).sum().backward()
>>> grads[0].shape
torch.Size([1, 4, 64])
>>> model.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from rome_lens.core.backend import Model

__all__ = [
    "Hook",
    "add_at_positions",
    "add_at_rows",
    "add_product",
    "attached",
    "record",
    "set_at_position",
]

Hook = Callable[[Tensor, HookPoint], Tensor | None]
_levels = itertools.count(1_000_000)  # context levels of our own, apart from model.hooks()'s


@contextmanager
def attached(
    model: Model,
    fwd_hooks: Sequence[tuple[str, Hook]],
    *,
    bwd_hooks: Sequence[tuple[str, Hook]] = (),
) -> Iterator[None]:
    """Attach hooks for the duration of a ``with`` block, then remove exactly those.

    Like ``model.hooks(fwd_hooks=..., bwd_hooks=...)``, but the clean-up
    touches only the named hook points instead of every hook point in the
    model, which matters in a loop of thousands of short forward calls.

    Args:
        model: the model to hook.
        fwd_hooks: ``(hook name, hook)`` pairs run on the forward pass.
        bwd_hooks: ``(hook name, hook)`` pairs run on the gradient of that activation.

    Yields:
        Nothing; the hooks are attached inside the block.

    Raises:
        ValueError: a hook name the model does not have (nothing is attached then).
    """
    level = next(_levels)
    attachments = [(name, fn, "fwd") for name, fn in fwd_hooks]
    attachments += [(name, fn, "bwd") for name, fn in bwd_hooks]
    unknown = [name for name, _, _ in attachments if name not in model.hook_dict]
    if unknown:
        raise ValueError(f"the model has no hook point {unknown[0]!r}")
    points = [(model.hook_dict[name], direction) for name, _, direction in attachments]
    try:
        for (point, direction), (_, fn, _) in zip(points, attachments, strict=True):
            point.add_hook(fn, dir=direction, level=level)
        yield
    finally:
        for point, direction in points:
            point.remove_hooks(direction, level=level)


def add_at_positions(values: Float[Tensor, "batch n_pos d"], positions: slice) -> Hook:
    """Add ``values`` to the activation at ``positions`` (the corruption of causal tracing).

    Args:
        values: ``[batch n_pos d]`` values to add.
        positions: the positions they are added at.

    Returns:
        The hook.
    """

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        act = act.clone()
        act[:, positions] += values.to(act)
        return act

    return hook


def set_at_position(
    rows: Int[Tensor, " n"], position: int, values: Float[Tensor, "n d"] | Float[Tensor, " d"]
) -> Hook:
    """Overwrite batch ``rows`` of the activation at ``position`` (restoring or freezing).

    Args:
        rows: the batch rows to overwrite.
        position: the position to overwrite.
        values: one row of values per batch row, or one row for all.

    Returns:
        The hook.
    """

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        act[rows.to(act.device), position] = values.to(act)
        return act

    return hook


def record(store: list[Tensor]) -> Hook:
    """Append a detached copy of the activation (or gradient) to ``store``.

    Args:
        store: the list the copies are appended to.

    Returns:
        The hook (it leaves the activation as it is).
    """

    def hook(act: Tensor, hook: HookPoint) -> None:
        store.append(act.detach().clone())

    return hook


def add_at_rows(
    rows: Int[Tensor, " n"], positions: Int[Tensor, " n"], values: Float[Tensor, "n d"] | Tensor
) -> Hook:
    """Add ``values[i]`` at ``(rows[i], positions[i])``, keeping the autograd graph (ROME's δ).

    Args:
        rows: batch rows.
        positions: one position per row.
        values: one row of values per (row, position), or one row for all.

    Returns:
        The hook.
    """

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        shift = torch.zeros_like(act)
        index = (rows.to(act.device), positions.to(act.device))
        shift = shift.index_put(index, values.to(act).expand(len(rows), -1))
        return act + shift

    return hook


def add_product(keys: list[Tensor], weight: Tensor) -> Hook:
    """Add ``keys[-1] @ weight`` (the last recorded MLP key times a weight change).

    Args:
        keys: a list whose last entry is the key (filled by a :func:`record` hook).
        weight: the weight change ``[d_mlp d_model]``.

    Returns:
        The hook.
    """

    def hook(act: Tensor, hook: HookPoint) -> Tensor:
        return act + keys[-1] @ weight.to(act)

    return hook
