"""The logit lens: each layer's residual stream read through ln_final and the unembedding."""

from __future__ import annotations

import pytest
import torch

from rome_lens.analysis import LogitLens, logit_lens

from .conftest import hooks_left

PROMPT = "The Eiffel Tower is located in"


@pytest.fixture(scope="module")
def lens(tiny):
    return logit_lens(tiny, PROMPT, targets=["Paris", "Rome"], k=5, progress=False)


class TestLogitLens:
    def test_last_layer_is_the_models_prediction(self, tiny, lens):
        """The last layer's lens equals the model's own log-probabilities."""
        log_probs = tiny(tiny.to_tokens(PROMPT))[0].log_softmax(-1)
        top = log_probs.topk(5)
        assert torch.equal(lens.top_ids[-1], top.indices)
        torch.testing.assert_close(lens.top_log_probs[-1], top.values)

    def test_each_layer_reads_its_residual_stream(self, tiny, lens):
        """Layer l's lens is ln_final + unembed of blocks.{l}.hook_resid_post."""
        _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
        for layer in range(tiny.cfg.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_post"]
            expected = tiny.unembed(tiny.ln_final(resid))[0].log_softmax(-1)
            torch.testing.assert_close(lens.top_log_probs[layer], expected.topk(5).values)

    def test_ranks_match_a_brute_force_count(self, tiny, lens):
        """Target ranks and next-token ranks count the tokens scored strictly higher."""
        _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
        tokens = tiny.to_tokens(PROMPT)[0]
        for layer in range(tiny.cfg.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_post"]
            log_probs = tiny.unembed(tiny.ln_final(resid))[0].log_softmax(-1)
            for t, token in enumerate(lens.target_ids):
                rank = int((log_probs[-1] > log_probs[-1, token]).sum())
                assert int(lens.target_ranks[layer, t]) == rank
            pos = 2
            following = int(tokens[pos + 1])
            assert int(lens.next_ranks[layer, pos]) == int(
                (log_probs[pos] > log_probs[pos, following]).sum()
            )

    def test_default_target_is_the_top_prediction(self, tiny):
        """Without targets the lens follows the model's top-1 token, which ends at rank 0."""
        lens = logit_lens(tiny, PROMPT, progress=False)
        assert lens.target_ids == [int(lens.top_ids[-1, -1, 0])]
        assert int(lens.target_ranks[-1, 0]) == 0

    def test_dataframe_has_a_row_per_layer_and_target(self, tiny, lens):
        """to_dataframe: layers × targets rows; probabilities match the tensors."""
        df = lens.to_dataframe()
        assert len(df) == tiny.cfg.n_layers * 2
        assert df.loc[3, "prob"] == pytest.approx(float(lens.target_log_probs[1, 1].exp()))
        assert len(lens.top_dataframe()) == tiny.cfg.n_layers * len(lens.str_tokens) * 5

    def test_bad_input(self, tiny):
        """A bad k, a bare string of targets, and an empty target are named."""
        with pytest.raises(ValueError, match="k must be between 1 and d_vocab"):
            logit_lens(tiny, PROMPT, k=0)
        with pytest.raises(ValueError, match="got the string 'Paris'"):
            logit_lens(tiny, PROMPT, targets="Paris")
        with pytest.raises(ValueError, match="target must be a non-empty string"):
            logit_lens(tiny, PROMPT, targets=[" "])
        assert hooks_left(tiny) == 0

    def test_prepend_bos_false_reads_the_prompt_alone(self, tiny):
        """Without BOS the lens has one position fewer and still ends in the model's output."""
        lens = logit_lens(tiny, PROMPT, prepend_bos=False, progress=False)
        tokens = tiny.to_tokens(PROMPT, prepend_bos=False)
        assert lens.str_tokens == tiny.to_str_tokens(PROMPT, prepend_bos=False)
        expected = tiny(tokens)[0].log_softmax(-1).topk(10).values
        torch.testing.assert_close(lens.top_log_probs[-1], expected)

    def test_round_trip(self, tiny, lens, tmp_path):
        """A lens saves and loads, strings and tensors alike, and checks its model."""
        loaded = LogitLens.load(lens.save(tmp_path / "lens.st"), model=tiny)
        assert loaded.top_strs == lens.top_strs and torch.equal(loaded.top_ids, lens.top_ids)
