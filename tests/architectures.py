"""Tiny random models of each architecture family, built offline from Hugging Face configs.

Every family gets the same byte-level BPE tokenizer as ``tiny_model()`` and
the same small shape (3 blocks, d_model 64, 4 heads, d_mlp 128), with biases
given random values where the family has them, so every term of the maths is
exercised. They are wrapped as TransformerLens 4 bridges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers

from rome_lens.core.models import _caller_rng_kept, _tiny_tokenizer, bridge_from_hf

SHAPE = {"layers": 3, "d_model": 64, "heads": 4, "d_mlp": 128, "n_ctx": 64}


def _common(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_like(config_class: type, **extra: Any) -> Callable[[Any], Any]:
    """Gated MLP, RMSNorm, rotary, grouped-query attention (2 key-value heads)."""

    def config(tokenizer: Any) -> Any:
        return config_class(
            hidden_size=SHAPE["d_model"],
            intermediate_size=SHAPE["d_mlp"],
            num_hidden_layers=SHAPE["layers"],
            num_attention_heads=SHAPE["heads"],
            num_key_value_heads=2,
            max_position_embeddings=SHAPE["n_ctx"],
            **extra,
            **_common(tokenizer),
        )

    return config


CONFIGS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "gpt2": (
        lambda tok: transformers.GPT2Config(
            n_layer=SHAPE["layers"], n_embd=SHAPE["d_model"], n_head=SHAPE["heads"],
            n_inner=SHAPE["d_mlp"], n_positions=SHAPE["n_ctx"], **_common(tok),
        ),
        "GPT2LMHeadModel",
    ),
    "gptj": (
        lambda tok: transformers.GPTJConfig(
            n_layer=SHAPE["layers"], n_embd=SHAPE["d_model"], n_head=SHAPE["heads"],
            n_inner=SHAPE["d_mlp"], n_positions=SHAPE["n_ctx"], rotary_dim=8, **_common(tok),
        ),
        "GPTJForCausalLM",
    ),
    "neox": (
        lambda tok: transformers.GPTNeoXConfig(
            hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["d_mlp"],
            num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
            max_position_embeddings=SHAPE["n_ctx"], rotary_pct=0.5, **_common(tok),
        ),
        "GPTNeoXForCausalLM",
    ),
    "llama": (_llama_like(transformers.LlamaConfig), "LlamaForCausalLM"),
    "mistral": (_llama_like(transformers.MistralConfig, sliding_window=32), "MistralForCausalLM"),
    "qwen2": (_llama_like(transformers.Qwen2Config), "Qwen2ForCausalLM"),
    "gemma": (_llama_like(transformers.GemmaConfig, head_dim=16), "GemmaForCausalLM"),
    "gemma2": (
        _llama_like(transformers.Gemma2Config, head_dim=16, sliding_window=32),
        "Gemma2ForCausalLM",
    ),
}  # fmt: skip
FAMILIES = sorted(CONFIGS)


def tiny_family(family: str, seed: int = 0) -> Any:
    """A random 3-block model of ``family`` as a ``TransformerBridge``."""
    tokenizer = _tiny_tokenizer()
    make_config, class_name = CONFIGS[family]
    with _caller_rng_kept():
        torch.manual_seed(seed)
        hf_model = getattr(transformers, class_name)(make_config(tokenizer))
        with torch.no_grad():
            for name, param in hf_model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.02)
    return bridge_from_hf(hf_model, tokenizer)
