"""Shared fixtures: a tiny random model for logic, the default model for science."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import rome_lens
from rome_lens.core import backend
from rome_lens.core.backend import Model

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tiny() -> Model:
    """A 3-layer random GPT-2-style model with a byte-level BPE tokenizer."""
    return rome_lens.tiny_model(seed=0)


@pytest.fixture(scope="session")
def smol() -> Model:
    """The default model, SmolLM2-135M-Instruct (converted once, then cached), with BOS.

    The science tests and golden numbers were recorded with TransformerLens's BOS before
    every prompt; ``load_model()``'s own default (no BOS) has its tests in
    test_default_model.py::TestWithoutBOS.
    """
    torch.set_grad_enabled(True)
    return rome_lens.load_model(prepend_bos=True)


@pytest.fixture(scope="session")
def known_facts() -> list[dict[str, str]]:
    """The first 40 facts of ROME's known_1000.json that the default model answers top-1."""
    return json.loads((DATA / "known_smollm2.json").read_text())


@pytest.fixture(scope="session")
def all_known_facts() -> list[dict[str, str]]:
    """The first 400 facts of ROME's known_1000.json."""
    return json.loads((DATA / "known_facts.json").read_text())


def hooks_left(model: Model) -> int:
    """How many forward/backward hooks are attached anywhere in the model.

    A TL 4 bridge, and the Hugging Face model it wraps, wire a few permanent hooks of
    their own when first run; those are not counted.
    """
    return sum(
        not getattr(hook, "__module__", "").startswith(
            ("transformer_lens.model_bridge", "transformers.")
        )
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks)
        for hook in hooks.values()
    )


def weights(model: Model) -> dict[str, torch.Tensor]:
    """A copy of every weight, under TL names (``blocks.{L}.mlp.W_out``) on either backend."""
    return {name: p.detach().clone() for name, p in backend.named_weights(model)}


def assert_same_weights(model: Model, before: dict[str, torch.Tensor]) -> None:
    """Every parameter equals its copy in ``before``, bit for bit."""
    for name, p in backend.named_weights(model):
        assert torch.equal(p, before[name]), name


@contextmanager
def quiet(*categories: type[Warning]) -> Iterator[None]:
    """Ignore the given warning categories (a random model knows no fact, takes few edits)."""
    with warnings.catch_warnings():
        for category in categories or (UserWarning,):
            warnings.simplefilter("ignore", category)
        yield


def gpt2_like(
    tokenizer: Any,
    *,
    n_layers: int,
    d_model: int,
    d_mlp: int,
    n_ctx: int,
    act_fn: str,
    seed: int,
    perturbed: tuple[str, ...] = (),
) -> Model:
    """A random GPT-2-style model on the installed TransformerLens (4 heads, LayerNorm).

    ``perturbed`` names TL 3 parameter suffixes (``b_in``, ``b_out``, ``ln2.w``, ``ln2.b``)
    given random values, so that terms a fresh init leaves at zero or one are exercised.
    """
    from rome_lens.core.models import _caller_rng_kept, _hooked_transformer, bridge_from_hf

    def perturb(named: Iterator[tuple[str, torch.nn.Parameter]], suffixes: dict[str, str]) -> None:
        with torch.no_grad():
            for name, param in named:
                for tl_suffix, suffix in suffixes.items():
                    if tl_suffix in perturbed and name.endswith(suffix):
                        noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(1))
                        param.add_(noise * 0.1)

    if backend.transformer_lens_major() >= 4:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=n_layers, n_embd=d_model, n_head=4, n_inner=d_mlp, n_positions=n_ctx,
            vocab_size=len(tokenizer), activation_function=act_fn,
            initializer_range=0.8 / d_model**0.5, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        with _caller_rng_kept():
            torch.manual_seed(seed)
            hf_model = GPT2LMHeadModel(config)
            with torch.no_grad():  # GPT-2 shrinks these by √(2 n_layers); TransformerLens does not
                for name, param in hf_model.named_parameters():
                    if name.endswith("c_proj.weight"):
                        param.mul_((2 * n_layers) ** 0.5)
        perturb(
            hf_model.named_parameters(),
            {"b_in": "mlp.c_fc.bias", "b_out": "mlp.c_proj.bias", "ln2.w": "ln_2.weight",
             "ln2.b": "ln_2.bias"},
        )  # fmt: skip
        return bridge_from_hf(hf_model, tokenizer)
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=d_model // 4, n_heads=4, d_mlp=d_mlp,
        d_vocab=len(tokenizer), n_ctx=n_ctx, act_fn=act_fn, normalization_type="LN", seed=seed,
    )  # fmt: skip
    model = _hooked_transformer(cfg, tokenizer=tokenizer).eval()
    perturb(model.named_parameters(), {s: s for s in ("b_in", "b_out", "ln2.w", "ln2.b")})
    return model


def micro_model() -> Model:
    """A 2-layer model small enough for dense (d_in d_out)² matrices: d_model 16, d_mlp 24.

    Its MLP biases and ln2 parameters are random, so that every term of the influence
    formulas is exercised.
    """
    from rome_lens.core.models import _tiny_tokenizer

    return gpt2_like(
        _tiny_tokenizer(), n_layers=2, d_model=16, d_mlp=24, n_ctx=64, act_fn="gelu_new", seed=7,
        perturbed=("b_in", "b_out", "ln2.w", "ln2.b"),
    )  # fmt: skip


@pytest.fixture(scope="session")
def word_level() -> Model:
    """A tiny model whose word-level tokenizer maps unseen words to [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "the", "tower", "is", "in", "paris", "rome"]
    vocabulary = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tokenizer_model = Tokenizer(vocabulary)
    tokenizer_model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model,
        unk_token="[UNK]",
        bos_token="<s>",
        pad_token="<s>",
        name_or_path="rome_lens-word-level",
        add_bos_token=True,
    )
    return gpt2_like(tokenizer, n_layers=2, d_model=16, d_mlp=64, n_ctx=16, act_fn="relu", seed=0)
