"""Fingerprints that tell models apart, for caches and saved edits.

A key statistic of layer ``L`` and an edit of ``blocks.{L}.mlp.W_out`` are only
meaningful on the model they were computed from. :func:`model_fingerprint`
summarises a model's config (with whether it prepends BOS) and weights in a
short hex string, and ``upto_layer=L`` restricts it to the weights that the MLP
key of layer ``L`` (``blocks.{L}.mlp.hook_post``) depends on: the embeddings,
every block before ``L`` and the attention and MLP input of block ``L``. Editing
``blocks.{L}.mlp.W_out`` therefore leaves that fingerprint unchanged, which is
what lets edits be stacked at one layer and reuse one set of statistics.

Each weight contributes its name, shape, dtype, its float64 sum and norm and
a strided sample of its values: cheap (no copy of the model) and different for
any two models that differ in more than a few cancelling entries. A model's
fingerprint is remembered until one of its weights changes (tracked by the
tensors' version counters), so asking again costs microseconds.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.core.fingerprint import model_fingerprint
>>> a, b = tiny_model(seed=0), tiny_model(seed=1)
>>> model_fingerprint(a) == model_fingerprint(b)
False
>>> same = tiny_model(seed=0)
>>> model_fingerprint(a, upto_layer=1) == model_fingerprint(same, upto_layer=1)
True
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref

import torch

from rome_lens.core.backend import Model, named_weights

__all__ = [
    "check_fingerprint",
    "check_layer",
    "hook_fingerprint",
    "hook_scope",
    "model_fingerprint",
]

_CONFIG_FIELDS = (
    "n_layers",
    "d_model",
    "d_mlp",
    "d_head",
    "n_heads",
    "n_key_value_heads",
    "d_vocab",
    "n_ctx",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "rotary_dim",
    "rotary_base",
    "gated_mlp",
    "parallel_attn_mlp",
    "final_rms",
    "eps",
    "dtype",
    "default_prepend_bos",  # a BOS before every prompt changes every activation after it
)
_SUM_BLOCK = 2**20  # entries of a weight summed at once in float64
_SAMPLES_PER_WEIGHT = 2048
# Hook points of block L whose activations no weight after blocks.{L}.mlp's input changes.
_BEFORE_MLP_OUT = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|ln1\.|attn\.|hook_attn_out|hook_resid_mid|ln2\."
    r"|mlp\.hook_pre|mlp\.hook_pre_linear|mlp\.hook_post)"
)
# model -> {weight name: (state of the weight read, its summary line)}
_SUMMARIES: weakref.WeakKeyDictionary[Model, dict[str, tuple[bytes, bytes]]] = (
    weakref.WeakKeyDictionary()
)
# model -> {upto_layer: (state of the weights read, fingerprint)}
_MEMO: weakref.WeakKeyDictionary[Model, dict[int | None, tuple[bytes, str]]] = (
    weakref.WeakKeyDictionary()
)


def check_layer(model: Model, layer: int) -> int:
    """``layer`` itself, after checking that ``blocks.{layer}.mlp.W_out`` exists.

    Args:
        model: the model.
        layer: the layer to check.

    Returns:
        ``layer``, unchanged.
    """
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
    if model.cfg.attn_only or not hasattr(model.blocks[layer], "mlp"):
        raise ValueError(
            f"the model has no blocks.{layer}.mlp.W_out (attn_only={model.cfg.attn_only}): "
            "rome_lens edits MLP output weights"
        )
    mlp = model.blocks[layer].mlp
    if not isinstance(getattr(mlp, "W_out", None), torch.Tensor):
        raise ValueError(
            f"blocks.{layer}.mlp ({type(mlp).__name__}) has no dense W_out to edit "
            "(mixture-of-experts MLPs are not supported)"
        )
    return layer


def _feeds_key(name: str, layer: int) -> bool:
    """Whether parameter ``name`` can change ``blocks.{layer}.mlp.hook_post``."""
    if not name.startswith("blocks."):
        return name.startswith(("embed.", "pos_embed."))
    block = int(name.split(".")[1])
    return block < layer or (block == layer and not name.endswith(("mlp.W_out", "mlp.b_out")))


def model_fingerprint(model: Model, *, upto_layer: int | None = None) -> str:
    """A 16-hex-digit summary of the config and weights (or those feeding ``upto_layer``'s key).

    Args:
        model: any TransformerLens model.
        upto_layer: ``None`` covers every weight; ``L`` only those that
            ``blocks.{L}.mlp.hook_post`` depends on.

    Returns:
        The fingerprint, a hex string.
    """
    if upto_layer is not None:
        check_layer(model, upto_layer)
    params = [
        (name, param)
        for name, param in named_weights(model)
        if upto_layer is None or _feeds_key(name, upto_layer)
    ]
    with torch.no_grad():
        samples = [_sample(_flat(param)) for _, param in params]
    # Version counters catch in-place updates; the samples catch writes through `.data`.
    state = hashlib.sha256(b"".join(samples))
    state.update(repr([(p.data_ptr(), p._version) for _, p in params]).encode())
    state.update(f"bos={getattr(model.cfg, 'default_prepend_bos', None)}".encode())
    memo = _MEMO.setdefault(model, {})
    if upto_layer in memo and memo[upto_layer][0] == state.digest():
        return memo[upto_layer][1]
    sha = hashlib.sha256()
    config = {field: str(getattr(model.cfg, field, None)) for field in _CONFIG_FIELDS}
    sha.update(json.dumps(config, sort_keys=True).encode())
    sha.update(f"upto_layer={upto_layer}".encode())
    for (name, param), sample in zip(params, samples, strict=True):
        sha.update(_summary(model, name, param, sample))
        sha.update(sample)
    fingerprint = sha.hexdigest()[:16]
    memo[upto_layer] = (state.digest(), fingerprint)
    return fingerprint


def _summary(model: Model, name: str, param: torch.Tensor, sample: bytes) -> bytes:
    """A weight's name, shape, dtype, sum and norm, remembered while the weight is unchanged
    (fingerprints of many layer prefixes then read each weight once)."""
    state = sample + f"|{param.data_ptr()}|{param._version}".encode()
    summaries = _SUMMARIES.setdefault(model, {})
    remembered = summaries.get(name)
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    total, norm = _sum_and_norm(_flat(param))  # row-major whatever the layout: alike sums
    line = f"{name}|{tuple(param.shape)}|{param.dtype}|{total:.17g}|{norm:.17g}".encode()
    summaries[name] = (state, line)
    return line


def _sum_and_norm(flat: torch.Tensor) -> tuple[float, float]:
    """A weight's sum and Euclidean norm in float64, a block at a time.

    Summing the whole weight with ``dtype=torch.float64`` first copies it to
    float64: for an embedding the size of Llama-3-8B's that copy is 4 GiB, the
    largest tensor rome_lens would form. Blocks of fixed size keep it to 8 MiB
    and round the same way on every call.
    """
    sums, squares = [], []
    with torch.no_grad():
        for block in flat.split(_SUM_BLOCK):
            wide = block.double()
            sums.append(wide.sum())
            squares.append(wide.square().sum())
    return torch.stack(sums).sum().item(), torch.stack(squares).sum().sqrt().item()


def _flat(param: torch.Tensor) -> torch.Tensor:
    return param.detach().reshape(-1)


def _sample(flat: torch.Tensor) -> bytes:
    """About 2,048 evenly spaced entries of a flattened weight, as bytes."""
    step = max(1, flat.numel() // _SAMPLES_PER_WEIGHT)
    return flat[::step].float().cpu().numpy().tobytes()


def check_fingerprint(found: str, expected: str, what: str) -> None:
    """Refuse a result made on another model: the one check every saved result runs.

    Args:
        found: the fingerprint of the model at hand.
        expected: the fingerprint the result recorded.
        what: the result, as the message names it (e.g. ``"this edit"``).

    Raises:
        ValueError: the fingerprints differ; the message gives both.
    """
    if found != expected:
        raise ValueError(
            f"{what} was computed on another model (fingerprint {expected}; "
            f"this model's is {found})"
        )


def hook_fingerprint(model: Model, hook: str, direction: str = "forward") -> str:
    """The fingerprint of the weights that a hook point's activations (or gradients) depend on.

    A forward activation in block ``L`` before the MLP's output depends only on
    the weights that ``upto_layer=L`` covers; anything else (a gradient, the
    residual stream after the MLP) may depend on every weight.

    Args:
        model: the model.
        hook: a hook point name, e.g. ``blocks.2.mlp.hook_post``.
        direction: ``"forward"`` (activations) or ``"backward"`` (gradients).

    Returns:
        The fingerprint, a hex string.
    """
    return model_fingerprint(model, upto_layer=hook_scope(model, hook, direction))


def hook_scope(model: Model, hook: str, direction: str = "forward") -> int | None:
    """The ``upto_layer`` of :func:`model_fingerprint` that covers a hook point's inputs.

    Args:
        model: the model.
        hook: a hook point name.
        direction: ``"forward"`` or ``"backward"``.

    Returns:
        A layer, or ``None`` for every weight.
    """
    found = _BEFORE_MLP_OUT.match(hook)
    if direction == "forward" and found and not model.cfg.attn_only:
        return int(found.group(1))
    return None
