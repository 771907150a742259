"""AlphaEdit on the default model: three batches in a row take, generation writes them, the
Louvre stays in Paris, and the per-layer table shows how far the weights moved."""

from __future__ import annotations

import pytest
import torch

from rome_lens.core.predict import predict_next
from rome_lens.editing import SequentialEditor
from rome_lens.evaluation import case_scores, generation_scores, load_counterfact_sample

pytestmark = pytest.mark.slow
BATCHES, PER_BATCH = 3, 5
LOUVRE = "The Louvre is located in the city of"


@pytest.fixture(scope="module")
def cases():
    """Fifteen cases of the CounterFact sample shipped with rome_lens."""
    return load_counterfact_sample(limit=BATCHES * PER_BATCH)


@pytest.fixture(scope="module")
def editor(smol, cases, tmp_path_factory):
    """Three AlphaEdit batches of five, each computed on the model the last one left."""
    made = SequentialEditor(smol, cache_dir=tmp_path_factory.mktemp("z"), progress=False)
    louvre_before = predict_next(smol, [LOUVRE], targets=[" Paris"])
    made.generated_before = generation_scores(smol, cases)  # type: ignore[attr-defined]
    made.original = {layer: smol.blocks[layer].mlp.W_out.clone() for layer in made.layers}  # type: ignore[attr-defined]
    for start in range(0, BATCHES * PER_BATCH, PER_BATCH):
        made.edit([case.request for case in cases[start : start + PER_BATCH]])
    made.louvre_before = louvre_before  # type: ignore[attr-defined]
    yield made
    made.revert_all()


class TestThreeBatchesInARow:
    def test_every_edited_fact_takes(self, smol, cases, editor):
        """After the third batch, every one of the fifteen prompts prefers its new target."""
        assert case_scores(smol, cases)["efficacy_score"].tolist() == [1.0] * len(cases)

    def test_the_louvre_stays_in_paris(self, smol, editor):
        """An unedited fact keeps its top-1 answer."""
        after = predict_next(smol, [LOUVRE], targets=[" Paris"])
        assert bool(after.target_is_top[0]) and bool(editor.louvre_before.target_is_top[0])

    def test_generation_writes_the_new_targets(self, smol, cases, editor):
        """Greedy decoding writes the new target for at least 60% of the prompts, where the
        unedited model wrote it for at most 20%."""
        before = editor.generated_before.generation_efficacy.mean()
        after = generation_scores(smol, cases).generation_efficacy.mean()
        assert before <= 0.2 and after >= 0.6

    def test_the_layer_table_follows_the_drift(self, editor):
        """One row per batch and layer; every layer has moved further after three batches."""
        table = editor.layer_dataframe()
        assert len(table) == BATCHES * len(editor.layers)
        drift = table.pivot(index="layer", columns="batch", values="drift")
        assert (drift[BATCHES - 1] > drift[0]).all() and (drift[0] > 0).all()

    def test_reverting_restores_the_weights(self, smol, editor):
        """revert_all (run last) gives back every edited W_out, bit for bit."""
        assert len(editor) == BATCHES
        editor.revert_all()
        for layer, weight in editor.original.items():
            assert torch.equal(smol.blocks[layer].mlp.W_out, weight)
