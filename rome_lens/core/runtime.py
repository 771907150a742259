"""How rome_lens runs a model: weight layout, frozen parameters, padding, reading activations.

Every part of rome_lens runs a ``HookedTransformer`` in the same few ways, and
this module writes each of them once:

* :func:`linear_layout` stores the MLP and unembedding weights column-major
  while a block runs, so TransformerLens stops copying them on every call;
* :func:`frozen` turns off the model's own gradients while rome_lens optimises
  something outside it (a vector δ, a weight change);
* :func:`pad` stacks token sequences of different lengths with an attention mask;
* :func:`capture` runs the model only as far as the hooks it reads, and keeps
  only the (row, position) pairs asked for;
* :func:`run_to_layer` gives the residual stream entering a layer, and
  :func:`unembed` sends chosen residual rows through ``ln_final`` and the
  unembedding, so the vocabulary-sized matmul runs only where it is read.

>>> import torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.core.runtime import capture, pad, run_to_layer, unembed
>>> model = tiny_model()
>>> tokens, mask = pad([torch.tensor([0, 5, 9]), torch.tensor([0, 7])], 0, "right")
>>> keys = capture(model, tokens, ["blocks.1.mlp.hook_post"], at=(torch.tensor([0, 1]),
...                torch.tensor([2, 1])))
>>> keys["blocks.1.mlp.hook_post"].shape  # one key per (row, position) pair
torch.Size([2, 256])
>>> resid = run_to_layer(model, tokens, model.cfg.n_layers)
>>> torch.allclose(unembed(model, resid[:, -1]), model(tokens)[:, -1], atol=1e-5)
True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rome_lens.core import backend
from rome_lens.core.backend import Model
from rome_lens.core.hooks import Hook, attached
from rome_lens.core.precision import model_device

__all__ = [
    "PaddingSide",
    "capture",
    "capture_with_gradients",
    "frozen",
    "hook_layer",
    "linear_layout",
    "pad",
    "run_to_layer",
    "unembed",
]

PaddingSide = Literal["left", "right"]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@contextmanager
def linear_layout(model: Model) -> Iterator[None]:
    """Store the MLP and unembedding weights transposed while the block runs.

    TransformerLens calls ``F.linear(x, W.T.contiguous())``, which copies
    ``W`` on every forward pass unless ``W.T`` is already contiguous. Inside
    this block it is: each weight keeps its shape and values but gets
    column-major strides, so thousands of short forward passes stop copying
    ~30 MB each. The original tensors are put back on exit, error or not.

    Args:
        model: the model whose weights are re-strided.

    Yields:
        Nothing; the layout holds inside the block.
    """
    if backend.is_bridge(model):  # the bridge runs nn.Linear, which copies nothing
        yield
        return
    names = ("W_in", "W_gate", "W_out", "W_U")
    params = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in names]
    originals = [p.data for p in params]
    try:
        with torch.no_grad():
            for param in params:
                param.data = param.data.T.contiguous().T
        yield
    finally:
        for param, data in zip(params, originals, strict=True):
            param.data = data


@contextmanager
def frozen(model: Model) -> Iterator[None]:
    """No parameter of ``model`` gathers gradients inside the block; flags restored after.

    Editing optimises a vector or a weight change outside the model, so the
    model's own ~100M gradients would be wasted work (and would land in your
    ``.grad`` fields).

    Args:
        model: the model whose parameters are frozen.

    Yields:
        Nothing; the parameters are frozen inside the block.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def pad(
    sequences: Sequence[Tensor], pad_id: int, side: PaddingSide
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack 1-d token tensors into ``(tokens, attention_mask)``, padded on ``side``.

    Args:
        sequences: token ids, one 1-d tensor per sequence.
        pad_id: the id written into the padding.
        side: ``"right"`` (real tokens first) or ``"left"`` (real tokens last).

    Returns:
        ``tokens [batch pos]`` and ``attention_mask [batch pos]`` (1 on real tokens).
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("pad needs at least one sequence, got none")
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        tokens[i, span] = seq
        mask[i, span] = 1
    return tokens, mask


def hook_layer(name: str) -> int | None:
    """The block a hook point sits in (``blocks.3.mlp.hook_post`` → 3); ``None`` outside blocks.

    Args:
        name: a hook point name.

    Returns:
        The block index, or ``None``.
    """
    found = _BLOCK.match(name)
    return int(found.group(1)) if found else None


def capture(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    hook_names: Sequence[str],
    *,
    at: tuple[Int[Tensor, " n"], Int[Tensor, " n"]] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` just far enough to read ``hook_names``, and return their activations.

    Right padding needs no mask: under causal attention real tokens never see
    the pads that follow them. Left padding needs ``attention_mask``.

    Args:
        model: any TransformerLens model.
        tokens: ``[batch pos]`` token ids.
        hook_names: hook points to read, e.g. ``["blocks.2.mlp.hook_post"]``.
        at: ``(rows, positions)``: keep only these (row, position) pairs;
            ``None`` keeps the whole activation.
        attention_mask: passed to the model (needed for left padding).

    Returns:
        ``{hook name: activation}``, detached: ``[n ...]`` with ``at``, else ``[batch pos ...]``.
    """
    layers = [hook_layer(name) for name in hook_names]
    stop = None if None in layers else max(layer for layer in layers if layer is not None) + 1
    store: dict[str, Tensor] = {}

    def keep(name: str) -> Hook:
        def hook(act: Tensor, hook: object) -> Tensor:
            picked = act if at is None else act[at[0].to(act.device), at[1].to(act.device)]
            store[name] = picked.detach()
            return act

        return hook

    device = model_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    with attached(model, [(name, keep(name)) for name in hook_names]):
        backend.forward(
            model, tokens.to(device), attention_mask=mask, stop_at_layer=stop, return_type=None
        )
    return {name: store[name] for name in hook_names}


def capture_with_gradients(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    hook_names: Sequence[str],
    gradient_names: Sequence[str],
    loss: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations at some hooks, and the gradient of a scalar loss of the logits at others.

    Gradients start at the embeddings (``hook_embed`` becomes a leaf), so no
    weight gathers a gradient and ``requires_grad`` flags are never touched:
    only the activations named get one.

    Args:
        model: any TransformerLens model.
        tokens: ``[batch pos]`` token ids.
        hook_names: hook points whose activations are returned.
        gradient_names: hook points whose ``d loss / d activation`` is returned.
        loss: the scalar to differentiate, a function of the logits.
        attention_mask: passed to the model (needed for left padding).

    Returns:
        ``({hook: activation}, {hook: gradient})``, detached, each ``[batch pos ...]``.
    """
    store: dict[str, Tensor] = {}

    def leaf(act: Tensor, hook: object) -> Tensor:
        return act.detach().requires_grad_(True)

    def keep(name: str) -> Hook:
        def hook(act: Tensor, hook: object) -> None:
            store[name] = act

        return hook

    names = sorted({*hook_names, *gradient_names})
    device = model_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    with (
        torch.enable_grad(),
        attached(model, [("hook_embed", leaf)] + [(n, keep(n)) for n in names]),
    ):
        logits = backend.forward(model, tokens.to(device), attention_mask=mask)
        grads = torch.autograd.grad(loss(logits), [store[name] for name in gradient_names])
    gradients = {name: g.detach() for name, g in zip(gradient_names, grads, strict=True)}
    return {name: store[name].detach() for name in hook_names}, gradients


def run_to_layer(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` (``n_layers``: after the last block).

    Args:
        model: any TransformerLens model.
        tokens: ``[batch pos]`` token ids.
        layer: the block the residual stream enters.
        attention_mask: passed to the model (needed for left padding).

    Returns:
        ``[batch pos d_model]``: the residual stream before block ``layer``.
    """
    device = model_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    return backend.forward(model, tokens.to(device), attention_mask=mask, stop_at_layer=layer)


def unembed(model: Model, resid: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """Logits of final residual rows: ``ln_final`` then the unembedding, for these rows only.

    Args:
        model: any TransformerLens model.
        resid: ``[n d_model]`` rows of the final residual stream.

    Returns:
        ``[n d_vocab]`` logits.
    """
    return backend.unembed(model, resid)
