"""Every hook rome_lens puts on a model, in one place.

Hooks are plain functions of ``(activation, hook)`` built by the factories
below, and they are only ever attached with ``model.hooks(...)`` or
``model.run_with_hooks(...)``, both of which remove them on exit, error or not.
So an exception anywhere in rome_lens never leaves a hook on your model, and
hooks you added yourself are never touched.

>>> import torch
>>> from rome_lens import tiny_model
>>> from rome_lens.hooks import add_at_positions
>>> model = tiny_model()
>>> tokens = torch.tensor([[1, 2, 3, 4]])
>>> noise = torch.ones(2, 1, model.cfg.d_model)  # two samples, one position
>>> hooks = [("hook_embed", add_at_positions(noise, slice(1, 2)))]
>>> with model.hooks(fwd_hooks=hooks):
...     logits = model(tokens.expand(2, -1))
>>> logits.shape
torch.Size([2, 4, 97])
"""

from __future__ import annotations

from collections.abc import Callable

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

__all__ = ["add_at_positions", "add_at_position", "set_at_position", "store"]

Hook = Callable[[Tensor, HookPoint], Tensor]


def add_at_positions(values: Float[Tensor, "batch n_pos d"], positions: slice) -> Hook:
    """Add ``values`` to the activation at ``positions`` (the corruption of causal tracing)."""

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        act = act.clone()
        act[:, positions] += values.to(act.dtype)
        return act

    return hook


def add_at_position(values: Float[Tensor, "batch d"], position: Int[Tensor, " batch"]) -> Hook:
    """Add one vector per batch row at that row's ``position`` (ROME's δ on ``hook_mlp_out``)."""

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        rows = position.new_tensor(range(act.shape[0]))
        act = act.clone()
        act[rows, position] += values.to(act.dtype)
        return act

    return hook


def set_at_position(
    rows: Int[Tensor, " n"], position: int, values: Float[Tensor, "n d"] | Float[Tensor, " d"]
) -> Hook:
    """Overwrite the activation of batch ``rows`` at ``position`` (restoring or freezing a state)."""

    def hook(act: Float[Tensor, "batch pos d"], hook: HookPoint) -> Tensor:
        act[rows, position] = values.to(act.dtype)
        return act

    return hook


def store(into: dict[str, Tensor]) -> Hook:
    """Record the activation under the hook's name (for activations run_with_cache cannot reach)."""

    def hook(act: Tensor, hook: HookPoint) -> Tensor:
        assert hook.name is not None
        into[hook.name] = act.detach()
        return act

    return hook
