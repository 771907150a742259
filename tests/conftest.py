"""Shared fixtures: a tiny random model for logic, the default model for science."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

import rome_lens

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny() -> HookedTransformer:
    """A 3-layer random GPT-2-style model with a byte-level BPE tokenizer."""
    return rome_lens.tiny_model(seed=0)


@pytest.fixture(scope="session")
def smol() -> HookedTransformer:
    """The default model, SmolLM2-135M-Instruct (converted once, then cached)."""
    torch.set_grad_enabled(True)
    return rome_lens.load_model()


@pytest.fixture(scope="session")
def known_facts() -> list[dict[str, str]]:
    """The facts of ROME's known_1000.json that the default model answers top-1."""
    path = SHARED_DATA / "known_smollm2.json"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return json.loads(path.read_text())


def hooks_left(model: HookedTransformer) -> int:
    """How many forward/backward hooks are attached anywhere in the model."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
