"""Causal tracing: the fast engine against a plain reference, errors, and hygiene."""

from __future__ import annotations

import pytest
import torch

from rome_lens import trace_fact, trace_severed
from rome_lens.core.backend import Model
from rome_lens.core.tokens import subject_range
from rome_lens.tracing import (
    UnreliableTraceWarning,
    average_causal_effects,
    embedding_noise_scale,
    engine,
    window_layers,
)
from rome_lens.tracing.results import trace_problems

from .conftest import hooks_left

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def reference_trace(
    model: Model,
    kind: str,
    window: int,
    samples: int,
    seed: int,
    scale: float,
    subject: str = SUBJECT,
) -> torch.Tensor:
    """ROME's algorithm, written out plainly: one run_with_hooks per (token, layer)."""
    tokens = model.to_tokens(PROMPT)
    first, last = subject_range(model, PROMPT, subject)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, last - first, model.cfg.d_model), generator=g) * scale
    _, clean = model.run_with_cache(tokens)
    target = int(model(tokens)[0, -1].argmax())

    def corrupt(act, hook):
        act = act.clone()
        act[:, first:last] += noise
        return act

    def restore(name, t):
        def hook(act, hook):
            act[:, t] = clean[name][0, t]
            return act

        return hook

    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    out = torch.zeros(n_pos, n_layers)
    for t in range(n_pos):
        for layer in range(n_layers):
            if kind == "resid":
                names = [f"blocks.{layer}.hook_resid_post"]
            else:
                names = [
                    f"blocks.{j}.hook_{kind}_out" for j in window_layers(layer, window, n_layers)
                ]
            fwd = [("hook_embed", corrupt)] + [(n, restore(n, t)) for n in names]
            logits = model.run_with_hooks(tokens.expand(samples, -1), fwd_hooks=fwd)
            out[t, layer] = logits[:, -1].softmax(-1)[:, target].mean()
    return out


class TestEngineMatchesReference:
    @pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
    @pytest.mark.parametrize("window", [1, 10])
    def test_scores_equal_reference(self, tiny, kind, window):
        """Every (token, layer) score equals one-pass-per-cell restoration to 1e-5."""
        trace = trace_fact(
            tiny, PROMPT, SUBJECT, kinds=(kind,), window=window, samples=4, seed=3, progress=False
        )
        expected = reference_trace(tiny, kind, window, 4, 3, trace.noise_scale)
        torch.testing.assert_close(trace.scores[0], expected, atol=1e-5, rtol=0)

    def test_small_batches_give_the_same_scores(self, tiny):
        """Splitting the work into many small batches changes nothing."""
        big = trace_fact(tiny, PROMPT, SUBJECT, samples=3, progress=False)
        small = trace_fact(tiny, PROMPT, SUBJECT, samples=3, batch_size=4, progress=False)
        torch.testing.assert_close(big.scores, small.scores, atol=1e-6, rtol=0)

    def test_subject_at_position_zero_without_bos(self, tiny):
        """With no BOS the subject starts the sequence; restoring it there still matches."""
        prompt, subject = "The Eiffel Tower is located in", "The Eiffel"
        trace = trace_fact(tiny, prompt, subject, prepend_bos=False, samples=2, progress=False)
        assert trace.subject_range == (0, 2)
        tokens = tiny.to_tokens(prompt, prepend_bos=False).expand(2, -1)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn((2, 2, tiny.cfg.d_model), generator=g) * trace.noise_scale
        _, clean = tiny.run_with_cache(tokens[:1])

        def corrupt(act, hook):
            act = act.clone()
            act[:, 0:2] += noise
            return act

        def restore(act, hook):
            act[:, 0] = clean[hook.name][0, 0]
            return act

        fwd = [("hook_embed", corrupt), ("blocks.1.hook_resid_post", restore)]
        logits = tiny.run_with_hooks(tokens, fwd_hooks=fwd)
        expected = logits[:, -1].softmax(-1)[:, trace.target_token].mean().item()
        assert trace.scores[0, 0, 1].item() == pytest.approx(expected, abs=1e-6)


class TestTraceResult:
    def test_reproducible_for_a_fixed_seed(self, tiny):
        """The same seed gives bit-identical scores; another seed gives other scores."""
        a = trace_fact(tiny, PROMPT, SUBJECT, samples=3, seed=1, progress=False)
        b = trace_fact(tiny, PROMPT, SUBJECT, samples=3, seed=1, progress=False)
        c = trace_fact(tiny, PROMPT, SUBJECT, samples=3, seed=2, progress=False)
        assert torch.equal(a.scores, b.scores)
        assert not torch.equal(a.scores, c.scores)

    def test_tokens_before_the_subject_match_a_restored_run(self, tiny):
        """Scores before the subject, which the engine skips, equal restoring them for real."""
        trace = trace_fact(tiny, PROMPT, "Tower", kinds=("resid",), samples=3, progress=False)
        first = trace.subject_range[0]
        assert first > 1
        expected = reference_trace(tiny, "resid", 1, 3, 0, trace.noise_scale, subject="Tower")
        torch.testing.assert_close(trace.scores[0, :first], expected[:first], atol=1e-6, rtol=0)

    def test_last_layer_resid_at_last_token_is_the_clean_probability(self, tiny):
        """Restoring the final residual at the last token restores the clean output."""
        trace = trace_fact(tiny, PROMPT, SUBJECT, kinds=("resid",), samples=3, progress=False)
        assert trace.scores[0, -1, -1].item() == pytest.approx(trace.clean_prob, abs=1e-6)

    def test_noise_scale_defaults_to_three_embedding_stds(self, tiny):
        """noise_scale=None is 3 × the pooled std of the subject's token embeddings."""
        trace = trace_fact(tiny, PROMPT, SUBJECT, kinds=("resid",), samples=2, progress=False)
        tokens = tiny.to_tokens(SUBJECT, prepend_bos=False)
        expected = 3 * tiny.W_E[tokens[0]].std().item()
        assert trace.noise_scale == pytest.approx(expected, rel=1e-6)
        assert embedding_noise_scale(tiny, [SUBJECT]) == pytest.approx(expected, rel=1e-6)

    def test_target_scores_the_first_token_of_the_answer(self, tiny):
        """target='Paris' scores the first token of ' Paris', whatever the top-1 is."""
        trace = trace_fact(tiny, PROMPT, SUBJECT, target="Paris", samples=2, progress=False)
        ids = tiny.to_tokens(PROMPT + " Paris", prepend_bos=False)[0]
        assert trace.target_token == ids[len(tiny.to_tokens(PROMPT, prepend_bos=False)[0])]
        clean = tiny(PROMPT)[0, -1].softmax(-1)[trace.target_token].item()
        assert trace.clean_prob == pytest.approx(clean, abs=1e-6)

    def test_dataframe_and_peak_agree_with_scores(self, tiny):
        """to_dataframe has one row per cell, and peak() is its arg-max."""
        trace = trace_fact(tiny, PROMPT, SUBJECT, samples=2, progress=False)
        df = trace.to_dataframe()
        assert len(df) == trace.scores.numel()
        mlp = df[df.kind == "mlp"]
        best = mlp.loc[mlp.score.idxmax()]
        peak = trace.peak("mlp")
        assert (best.token, best.layer) == (peak.token, peak.layer)
        assert peak.indirect_effect == pytest.approx(peak.score - trace.corrupted_prob)


class TestReliability:
    def test_a_fact_the_model_does_not_know_warns(self, tiny):
        """A random model gives its top-1 a low probability: the trace warns and says why."""
        with pytest.warns(UnreliableTraceWarning, match="does not know this answer"):
            trace = trace_fact(tiny, PROMPT, SUBJECT, samples=2, progress=False)
        assert trace.clean_prob < 0.1
        assert any("does not know" in p for p in trace.problems)

    @pytest.mark.parametrize(
        ("clean", "corrupted", "reasons"),
        [
            (0.5, 0.1, []),
            (0.06, 0.0, ["know"]),
            (0.5, 0.47, ["depend"]),
            (0.08, 0.07, ["know", "depend"]),
        ],
    )
    def test_problems_follow_the_thresholds(self, clean, corrupted, reasons):
        """Clean p below 0.1, and a drop below 0.05, are each named; a good trace has none."""
        problems = trace_problems(" Paris", clean, corrupted)
        assert len(problems) == len(reasons)
        for problem, reason in zip(problems, reasons, strict=True):
            assert reason in problem


class TestSeveredTrace:
    def test_severed_scores_equal_reference(self, tiny):
        """Freezing the MLP outputs at the token matches a hand-written hooked run."""
        samples, seed = 3, 5
        result = trace_severed(
            tiny, PROMPT, SUBJECT, severed="mlp", samples=samples, seed=seed, progress=False
        )
        tokens = tiny.to_tokens(PROMPT).expand(samples, -1)
        first, last = subject_range(tiny, PROMPT, SUBJECT)
        t, n_layers = last - 1, tiny.cfg.n_layers
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((samples, last - first, tiny.cfg.d_model), generator=g)
        noise = noise * result.noise_scale

        def corrupt(act, hook):
            act = act.clone()
            act[:, first:last] += noise
            return act

        _, clean = tiny.run_with_cache(tokens[:1])
        with tiny.hooks(fwd_hooks=[("hook_embed", corrupt)]):
            _, corrupted = tiny.run_with_cache(tokens)

        def put_back(source, row):
            def hook(act, hook):
                act[:, t] = source[hook.name][row, t]
                return act

            return hook

        for layer in range(n_layers):
            fwd = [("hook_embed", corrupt)]
            fwd.append((f"blocks.{layer}.hook_resid_post", put_back(clean, 0)))
            fwd += [
                (f"blocks.{j}.hook_mlp_out", put_back(corrupted, slice(None)))
                for j in range(layer + 1, n_layers)
            ]
            logits = tiny.run_with_hooks(tokens, fwd_hooks=fwd)
            expected = logits[:, -1].softmax(-1)[:, result.target_token].mean().item()
            assert result.severed_scores[layer].item() == pytest.approx(expected, abs=1e-5)
        assert result.token == t
        assert len(result.to_dataframe()) == n_layers

    def test_unsevered_scores_match_trace_fact(self, tiny):
        """Without severing, the scores are trace_fact's resid scores at that token."""
        result = trace_severed(tiny, PROMPT, SUBJECT, samples=3, progress=False)
        trace = trace_fact(tiny, PROMPT, SUBJECT, kinds=("resid",), samples=3, progress=False)
        torch.testing.assert_close(result.scores, trace.scores[0, result.token], atol=1e-6, rtol=0)


class TestAverageCausalEffects:
    FACTS = (
        {"prompt": PROMPT, "subject": SUBJECT},
        {"prompt": "Steve Jobs founded the company", "subject": "Steve Jobs", "target": " Apple"},
    )

    def test_batch_size_reaches_every_trace(self, tiny, monkeypatch):
        """Each fact is traced with the batch_size given, and scores as trace_fact does."""
        seen = []

        def spy(*args, **kwargs):
            seen.append(kwargs["batch_size"])
            return trace_fact(*args, **kwargs)

        monkeypatch.setattr(engine, "trace_fact", spy)
        average = average_causal_effects(
            tiny, self.FACTS, kinds=("mlp",), samples=2, batch_size=3, progress=False
        )
        assert seen == [3, 3]
        for fact, trace in zip(self.FACTS, average.traces, strict=True):
            alone = trace_fact(tiny, fact["prompt"], fact["subject"], target=fact.get("target"),
                               kinds=("mlp",), samples=2, noise_scale=trace.noise_scale,
                               batch_size=3, progress=False)  # fmt: skip
            assert torch.equal(trace.scores, alone.scores)

    def test_batch_size_leaves_the_numbers(self, tiny):
        """Small batches give the averages of the default batch_size, to float rounding."""
        default = average_causal_effects(tiny, self.FACTS, samples=2, progress=False)
        small = average_causal_effects(tiny, self.FACTS, samples=2, batch_size=3, progress=False)
        torch.testing.assert_close(small.mean, default.mean, atol=1e-6, rtol=0, equal_nan=True)
        torch.testing.assert_close(small.ci95, default.ci95, atol=1e-6, rtol=0, equal_nan=True)
        assert torch.equal(small.counts, default.counts)

    def test_a_bad_batch_size_is_refused_before_tracing(self, tiny, monkeypatch):
        """batch_size=0 raises, naming it, before any fact is traced."""
        monkeypatch.setattr(engine, "trace_fact", None)  # a call would fail differently
        with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
            average_causal_effects(tiny, self.FACTS, batch_size=0, progress=False)


class TestBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"subject": "Louvre"}, "'Louvre' is not in the prompt"),
            ({"target": ""}, "target must be a non-empty string"),
            ({"target": "   "}, "target must be a non-empty string"),
            ({"samples": 0}, "samples must be a positive integer, got 0"),
            ({"window": 0}, "window must be a positive integer, got 0"),
            ({"kinds": ("mlp", "neurons")}, "unknown kind"),
        ],
    )
    def test_clear_value_errors(self, tiny, kwargs, message):
        """Each bad argument raises a ValueError that names it."""
        args = {"subject": SUBJECT} | kwargs
        subject = args.pop("subject")
        with pytest.raises(ValueError, match=message):
            trace_fact(tiny, PROMPT, subject, progress=False, **args)

    def test_subject_error_shows_the_tokenisation(self, tiny):
        """A missing subject's error lists the prompt's tokens."""
        with pytest.raises(ValueError, match=r"tokenised as \['<\|endoftext\|>', 'The'"):
            trace_fact(tiny, PROMPT, "Louvre", progress=False)

    def test_prompt_longer_than_context(self, tiny):
        """A prompt over n_ctx tokens is refused with both lengths."""
        long_prompt = "The Eiffel Tower " * 40
        with pytest.raises(ValueError, match=r"has \d+ tokens but .* holds 64"):
            trace_fact(tiny, long_prompt, SUBJECT, progress=False)

    def test_unencodable_target(self, word_level):
        """A target the tokenizer can only spell as its unknown token is refused."""
        with pytest.raises(ValueError, match=r"target 'Zürich' cannot be encoded"):
            trace_fact(word_level, "the tower is in", "tower", target="Zürich", progress=False)

    def test_no_hooks_left_after_an_error_mid_trace(self, tiny):
        """An exception inside a restored forward pass leaves no hook on the model."""
        calls = {"n": 0}

        def failing(module, args):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("boom")

        # a hook, not a patched forward: a bridge forwards attribute writes to the HF module
        handle = tiny.blocks[1].register_forward_pre_hook(failing)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                trace_fact(tiny, PROMPT, SUBJECT, samples=2, progress=False)
        finally:
            handle.remove()
        assert calls["n"] > 3
        assert hooks_left(tiny) == 0
