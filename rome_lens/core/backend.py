"""The one seam between rome_lens and TransformerLens: TL 3 and TL 4 behind the same calls.

TransformerLens 3 models are ``HookedTransformer``\\ s; TransformerLens 4
removed that class in favour of ``TransformerBridge``, which wraps a Hugging
Face model and keeps TL's hook names (``hook_embed``,
``blocks.{L}.hook_resid_pre``, ``blocks.{L}.mlp.hook_post``, ...). The two
differ exactly where rome_lens is fast or edits weights, so every such call
goes through this module and nothing else in the package asks which TL it
runs on:

* :func:`forward` runs a slice of the model, TL 3's ``start_at_layer`` /
  ``stop_at_layer`` / ``past_kv_cache`` semantics on both. On the bridge it
  calls the wrapped blocks directly: a restart at layer ``k`` runs no earlier
  block, and a prefix KV cache is really read (the bridge's own ``forward``
  ignores ``past_kv_cache`` and still runs blocks ``0..k-1``);
* :func:`new_kv_cache`, :func:`freeze`, :func:`cached_keys_values` and
  :func:`prefix_cache` make, read and rebuild prefix KV caches;
* :func:`weight` and :func:`named_weights` give weights by TL name and in TL's
  orientation (``blocks.{L}.mlp.W_out`` is ``[d_mlp d_model]``) as live views:
  an in-place write under ``no_grad`` edits the model, on ``nn.Linear`` and
  GPT-2's ``Conv1D`` alike; a bias the model lacks reads as zeros;
* :func:`mlp_output_hook` names the hook point of ``W_out``'s own output,
  which is not ``hook_mlp_out`` on families that normalise after the MLP.

>>> import torch
>>> from rome_lens.core.backend import forward, is_bridge, transformer_lens_major, weight
>>> from rome_lens.core.models import tiny_model
>>> model = tiny_model()
>>> is_bridge(model) == (transformer_lens_major() >= 4)
True
>>> tokens = torch.tensor([[0, 5, 9, 3]])
>>> resid = forward(model, tokens, stop_at_layer=1)  # the residual entering block 1
>>> logits = forward(model, resid, start_at_layer=1)  # and on from there
>>> torch.allclose(logits, model(tokens), atol=1e-5)
True
>>> weight(model, "blocks.1.mlp.W_out").shape
torch.Size([256, 64])
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rome_lens.core.precision import model_device, model_dtype

__all__ = [
    "CHECKED_ARCHITECTURES",
    "Model",
    "cached_keys_values",
    "check_architecture",
    "copy_model",
    "forward",
    "freeze",
    "is_bridge",
    "mlp_output_hook",
    "named_weights",
    "new_kv_cache",
    "parameter",
    "prefix_cache",
    "transformer_lens_major",
    "unembed",
    "weight",
]

Model = Any
"""A TransformerLens model: ``HookedTransformer`` (TL 3) or ``TransformerBridge`` (TL 4)."""

# Bridged architectures whose blocks, run one by one here, were checked against the
# bridge's own full forward pass (tests/test_backends.py). Others are refused rather
# than run with inputs their blocks may need and not get (ALiBi biases, say).
CHECKED_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "GPTJForCausalLM",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
)
_MLP_WEIGHT = re.compile(r"^blocks\.(\d+)\.mlp\.(W_in|W_gate|W_out|b_in|b_out)$")


def transformer_lens_major() -> int:
    """The installed TransformerLens's major version.

    Returns:
        3 (``HookedTransformer``) or 4 (``TransformerBridge``).
    """
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


def is_bridge(model: Model) -> bool:
    """Whether ``model`` is a TL 4 ``TransformerBridge`` (else a TL 3 ``HookedTransformer``).

    Args:
        model: a TransformerLens model.

    Returns:
        ``True`` for a bridge.
    """
    return hasattr(model, "original_model") and hasattr(model, "adapter")


# --------------------------------------------------------------------------- weights


def weight(model: Model, name: str) -> Tensor:
    """The weight ``name`` in TL's orientation, as a live view of the model's parameter.

    Args:
        model: a TransformerLens model.
        name: a TL parameter name, e.g. ``blocks.3.mlp.W_out`` (``[d_mlp d_model]``).

    Returns:
        The weight. Writing into it under ``torch.no_grad()`` edits the model.
        An MLP bias the model lacks is a new zeros tensor.

    Raises:
        ValueError: the model has no such weight.
    """
    if not is_bridge(model):
        return _tl3_parameter(model, name)
    layer, kind = _bridge_mlp_weight(model, name)
    mlp = model.blocks[layer].mlp
    value = getattr(mlp, kind, None)
    if value is None and kind.startswith("b_"):
        width = model.cfg.d_model if kind == "b_out" else model.cfg.d_mlp
        return torch.zeros(width, device=model_device(model), dtype=model_dtype(model))
    if not isinstance(value, Tensor):
        raise ValueError(f"the model has no parameter {name!r}")
    return value


def parameter(model: Model, name: str) -> torch.nn.Parameter:
    """The ``nn.Parameter`` that holds the TL weight ``name``, for training it.

    On TL 3 it is the weight itself. On the bridge it is the wrapped Hugging
    Face module's parameter, in that module's layout (``nn.Linear`` stores
    ``W_out`` transposed), so train it and copy it back as it is.

    Args:
        model: a TransformerLens model.
        name: a TL parameter name, e.g. ``blocks.3.mlp.W_out``.

    Returns:
        The parameter.

    Raises:
        ValueError: the model has no such parameter.
    """
    if not is_bridge(model):
        return _tl3_parameter(model, name)
    layer, kind = _bridge_mlp_weight(model, name)
    part = getattr(model.blocks[layer].mlp, kind.split("_")[1], None)
    held = getattr(part, "weight" if kind.startswith("W") else "bias", None)
    if not isinstance(held, torch.nn.Parameter):
        raise ValueError(f"the model has no parameter {name!r}")
    return held


def _tl3_parameter(model: Model, name: str) -> torch.nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as err:
        raise ValueError(f"the model has no parameter {name!r}") from err


def _bridge_mlp_weight(model: Model, name: str) -> tuple[int, str]:
    """``(layer, kind)`` of a TL MLP weight name; the bridge gives TL names to these only."""
    found = _MLP_WEIGHT.match(name)
    if found is None or int(found.group(1)) >= model.cfg.n_layers:
        raise ValueError(
            f"the model has no parameter {name!r}: expected blocks.L.mlp.W_in, W_gate, "
            f"W_out, b_in or b_out with L < {model.cfg.n_layers}"
        )
    return int(found.group(1)), found.group(2)


def named_weights(model: Model) -> Iterator[tuple[str, Tensor]]:
    """Every weight of the model, under TL names where TL has one, in a stable order.

    The bridge's own ``named_parameters`` uses Hugging Face paths, so a
    fingerprint built on it would not know which block a weight belongs to.

    Args:
        model: a TransformerLens model.

    Yields:
        ``(name, tensor)`` pairs; MLP weights as ``blocks.{L}.mlp.W_in/W_gate/W_out/b_in/b_out``.
    """
    if not is_bridge(model):
        yield from sorted(model.named_parameters())
        return
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:  # tied embeddings appear twice
            seen.add(key)
            yield _tl_name(name), tensor


def _tl_name(bridge_name: str) -> str:
    """``blocks.3.mlp.out.weight`` → ``blocks.3.mlp.W_out``; other names unchanged."""
    found = re.match(r"^(blocks\.\d+\.mlp)\.(in|gate|out)\.(weight|bias)$", bridge_name)
    if found is None:
        return bridge_name
    prefix, part, kind = found.groups()
    return f"{prefix}.{'W' if kind == 'weight' else 'b'}_{part}"


def copy_model(model: Model) -> Model:
    """A deep copy of ``model``, weights and all, that shares nothing with it.

    A TL 4 bridge keeps some of its last forward's activations on its modules,
    with their autograd graph, and ``copy.deepcopy`` refuses such tensors; the
    copy gets them detached (the next forward overwrites them anyway).

    Args:
        model: a TransformerLens model.

    Returns:
        The copy.
    """
    scratch = {
        id(value): value.detach()
        for module in model.modules()
        for value in vars(module).values()
        if isinstance(value, Tensor) and not value.is_leaf
    }
    return copy.deepcopy(model, memo=scratch)


def mlp_output_hook(model: Model, layer: int) -> str:
    """The hook point of ``blocks.{layer}.mlp.W_out``'s output (``W_outᵀ k + b_out``).

    An edit of ``W_out`` changes exactly this activation, so editors add their
    δ here and influence reads ``W_out``'s output gradient here. It is
    ``hook_mlp_out`` unless the block normalises the MLP's output before
    adding it to the residual stream (Gemma 2, OLMo 2): there ``hook_mlp_out``
    comes after that norm, and an edit tuned on it would not be the edit the
    new weights make. The bridge's MLP component has its own ``hook_out``
    before the norm; TL 3's ``HookedTransformer`` has none, so it is refused.

    Args:
        model: a TransformerLens model.
        layer: the block.

    Returns:
        The hook point's name.

    Raises:
        ValueError: a TL 3 model that normalises after its MLPs.
    """
    if is_bridge(model):
        return f"blocks.{layer}.mlp.hook_out"
    if getattr(model.cfg, "use_normalization_before_and_after", False):
        raise ValueError(
            "this HookedTransformer normalises each MLP's output (use_normalization_before_"
            "and_after=True), so hook_mlp_out is not W_out's output and TransformerLens 3 "
            "has no hook point that is; load the model as a TransformerLens 4 "
            "TransformerBridge to edit it or compute its influence"
        )
    return f"blocks.{layer}.hook_mlp_out"


# --------------------------------------------------------------------------- running


def forward(
    model: Model,
    input: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    *,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    past_kv_cache: Any = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    return_type: Literal["logits"] | None = "logits",
) -> Any:
    """TL 3's ``model(input, start_at_layer=..., stop_at_layer=..., past_kv_cache=...)``, on both.

    Args:
        model: a TransformerLens model.
        input: token ids, or the residual entering ``start_at_layer``.
        start_at_layer: the first block to run (``input`` is then a residual).
        stop_at_layer: run blocks before this one and return the residual
            entering it (``n_layers``: the final residual, before ``ln_final``).
        past_kv_cache: a cache from :func:`new_kv_cache` (extended unless frozen)
            or :func:`prefix_cache`.
        attention_mask: 1 on real tokens, for the positions of ``input`` (or of
            the cache's positions followed by ``input``'s).
        return_type: ``"logits"``, or ``None`` to return nothing.

    Returns:
        Logits ``[batch pos d_vocab]``, a residual ``[batch pos d_model]`` (with
        ``stop_at_layer``), or ``None`` (with ``return_type=None``).
    """
    if not is_bridge(model):
        return model(
            input,
            start_at_layer=start_at_layer,
            stop_at_layer=stop_at_layer,
            past_kv_cache=past_kv_cache,
            attention_mask=attention_mask,
            return_type=return_type,
        )
    check_architecture(model)
    n_layers = model.cfg.n_layers
    start = 0 if start_at_layer is None else start_at_layer
    stop = n_layers if stop_at_layer is None else stop_at_layer
    if not 0 <= start <= stop <= n_layers:
        raise ValueError(f"need 0 <= start_at_layer <= stop_at_layer <= {n_layers}")
    width = input.shape[1]
    past = past_kv_cache.mask if _is_bridge_cache(past_kv_cache) else None
    current = _current_mask(attention_mask, width, past, input.device)
    full = current if past is None else torch.cat([past.to(current), current], dim=1)
    positions = (full.cumsum(1) - 1).clamp(min=0)[:, -width:]
    if start_at_layer is None:
        resid = model(input, stop_at_layer=0, position_ids=positions)
    else:
        resid = input
    resid = _run_blocks(model, resid, start, stop, positions, full, past_kv_cache)
    if _is_bridge_cache(past_kv_cache) and not past_kv_cache.frozen:
        past_kv_cache.mask = full
    if stop_at_layer is not None:
        return resid
    if return_type is None:
        return None
    return unembed(model, resid)


def check_architecture(model: Model) -> None:
    """Refuse a bridge whose blocks rome_lens has not checked against a full forward pass.

    Args:
        model: a TransformerLens model (a TL 3 model always passes).

    Raises:
        NotImplementedError: a bridged architecture outside ``CHECKED_ARCHITECTURES``.
    """
    if not is_bridge(model):
        return
    architecture = getattr(model.cfg, "architecture", None)
    if architecture not in CHECKED_ARCHITECTURES:
        raise NotImplementedError(
            f"rome_lens runs a TransformerBridge's blocks one by one and has checked that "
            f"only for {', '.join(CHECKED_ARCHITECTURES)}; {architecture} is not among them"
        )


def unembed(model: Model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits of final residuals: ``ln_final``, then the unembedding (for these rows only).

    Args:
        model: a TransformerLens model.
        resid: rows of the final residual stream, ``[... d_model]``.

    Returns:
        ``[... d_vocab]`` logits.
    """
    if not is_bridge(model):
        flat = resid.reshape(-1, 1, resid.shape[-1])
        logits = model(flat, start_at_layer=model.cfg.n_layers)[:, 0]
        return logits.reshape(*resid.shape[:-1], -1)
    logits = model.unembed(model.ln_final(resid))
    return model.adapter.apply_output_logits_transform(logits)


def _current_mask(
    mask: Tensor | None, width: int, past: Tensor | None, device: torch.device
) -> Tensor:
    """The attention mask of the ``width`` positions being run, on ``device`` (the input's)."""
    if mask is None:
        rows = 1 if past is None else past.shape[0]
        return torch.ones(rows, width, dtype=torch.long, device=device)
    return mask[:, -width:].long().to(device)


def _run_blocks(
    model: Model,
    resid: Tensor,
    start: int,
    stop: int,
    positions: Tensor,
    mask: Tensor,
    cache: Any,
) -> Tensor:
    """Blocks ``[start, stop)`` of a bridge on ``resid``, reading and extending ``cache``."""
    if start == stop:
        return resid
    positions = positions.expand(resid.shape[0], -1).to(resid.device)
    mask = mask.expand(resid.shape[0], -1).to(resid.device)
    kwargs = _block_kwargs(model, resid, positions, mask, cache)
    for layer in range(start, stop):
        out = model.blocks[layer](resid, **kwargs[layer])
        resid = out[0] if isinstance(out, tuple) else out
    return resid


def _block_kwargs(
    model: Model, resid: Tensor, positions: Tensor, mask: Tensor, cache: Any
) -> list[dict[str, Any]]:
    """The keyword arguments of each wrapped block: masks, positions, rotary angles, cache."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = model.original_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    made = {
        "config": config,
        "inputs_embeds": resid,
        "attention_mask": mask,
        "cache": cache,
        "position_ids": positions,
    }
    types = getattr(config, "layer_types", None) or ["full_attention"] * model.cfg.n_layers
    masks = {"full_attention": create_causal_mask(**made)}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**made)
    base: dict[str, Any] = {"position_ids": positions}
    if cache is not None:
        # transformers 5.25 names the cache `cache`; TL 4's attention reads only
        # `past_key_values` or `layer_past`, which every block passes on to it.
        base.update(cache=cache, layer_past=cache, use_cache=True)
    rotary = _rotary(model, resid, positions, set(types))
    return [
        {**base, "attention_mask": masks.get(kind, masks["full_attention"]), **rotary.get(kind, {})}
        for kind in types
    ]


def _rotary(
    model: Model, resid: Tensor, positions: Tensor, kinds: set[str]
) -> dict[str, dict[str, Any]]:
    """``position_embeddings`` (cos, sin) for each layer type, for models with rotary angles."""
    if "rotary_emb" in model._modules:
        rotary = model.rotary_emb
    else:  # GPT-J keeps its rotary module on the Hugging Face model only
        base = getattr(model.original_model, "base_model", model.original_model)
        rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return {}
    per_type = "layer_type" in _parameters(getattr(rotary, "original_component", rotary))
    return {
        kind: {
            "position_embeddings": rotary(resid, positions, kind)
            if per_type
            else rotary(resid, positions)
        }
        for kind in kinds
    }


def _parameters(module: torch.nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


# --------------------------------------------------------------------------- KV caches


def _bridge_cache(**kwargs: Any) -> Any:
    """A Hugging Face ``DynamicCache`` that remembers its positions' mask and can be frozen."""
    from transformers import DynamicCache

    class BridgeCache(DynamicCache):
        rome_lens_cache = True

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.frozen = False
            self.mask: Tensor | None = None

        def update(
            self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any
        ) -> tuple[Tensor, Tensor]:
            if not self.frozen:
                return super().update(key_states, value_states, layer_idx, *args, **kw)
            layer: Any = self.layers[layer_idx]
            keys = torch.cat([layer.keys, key_states], dim=-2)
            return keys, torch.cat([layer.values, value_states], dim=-2)

    return BridgeCache(**kwargs)


def _is_bridge_cache(cache: Any) -> bool:
    return getattr(cache, "rome_lens_cache", False)


def new_kv_cache(model: Model, batch: int) -> Any:
    """An empty KV cache for ``batch`` sequences; each :func:`forward` given it extends it.

    Args:
        model: a TransformerLens model.
        batch: the number of sequences.

    Returns:
        The cache (TL 3's ``TransformerLensKeyValueCache`` or, on the bridge, a
        Hugging Face ``DynamicCache``).
    """
    if not is_bridge(model):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        return TransformerLensKeyValueCache.init_cache(model.cfg, model_device(model), batch)
    return _bridge_cache(config=model.original_model.config)


def freeze(cache: Any) -> None:
    """Stop ``cache`` from growing: later runs read its positions but add none.

    Args:
        cache: a cache from :func:`new_kv_cache`.
    """
    if _is_bridge_cache(cache):
        cache.frozen = True
    else:
        cache.freeze()


def cached_keys_values(
    model: Model, cache: Any
) -> list[
    tuple[Float[Tensor, "batch pos kv_head d_head"], Float[Tensor, "batch pos kv_head d_head"]]
]:
    """Each layer's cached keys and values, ``[batch pos kv_head d_head]``.

    Args:
        model: the model that filled the cache.
        cache: a cache from :func:`new_kv_cache`.

    Returns:
        One ``(keys, values)`` pair per layer.
    """
    if _is_bridge_cache(cache):
        layers: list[Any] = list(cache.layers)
        return [(kv.keys.transpose(1, 2), kv.values.transpose(1, 2)) for kv in layers]
    return [(entry.past_keys, entry.past_values) for entry in cache.entries]


def prefix_cache(
    model: Model,
    layer: int,
    keys: Float[Tensor, "batch pos kv_head d_head"],
    values: Float[Tensor, "batch pos kv_head d_head"],
) -> Any:
    """A frozen cache whose ``layer`` holds ``keys`` and ``values``, for a run of that layer alone.

    Args:
        model: the model.
        layer: the block that reads the cache.
        keys: the prefix's keys at that block.
        values: the prefix's values at that block.

    Returns:
        The cache, frozen.
    """
    mask = torch.ones(keys.shape[0], keys.shape[1], dtype=torch.long, device=keys.device)
    if not is_bridge(model):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entry = TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
        entries = [entry] * model.cfg.n_layers  # start_at_layer reads only this layer's entry
        return TransformerLensKeyValueCache(entries, mask.int(), frozen=True)
    pair = (keys.transpose(1, 2), values.transpose(1, 2))
    config = model.original_model.config
    cache = _bridge_cache(ddp_cache_data=[pair] * model.cfg.n_layers, config=config)
    cache.frozen, cache.mask = True, mask
    return cache
