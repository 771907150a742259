"""Batched next-token predictions: padding on either side changes nothing."""

from __future__ import annotations

import pytest
import torch

from rome_lens.core.predict import known_facts, predict_next
from rome_lens.core.runtime import pad

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The Louvre is in",
    "Steve Jobs founded",
    "The Colosseum is located in the city of Rome, the capital of",
]
TARGETS = ["Paris", "Paris", "Apple", "Italy"]


class TestPad:
    def test_left_and_right_layout(self):
        """Tokens sit flush right or left, and the mask marks exactly them."""
        seqs = [torch.tensor([5, 6, 7]), torch.tensor([8])]
        tokens, mask = pad(seqs, 0, "left")
        assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
        assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        tokens, mask = pad(seqs, 0, "right")
        assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
        assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]

    def test_unknown_side(self):
        """Only 'left' and 'right' are accepted."""
        with pytest.raises(ValueError, match="'middle'"):
            pad([torch.tensor([1])], 0, "middle")  # type: ignore[arg-type]


class TestPaddingMatchesUnpadded:
    @pytest.mark.parametrize("side", ["left", "right"])
    def test_tiny_model(self, tiny, side):
        """Padded batches give each prompt's unpadded probabilities."""
        alone = predict_next(tiny, PROMPTS, targets=TARGETS, batch_size=1)
        padded = predict_next(tiny, PROMPTS, targets=TARGETS, batch_size=4, padding_side=side)
        torch.testing.assert_close(padded.target_prob, alone.target_prob, atol=1e-5, rtol=0)
        assert torch.equal(padded.top_token, alone.top_token)

    def test_against_a_plain_forward_pass(self, tiny):
        """The unpadded path agrees with model(prompt) itself."""
        preds = predict_next(tiny, PROMPTS[:1], targets=TARGETS[:1])
        probs = tiny(PROMPTS[0])[0, -1].softmax(-1)
        assert preds.top_token.item() == probs.argmax().item()
        assert preds.target_prob is not None
        assert preds.target_prob.item() == pytest.approx(probs[preds.target_token].item(), abs=1e-6)

    def test_mismatched_targets(self, tiny):
        """A target list of the wrong length is refused."""
        with pytest.raises(ValueError, match="got 1 targets for 4 prompts"):
            predict_next(tiny, PROMPTS, targets=["Paris"])

    def test_known_facts_keeps_top1_answers(self, tiny):
        """known_facts keeps a fact exactly when its answer's first token is the top-1."""
        top = predict_next(tiny, PROMPTS).top_token
        right = [tiny.tokenizer.decode([int(t)]) for t in top]
        facts = [{"prompt": p, "attribute": a} for p, a in zip(PROMPTS, right, strict=True)]
        facts += [{"prompt": p, "attribute": "Zzqx"} for p in PROMPTS]
        kept = known_facts(tiny, facts)
        preds = predict_next(tiny, PROMPTS * 2, targets=[f["attribute"] for f in facts])
        assert kept == [f for f, ok in zip(facts, preds.target_is_top.tolist(), strict=True) if ok]
        assert all(f["attribute"] != "Zzqx" for f in kept)
