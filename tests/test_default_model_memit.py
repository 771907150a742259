"""MEMIT on the default model: ten CounterFact facts in one batch take, their neighbours stay."""

from __future__ import annotations

import pytest
import torch

from rome_lens import edited
from rome_lens.core.predict import predict_next
from rome_lens.editing import default_memit_layers, memit_edit
from rome_lens.evaluation import case_scores, load_counterfact_sample

pytestmark = pytest.mark.slow
N_CASES = 10


@pytest.fixture(scope="module")
def cases():
    """The first ten cases of the CounterFact sample shipped with rome_lens."""
    return load_counterfact_sample(limit=N_CASES)


@pytest.fixture(scope="module")
def batch(smol, cases, tmp_path_factory):
    """One MEMIT edit of the first ten cases at the default layers (z not cached)."""
    folder = tmp_path_factory.mktemp("z")
    requests = [case.request for case in cases]
    return memit_edit(smol, requests, cache_dir=folder, use_cache=False, progress=False)


class TestTenFactsAtOnce:
    def test_every_edit_takes(self, smol, cases, batch):
        """With the batch applied, each edit prompt prefers its new target to the true one."""
        with edited(smol, batch):
            after = case_scores(smol, cases)
        assert after["efficacy_score"].tolist() == [1.0] * N_CASES
        assert batch.took and len(batch.outcomes) == N_CASES

    def test_neighbours_keep_their_answers(self, smol, cases, batch):
        """Every neighbourhood prompt keeps its top-1 next token and its preference."""
        prompts = [p for case in cases for p in case.neighborhood_prompts]
        before_top = predict_next(smol, prompts).top_token
        before = case_scores(smol, cases)["neighborhood_score"]
        with edited(smol, batch):
            after_top = predict_next(smol, prompts).top_token
            after = case_scores(smol, cases)["neighborhood_score"]
        assert torch.equal(before_top, after_top)
        assert (after >= before).all()

    def test_edit_spans_the_default_layers_and_reverts(self, smol, batch):
        """ΔW lands on W_out of each default layer, and reverting is bit-exact."""
        layers = default_memit_layers(smol)
        assert list(batch.deltas()) == [f"blocks.{layer}.mlp.W_out" for layer in layers]
        before = {layer: smol.blocks[layer].mlp.W_out.clone() for layer in layers}
        batch.apply(smol).revert()
        assert all(torch.equal(smol.blocks[layer].mlp.W_out, before[layer]) for layer in layers)
