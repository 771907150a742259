"""Fingerprints that tell models apart, for caches and saved edits.

A key statistic of layer ``L`` and an edit of ``blocks.{L}.mlp.W_out`` are only
meaningful on the model they were computed from. :func:`model_fingerprint`
summarises a model's config and weights in a short hex string, and
``upto_layer=L`` restricts it to the weights that the MLP key of layer ``L``
(``blocks.{L}.mlp.hook_post``) depends on: the embeddings, every block before
``L`` and the attention and MLP input of block ``L``. Editing
``blocks.{L}.mlp.W_out`` therefore leaves that fingerprint unchanged, which is
what lets edits be stacked at one layer and reuse one set of statistics.

Each weight contributes its name, shape, dtype, its float64 sum and norm and
a strided sample of its values: cheap (no copy of the model) and different for
any two models that differ in more than a few cancelling entries.

>>> import rome_lens
>>> from rome_lens.fingerprint import model_fingerprint
>>> a, b = rome_lens.tiny_model(seed=0), rome_lens.tiny_model(seed=1)
>>> model_fingerprint(a) == model_fingerprint(b)
False
>>> same = rome_lens.tiny_model(seed=0)
>>> model_fingerprint(a, upto_layer=1) == model_fingerprint(same, upto_layer=1)
True
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformer_lens import HookedTransformer

__all__ = ["check_layer", "model_fingerprint"]

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
)
_SAMPLES_PER_WEIGHT = 2048


def check_layer(model: HookedTransformer, layer: int) -> int:
    """``layer`` itself, after checking that ``blocks.{layer}.mlp.W_out`` exists."""
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


def model_fingerprint(model: HookedTransformer, *, upto_layer: int | None = None) -> str:
    """A 16-hex-digit summary of the config and weights (or those feeding ``upto_layer``'s key)."""
    if upto_layer is not None:
        check_layer(model, upto_layer)
    sha = hashlib.sha256()
    config = {field: str(getattr(model.cfg, field, None)) for field in _CONFIG_FIELDS}
    sha.update(json.dumps(config, sort_keys=True).encode())
    sha.update(f"upto_layer={upto_layer}".encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if upto_layer is not None and not _feeds_key(name, upto_layer):
                continue
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_WEIGHT)
            total = flat.sum(dtype=torch.float64).item()
            norm = torch.linalg.vector_norm(flat, dtype=torch.float64).item()
            sha.update(
                f"{name}|{tuple(param.shape)}|{param.dtype}|{total:.17g}|{norm:.17g}".encode()
            )
            sha.update(flat[::step].float().cpu().numpy().tobytes())
    return sha.hexdigest()[:16]
