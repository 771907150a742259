"""Hooks, running the model, and reading a corpus: the machinery every room shares."""

from __future__ import annotations

import json

import pytest
import torch

from rome_lens.core.corpus import Corpus, token_batches
from rome_lens.core.hooks import attached, record
from rome_lens.core.runtime import capture, pad, run_to_layer, unembed

from .conftest import hooks_left


class TestAttached:
    def test_removes_exactly_its_own_hooks(self, tiny):
        """Hooks added by the caller survive; ours are gone after the block, error or not."""
        mine = []
        tiny.hook_dict["blocks.0.hook_mlp_out"].add_hook(record(mine))
        try:
            grads: list[torch.Tensor] = []
            hooks = [("blocks.1.hook_mlp_out", record(grads))]
            with pytest.raises(RuntimeError, match="boom"), attached(tiny, [], bwd_hooks=hooks):
                tiny(torch.tensor([[1, 2, 3]])).sum().backward()
                raise RuntimeError("boom")
            assert len(grads) == 1 and grads[0].shape == (1, 3, tiny.cfg.d_model)
            assert hooks_left(tiny) == 1  # the caller's
            tiny(torch.tensor([[1, 2]]))
            assert len(mine) == 2
        finally:
            tiny.reset_hooks()
            tiny.zero_grad(set_to_none=True)
        assert hooks_left(tiny) == 0

    def test_backward_hook_sees_the_gradient(self, tiny):
        """A backward hook records d(loss)/d(activation), as autograd computes it."""
        tokens = torch.tensor([[1, 5, 9, 3]])
        grads: list[torch.Tensor] = []
        kept = {}

        def keep(act, hook):
            act.retain_grad()
            kept["act"] = act

        with attached(
            tiny,
            [("blocks.1.hook_resid_post", keep)],
            bwd_hooks=[("blocks.1.hook_resid_post", record(grads))],
        ):
            tiny(tokens).logsumexp(-1).sum().backward()
        torch.testing.assert_close(grads[0], kept["act"].grad)
        tiny.zero_grad(set_to_none=True)

    def test_unknown_hook_point(self, tiny):
        """A hook name the model lacks is named, and nothing is attached."""
        hooks = [("blocks.7.hook_mlp_out", record([]))]
        with (
            pytest.raises(ValueError, match="no hook point 'blocks.7.hook_mlp_out'"),
            attached(tiny, hooks),
        ):
            pass
        assert hooks_left(tiny) == 0


class TestRunning:
    def test_capture_at_pairs_equals_the_full_cache(self, tiny):
        """capture(at=(rows, positions)) gives those entries of run_with_cache's activation."""
        tokens, _ = pad([torch.tensor([0, 5, 9, 3]), torch.tensor([0, 7])], 0, "right")
        rows, positions = torch.tensor([0, 1, 0]), torch.tensor([3, 1, 0])
        got = capture(tiny, tokens, ["blocks.1.mlp.hook_post"], at=(rows, positions))
        _, cache = tiny.run_with_cache(tokens)
        expected = cache["blocks.1.mlp.hook_post"][rows, positions]
        torch.testing.assert_close(got["blocks.1.mlp.hook_post"], expected)

    def test_run_to_layer_and_unembed_make_the_logits(self, tiny):
        """The residual after the last block, unembedded row by row, is the model's output."""
        tokens = torch.tensor([[0, 5, 9, 3]])
        resid = run_to_layer(tiny, tokens, tiny.cfg.n_layers)
        torch.testing.assert_close(unembed(tiny, resid[0]), tiny(tokens)[0], atol=1e-5, rtol=1e-5)

    def test_pad_needs_sequences(self):
        with pytest.raises(ValueError, match="at least one sequence"):
            pad([], 0, "right")


class TestCorpus:
    def test_chunks_cover_every_token_once(self, tiny):
        """Windows of a long document hold all its tokens, each once, BOS first in each."""
        text = " ".join(["The Eiffel Tower is in Paris."] * 12)
        chunks = Corpus.read([text]).chunks(tiny, max_length=16)
        body = tiny.to_tokens(text, prepend_bos=False, truncate=False)[0]
        bos = tiny.to_tokens("")[0]
        assert all(torch.equal(c.tokens[:1], bos) for c in chunks)
        assert torch.equal(torch.cat([c.tokens[1:] for c in chunks]), body)
        assert max(len(c.tokens) for c in chunks) == 16

    def test_n_tokens_stops_early(self, tiny):
        """n_tokens bounds the non-BOS tokens in the chunks."""
        chunks = Corpus.read(["The Louvre is a museum in Paris."] * 10).chunks(tiny, n_tokens=20)
        assert sum(len(c.tokens) - 1 for c in chunks) == 20

    def test_batches_mark_real_and_counted_tokens(self, tiny):
        """Each batch marks padding out of `real`, and BOS out of `counted`."""
        chunks = Corpus.read(["The Louvre", "The Eiffel Tower is in Paris."]).chunks(tiny)
        (batch,) = token_batches(tiny, chunks, batch_size=8)
        assert batch.real.sum() == sum(len(c.tokens) for c in chunks)
        assert batch.counted.sum() == batch.real.sum() - len(chunks)

    def test_sampled_corpus_needs_a_size_and_is_cached(self, tiny, tmp_path):
        """A sampled corpus asks how many tokens; the samples are cached per seed."""
        corpus = Corpus.read(None)
        with pytest.raises(ValueError, match="needs n_tokens"):
            corpus.chunks(tiny)
        a = corpus.chunks(tiny, n_tokens=100, cache_dir=tmp_path, progress=False)
        b = corpus.chunks(tiny, n_tokens=100, cache_dir=tmp_path, progress=False)
        assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
        assert len(list((tmp_path / "samples").glob("*.st"))) == 1

    def test_bad_sources(self, tmp_path):
        """A missing file, bad JSON lines and non-strings are named."""
        with pytest.raises(ValueError, match="is not a file"):
            Corpus.read(tmp_path / "missing.txt")
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
        with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
            Corpus.read(bad)
        with pytest.raises(ValueError, match="must hold strings, got int"):
            Corpus.read(["fine", 3])  # type: ignore[list-item]
