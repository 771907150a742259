"""Shared fixtures: a tiny random model for logic, the default model for science."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import rome_lens
from rome_lens.core.backend import Model

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tiny() -> Model:
    """A 3-layer random GPT-2-style model with a byte-level BPE tokenizer."""
    return rome_lens.tiny_model(seed=0)


@pytest.fixture(scope="session")
def smol() -> Model:
    """The default model, SmolLM2-135M-Instruct (converted once, then cached)."""
    torch.set_grad_enabled(True)
    return rome_lens.load_model()


@pytest.fixture(scope="session")
def known_facts() -> list[dict[str, str]]:
    """The first 40 facts of ROME's known_1000.json that the default model answers top-1."""
    return json.loads((DATA / "known_smollm2.json").read_text())


@pytest.fixture(scope="session")
def all_known_facts() -> list[dict[str, str]]:
    """The first 400 facts of ROME's known_1000.json."""
    return json.loads((DATA / "known_facts.json").read_text())


def hooks_left(model: Model) -> int:
    """How many forward/backward hooks are attached anywhere in the model."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def weights(model: Model) -> dict[str, torch.Tensor]:
    """A copy of every parameter."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(model: Model, before: dict[str, torch.Tensor]) -> None:
    """Every parameter equals its copy in ``before``, bit for bit."""
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@contextmanager
def quiet(*categories: type[Warning]) -> Iterator[None]:
    """Ignore the given warning categories (a random model knows no fact, takes few edits)."""
    with warnings.catch_warnings():
        for category in categories or (UserWarning,):
            warnings.simplefilter("ignore", category)
        yield


def micro_model() -> Model:
    """A 2-layer model small enough for dense (d_in d_out)² matrices: d_model 16, d_mlp 24.

    Its MLP biases and ln2 parameters are random, so that every term of the influence
    formulas is exercised.
    """
    from transformer_lens import HookedTransformerConfig

    from rome_lens.core.models import _hooked_transformer, _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=len(tokenizer),
        n_ctx=64, act_fn="gelu_new", normalization_type="LN", seed=7,
    )  # fmt: skip
    model = _hooked_transformer(cfg, tokenizer=tokenizer).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("b_in", "b_out")):
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
            if name.endswith(("ln2.w", "ln2.b")):
                param.add_(
                    torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.1
                )
    return model


@pytest.fixture(scope="session")
def word_level() -> Model:
    """A tiny model whose word-level tokenizer maps unseen words to [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    from rome_lens.core.models import _hooked_transformer

    words = ["[UNK]", "<s>", "the", "tower", "is", "in", "paris", "rome"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<s>",
        pad_token="<s>",
        name_or_path="rome_lens-word-level",
        add_bos_token=True,
    )
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_ctx=16, d_vocab=len(words), act_fn="relu", seed=0
    )
    return _hooked_transformer(cfg, tokenizer=tokenizer).eval()
