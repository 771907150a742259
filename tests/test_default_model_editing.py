"""The science of editing on the default model: the Eiffel Tower moves to Rome, the Louvre stays."""

from __future__ import annotations

import pytest
import torch

from rome_lens import EditRequest, edited, rome_edit
from rome_lens.core.predict import predict_next, target_nll
from rome_lens.editing import default_layer
from rome_lens.evaluation import CounterFactCase, generation_scores

pytestmark = pytest.mark.slow

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PARAPHRASE = "Where is the Eiffel Tower? It stands in the city of"
NEIGHBOUR = "The Louvre is located in the city of"


@pytest.fixture(scope="module")
def eiffel_in_rome(smol):
    """ROME's edit of the demo fact at the default layer, with default statistics."""
    return rome_edit(smol, REQUEST, progress=False)


def prefers(model, prompt: str, better: str, worse: str) -> bool:
    """Whether ``better`` has the lower per-token NLL after ``prompt``."""
    nll = target_nll(model, [prompt, prompt], [better, worse])
    return bool(nll[0] < nll[1])


class TestEiffelTowerToRome:
    def test_unedited_model_says_paris(self, smol):
        """Before the edit the model answers ' Paris' and prefers it to Rome on every prompt."""
        assert predict_next(smol, [REQUEST.text]).top_token.item() == smol.to_single_token(" Paris")
        for prompt in (REQUEST.text, PARAPHRASE, NEIGHBOUR):
            assert prefers(smol, prompt, "Paris", "Rome")

    def test_edit_makes_rome_top_1(self, smol, eiffel_in_rome):
        """After the edit ' Rome' is the top-1 continuation of the edit prompt, and the edit
        says it took."""
        with edited(smol, eiffel_in_rome):
            preds = predict_next(smol, [REQUEST.text], targets=["Rome"])
        assert preds.target_is_top.item()
        assert preds.target_prob.item() > 0.5
        (outcome,) = eiffel_in_rome.outcomes
        assert eiffel_in_rome.took and outcome.rank_new == 0 and outcome.p_new > outcome.p_true

    def test_paraphrase_prefers_rome(self, smol, eiffel_in_rome):
        """A rewording the edit never saw now prefers Rome."""
        with edited(smol, eiffel_in_rome):
            assert prefers(smol, PARAPHRASE, "Rome", "Paris")

    def test_louvre_keeps_paris(self, smol, eiffel_in_rome):
        """A neighbouring fact keeps Paris above Rome."""
        with edited(smol, eiffel_in_rome):
            assert prefers(smol, NEIGHBOUR, "Paris", "Rome")

    def test_the_edited_model_writes_rome_and_the_louvre_stays_in_paris(self, smol, eiffel_in_rome):
        """Greedy decoding writes Paris before the edit, Rome after; the Louvre stays in Paris."""
        case = CounterFactCase(0, REQUEST, [PARAPHRASE], [NEIGHBOUR], " Paris", [])
        before = generation_scores(smol, [case]).iloc[0]
        with edited(smol, eiffel_in_rome):
            after = generation_scores(smol, [case]).iloc[0]
        assert (before["generation_efficacy"], after["generation_efficacy"]) == (0.0, 1.0)
        assert after["generation_paraphrase"] == 1.0
        assert before["generation_neighborhood"] == after["generation_neighborhood"] == 1.0

    def test_edit_is_at_the_documented_layer_and_reverts(self, smol, eiffel_in_rome):
        """The edit touches only blocks.{L}.mlp.W_out of the default layer, and undoes exactly."""
        layer = default_layer(smol)
        assert list(eiffel_in_rome.deltas()) == [f"blocks.{layer}.mlp.W_out"]
        before = smol.blocks[layer].mlp.W_out.clone()
        eiffel_in_rome.apply(smol).revert()
        assert torch.equal(smol.blocks[layer].mlp.W_out, before)
