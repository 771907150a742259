"""The science on the default model: where SmolLM2-135M recalls the Eiffel Tower."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import rome_lens
from rome_lens import EditRequest, average_causal_effects, rome_edit, trace_fact, trace_severed
from rome_lens.core import backend
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.predict import predict_next

from .conftest import DATA

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.fixture(scope="module")
def demo_trace(smol):
    """The demo trace: all three kinds, 10 samples, window 10, seed 0."""
    return trace_fact(smol, PROMPT, SUBJECT, progress=False)


class TestEiffelTowerTrace:
    def test_clean_and_corrupted_probabilities(self, demo_trace):
        """' Paris' is the clean top-1 at p ≈ 0.30; noise on the subject drops it to ≈ 0.017."""
        assert demo_trace.target_str == " Paris"
        assert demo_trace.clean_prob == pytest.approx(0.30, abs=0.02)
        assert demo_trace.corrupted_prob == pytest.approx(0.017, abs=0.01)
        assert demo_trace.problems == []  # a fact the model knows, and forgets under noise

    def test_mlp_effect_peaks_at_a_subject_token_in_the_first_layers(self, demo_trace):
        """The largest MLP indirect effect is at 'iffel', within the first layers, ≈ +0.37."""
        peak = demo_trace.peak("mlp")
        first, last = demo_trace.subject_range
        assert first <= peak.token < last
        assert peak.str_token == "iffel"
        assert peak.layer <= 3
        assert 0.3 < peak.indirect_effect < 0.45

    def test_mlp_effect_at_the_subject_beats_the_tokens_after_it(self, demo_trace):
        """No token after the subject gets more than a third of the subject's MLP effect."""
        effect = demo_trace.indirect_effect()[demo_trace.kinds.index("mlp")]
        first, last = demo_trace.subject_range
        assert effect[last:].max() < effect[first:last].max() / 3

    def test_attention_carries_the_answer_at_the_last_token(self, demo_trace):
        """Attention restored at the last token, in upper layers, recovers the answer."""
        peak = demo_trace.peak("attn")
        assert peak.token == len(demo_trace.str_tokens) - 1
        assert peak.layer >= demo_trace.scores.shape[2] // 2

    def test_reproducible_for_a_fixed_seed(self, smol, demo_trace):
        """Tracing MLPs again with seed 0 gives the demo trace's MLP scores."""
        again = trace_fact(smol, PROMPT, SUBJECT, kinds=("mlp",), progress=False)
        mlp = demo_trace.kinds.index("mlp")
        torch.testing.assert_close(again.scores[0], demo_trace.scores[mlp], atol=1e-6, rtol=0)


class TestWithoutBOS:
    """load_model()'s default: no BOS, as SmolLM2's own tokenizer, chosen by bench_bos.py."""

    @pytest.fixture(scope="class")
    def bare(self):
        """The default model as load_model() gives it."""
        return rome_lens.load_model()

    @pytest.fixture(scope="class")
    def bare_trace(self, bare):
        """The demo trace without BOS: all three kinds, 10 samples, window 10, seed 0."""
        return trace_fact(bare, PROMPT, SUBJECT, progress=False)

    def test_prompts_start_with_the_text(self, bare, smol):
        """No token precedes the prompt's own, and the fingerprint tells the two apart."""
        assert bare.cfg.default_prepend_bos is False
        assert bare.to_str_tokens("The Eiffel")[0] == "The"
        assert model_fingerprint(bare) != model_fingerprint(smol)

    def test_the_answer_is_surer(self, bare_trace):
        """' Paris' is top-1 at p ≈ 0.70 (0.30 with BOS) and falls to ≈ 0.02 under noise."""
        assert bare_trace.target_str == " Paris"
        assert bare_trace.clean_prob == pytest.approx(0.70, abs=0.03)
        assert bare_trace.corrupted_prob == pytest.approx(0.019, abs=0.01)
        assert bare_trace.problems == []

    def test_mlp_effect_still_peaks_at_the_subject_in_the_first_layers(self, bare_trace):
        """The largest MLP effect is at 'iffel' within the first layers; attention's is last."""
        peak = bare_trace.peak("mlp")
        assert peak.str_token == "iffel" and peak.layer <= 3
        assert 0.3 < peak.indirect_effect < 0.45
        assert bare_trace.peak("attn").token == len(bare_trace.str_tokens) - 1

    def test_rome_edit_takes(self, bare):
        """The default ROME edit makes ' Rome' top-1 without BOS too."""
        request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
        assert rome_edit(bare, request, progress=False).took


class TestSeveredPath:
    def test_severing_mlps_shrinks_the_early_effect(self, smol, demo_trace):
        """With the MLPs at 'iffel' frozen, restoring its early residual state helps less."""
        token = demo_trace.peak("mlp").token
        severed = trace_severed(smol, PROMPT, SUBJECT, token=token, samples=5, progress=False)
        early = slice(0, 4)
        assert severed.severed_scores[early].mean() < severed.scores[early].mean()


class TestAverageEffects:
    def test_a_few_known_facts(self, smol, known_facts):
        """The averages are the mean indirect effects of each fact's trace, group by group."""
        facts = [{"prompt": f["prompt"], "subject": f["subject"]} for f in known_facts[:3]]
        result = average_causal_effects(smol, facts, kinds=("mlp",), samples=4, progress=False)
        assert tuple(result.mean.shape) == (1, 6, smol.cfg.n_layers)
        assert result.n_facts == 3 and result.counts[0] == 3 and result.counts[-1] == 3
        last_subject = torch.stack(
            [t.indirect_effect()[0, t.subject_range[1] - 1] for t in result.traces]
        )
        group = result.groups.index("last subject token")
        torch.testing.assert_close(result.mean[0, group], last_subject.mean(0))
        half_width = 1.96 * last_subject.std(0) / 3**0.5
        torch.testing.assert_close(result.ci95[0, group], half_width)
        assert len(result.to_dataframe()) == 6 * smol.cfg.n_layers


@pytest.fixture(scope="module")
def golden():
    """The numbers rome_lens 0.1.0 computed, before the rooms were built (tests/data)."""
    return load_file(DATA / "golden_demo.safetensors")


class TestSameNumbersAsBefore:
    """The demo's trace and edit give rome_lens 0.1.0's numbers."""

    def test_demo_trace(self, smol, demo_trace, golden):
        """The demo trace's every score to 1e-5, and its clean and corrupted p to 1e-6."""
        # 1e-6 on the CPU that wrote the golden; float32 kernels of other CPUs differ by ~2e-6,
        # and so does a bridge, which keeps the RMSNorm gains that TL 3 folds into the weights.
        torch.testing.assert_close(demo_trace.scores, golden["trace_scores"], atol=1e-5, rtol=0)
        clean, corrupted = golden["probs"].tolist()
        tolerance = 5e-6 if backend.is_bridge(smol) else 1e-6
        assert demo_trace.clean_prob == pytest.approx(clean, abs=tolerance)
        assert demo_trace.corrupted_prob == pytest.approx(corrupted, abs=tolerance)

    def test_demo_edit(self, smol, golden):
        """The default ROME edit of the demo fact: the same k*, v* and δ; ℓ maps k* to δ."""
        request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
        edit = rome_edit(smol, request, progress=False)
        # k* to 1e-5 (6e-7 measured across CPUs); v* and δ come out of 20 float32 Adam steps.
        for name, tolerance in (("key", 1e-5), ("value", 1e-4), ("right", 1e-4)):
            expected = golden[f"edit_{name}"]
            scale = float(expected.abs().max())
            actual = getattr(edit, name).double()
            torch.testing.assert_close(actual, expected, atol=tolerance * scale, rtol=0)
        # ℓ = C⁻¹k*/(k*·C⁻¹k*) depends on the 20,000 tokens the model samples for C; a CPU
        # whose float32 rounding differs flips a draw and samples other text, so ℓ is
        # compared with the golden only in what the method fixes: ℓ · k* = 1.
        assert float(edit.left.double() @ golden["edit_key"]) == pytest.approx(1.0, abs=1e-4)
        assert edit.took


class TestPadding:
    def test_padded_batches_equal_unpadded_runs(self, smol, all_known_facts):
        """Left- and right-padded batches give each prompt's unpadded probabilities."""
        prompts = [f["prompt"] for f in all_known_facts[:96]]
        targets = [f["attribute"] for f in all_known_facts[:96]]
        alone = predict_next(smol, prompts, targets=targets, batch_size=1)
        for side in ("left", "right"):
            padded = predict_next(smol, prompts, targets=targets, padding_side=side, batch_size=32)
            assert torch.equal(padded.top_token, alone.top_token)
            torch.testing.assert_close(padded.target_prob, alone.target_prob, atol=1e-4, rtol=0)

    def test_factual_recall_survives_left_padding(self, smol, all_known_facts):
        """Over 400 known facts, left padding answers exactly the facts right padding does."""
        prompts = [f["prompt"] for f in all_known_facts]
        targets = [f["attribute"] for f in all_known_facts]
        right = predict_next(smol, prompts, targets=targets, padding_side="right")
        left = predict_next(smol, prompts, targets=targets, padding_side="left")
        assert torch.equal(left.target_is_top, right.target_is_top)
        assert int(right.target_is_top.sum()) > len(prompts) / 10  # it knows many of them
