"""Second moments and key statistics: sums against plain references, caching, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

import rome_lens
from rome_lens.core.corpus import Corpus
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.stats import KeyStats, Moments, accumulate_moments, key_second_moment
from rome_lens.stats import moments as moments_module

from .conftest import hooks_left

LAYER = 1
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is a museum in Paris, the capital of France.",
    "The Colosseum is an amphitheatre in the city of Rome.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
] * 8


def reference_keys(model, texts, hook=f"blocks.{LAYER}.mlp.hook_post"):
    """Each text run alone: the hook's activation at every token but BOS, in float64."""
    rows = []
    for text in texts:
        _, cache = model.run_with_cache(text)
        rows.append(cache[hook][0, 1:].double())
    return torch.cat(rows)


def reference_gradients(model, texts, hook):
    """Each text run alone: the gradient of its summed next-token loss at the hook."""
    rows = []
    for text in texts:
        tokens = model.to_tokens(text)
        store = {}

        def keep(act, hook, store=store):
            act.retain_grad()
            store["act"] = act

        with model.hooks(fwd_hooks=[(hook, keep)]):
            logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), tokens[0, 1:], reduction="sum"
        )
        loss.backward()
        rows.append(store["act"].grad[0, 1:].double())
        model.zero_grad(set_to_none=True)
    return torch.cat(rows)


class TestMoments:
    def test_no_batch_crosses_to_the_cpu(self, tiny, tmp_path, monkeypatch):
        """The sums stay on the model's device: CPU copies do not grow with the batches."""
        real_cpu = torch.Tensor.cpu
        calls: list[int] = []

        def counted(tensor, *args, **kwargs):
            calls.append(1)
            return real_cpu(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "cpu", counted)
        copies = []
        for batch_size in (len(TEXTS), 1):  # one batch, then one per text
            calls.clear()
            accumulate_moments(
                tiny, forward=[f"blocks.{LAYER}.mlp.hook_post"], corpus=TEXTS, n_tokens=10_000,
                batch_size=batch_size, use_cache=False, cache_dir=tmp_path, progress=False,
            )  # fmt: skip
            copies.append(len(calls))
        assert len(TEXTS) > 2 and copies[1] == copies[0]

    def test_forward_sums_equal_a_plain_reference(self, tiny, tmp_path):
        """Σx, Σxxᵀ and n over a corpus equal those of each text run on its own."""
        found = accumulate_moments(
            tiny,
            forward=[f"blocks.{LAYER}.mlp.hook_post"],
            corpus=TEXTS[:4],
            n_tokens=10_000,
            cache_dir=tmp_path,
            progress=False,
        )[f"blocks.{LAYER}.mlp.hook_post", "forward"]
        keys = reference_keys(tiny, TEXTS[:4])
        assert found.count == len(keys)
        # float32 activations: batched and single runs differ in the last bits
        torch.testing.assert_close(found.total, keys.sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found.outer, keys.T @ keys, rtol=1e-4, atol=1e-5)
        expected = torch.cov(keys.T, correction=0)
        torch.testing.assert_close(found.covariance, expected, rtol=1e-4, atol=1e-6)

    def test_gradients_equal_autograd_per_text(self, tiny, tmp_path):
        """Empirical-label gradient moments equal the per-text autograd gradients' sums."""
        hook = f"blocks.{LAYER}.hook_mlp_out"
        found = accumulate_moments(
            tiny,
            backward=[hook],
            corpus=TEXTS[:4],
            n_tokens=10_000,
            labels="empirical",
            cache_dir=tmp_path,
            progress=False,
        )[hook, "backward"]
        grads = reference_gradients(tiny, TEXTS[:4], hook)
        assert found.count == len(grads)
        expected = grads.T @ grads
        scale = float(expected.abs().max())  # entries near zero are cancellations
        torch.testing.assert_close(found.outer, expected, rtol=1e-4, atol=1e-7 * scale)
        assert all(p.grad is None for p in tiny.parameters())
        assert hooks_left(tiny) == 0

    def test_sampled_labels_are_seeded(self, tiny, tmp_path):
        """Sampled labels give the same moments for a seed, and others for another seed."""
        hook = f"blocks.{LAYER}.hook_mlp_out"
        kwargs = {"backward": [hook], "corpus": TEXTS[:2], "use_cache": False, "progress": False}
        a = accumulate_moments(tiny, seed=1, **kwargs)[hook, "backward"]
        b = accumulate_moments(tiny, seed=1, **kwargs)[hook, "backward"]
        c = accumulate_moments(tiny, seed=2, **kwargs)[hook, "backward"]
        assert torch.equal(a.outer, b.outer) and not torch.equal(a.outer, c.outer)

    def test_n_tokens_caps_the_count(self, tiny, tmp_path):
        """n_tokens stops the sums after exactly that many tokens, the first ones in order."""
        hook = f"blocks.{LAYER}.mlp.hook_post"
        found = accumulate_moments(
            tiny, forward=[hook], corpus=TEXTS, n_tokens=50, cache_dir=tmp_path, progress=False
        )[hook, "forward"]
        assert found.count == 50

    def test_cache_is_reused_and_keyed_by_model(self, tiny, tmp_path, monkeypatch):
        """A second call reads the cache; another model never does."""
        hook = f"blocks.{LAYER}.mlp.hook_post"
        kwargs = {"forward": [hook], "corpus": TEXTS, "cache_dir": tmp_path, "progress": False}
        first = accumulate_moments(tiny, **kwargs)[hook, "forward"]
        real = moments_module._accumulate
        monkeypatch.setattr(moments_module, "_accumulate", lambda *a: pytest.fail("recomputed"))
        again = accumulate_moments(tiny, **kwargs)[hook, "forward"]
        assert torch.equal(first.outer, again.outer)
        monkeypatch.setattr(moments_module, "_accumulate", real)
        other = accumulate_moments(rome_lens.tiny_model(seed=1), **kwargs)[hook, "forward"]
        assert other.fingerprint != first.fingerprint
        assert not torch.equal(other.outer, first.outer)

    def test_corrupt_cache_is_rebuilt(self, tiny, tmp_path):
        """A damaged cache file is reported and recomputed."""
        hook = f"blocks.{LAYER}.mlp.hook_post"
        kwargs = {"forward": [hook], "corpus": TEXTS, "cache_dir": tmp_path, "progress": False}
        first = accumulate_moments(tiny, **kwargs)[hook, "forward"]
        (path,) = (tmp_path / "moments").glob("*.st")
        path.write_bytes(b"not a safetensors file")
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            again = accumulate_moments(tiny, **kwargs)[hook, "forward"]
        assert torch.equal(first.outer, again.outer)

    def test_notice_and_progress_bar(self, tiny, tmp_path, capsys):
        """Before computing, one line says what and where; the token bar ends at 100%."""
        key_second_moment(tiny, LAYER, corpus=TEXTS, n_tokens=50, cache_dir=tmp_path)
        err = capsys.readouterr().err
        assert "computing key statistics of layer 1 (blocks.1.mlp.hook_post) once: 50 tokens" in err
        assert f"cached in {tmp_path / 'moments'}" in err
        assert "50/50" in err and "100%" in err
        key_second_moment(tiny, LAYER, corpus=TEXTS, n_tokens=50, cache_dir=tmp_path)
        assert "computing" not in capsys.readouterr().err  # cached: nothing to announce

    def test_bad_input(self, tiny):
        """No hooks, an unknown hook, bad labels and n_tokens < 1 are named."""
        with pytest.raises(ValueError, match="at least one hook point"):
            accumulate_moments(tiny, corpus=TEXTS, progress=False)
        with pytest.raises(ValueError, match="no hook point 'blocks.9.mlp.hook_post'"):
            accumulate_moments(tiny, forward=["blocks.9.mlp.hook_post"], progress=False)
        with pytest.raises(ValueError, match="labels must be"):
            accumulate_moments(tiny, backward=["hook_embed"], labels="true", progress=False)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="n_tokens must be >= 1"):
            accumulate_moments(tiny, forward=["hook_embed"], n_tokens=0, progress=False)
        with pytest.raises(ValueError, match="holds no text"):
            accumulate_moments(tiny, forward=["hook_embed"], corpus=[""], progress=False)

    def test_save_and_load_check_the_model(self, tiny, tmp_path):
        """Moments reload equal, and refuse another model."""
        hook = f"blocks.{LAYER}.mlp.hook_post"
        found = accumulate_moments(
            tiny, forward=[hook], corpus=TEXTS[:2], use_cache=False, progress=False
        )[hook, "forward"]
        loaded = Moments.load(found.save(tmp_path / "m.st"), model=tiny)
        assert torch.equal(loaded.outer, found.outer) and loaded.count == found.count
        with pytest.raises(ValueError, match="another model"):
            Moments.load(tmp_path / "m.st", model=rome_lens.tiny_model(seed=1))


class TestKeyStatistics:
    def test_moment_is_mean_outer_product_of_keys(self, tiny, tmp_path):
        """C equals the float64 mean of k kᵀ over every non-BOS token of the corpus."""
        stats = key_second_moment(tiny, LAYER, corpus=TEXTS[:4], cache_dir=tmp_path, progress=False)
        k = reference_keys(tiny, TEXTS[:4])
        torch.testing.assert_close(stats.moment, k.T @ k / len(k))
        assert stats.n_tokens == len(k) and stats.moment.dtype == torch.float64
        torch.testing.assert_close(stats.eigenvalues, torch.linalg.eigvalsh(k.T @ k / len(k)))

    def test_file_corpora_match_strings(self, tiny, tmp_path):
        """A .txt file (blank-line separated) and a .jsonl file give the strings' statistics."""
        texts = TEXTS[:4]
        txt, jsonl = tmp_path / "c.txt", tmp_path / "c.jsonl"
        txt.write_text("\n\n".join(texts))
        jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts))
        kwargs = {"cache_dir": tmp_path, "progress": False, "use_cache": False}
        base = key_second_moment(tiny, LAYER, corpus=texts, **kwargs)
        for path in (txt, jsonl):
            torch.testing.assert_close(
                key_second_moment(tiny, LAYER, corpus=path, **kwargs).moment, base.moment
            )
        assert Corpus.read(txt).documents == tuple(texts)

    def test_sampled_corpus_is_seeded(self, tiny, tmp_path):
        """With corpus=None the model's own samples are reproducible per seed."""
        kwargs = {"n_tokens": 200, "progress": False, "use_cache": False}
        a = key_second_moment(tiny, LAYER, cache_dir=tmp_path / "a", **kwargs)
        b = key_second_moment(tiny, LAYER, cache_dir=tmp_path / "b", **kwargs)
        c = key_second_moment(tiny, LAYER, cache_dir=tmp_path / "c", seed=1, **kwargs)
        assert torch.equal(a.moment, b.moment) and not torch.equal(a.moment, c.moment)
        assert a.n_tokens == 200

    def test_editing_a_layer_keeps_its_statistics_valid(self, tiny, tmp_path):
        """W_out of layer L does not feed layer L's keys: editing it keeps the fingerprint."""
        stats = key_second_moment(tiny, LAYER, corpus=TEXTS[:2], cache_dir=tmp_path, progress=False)
        patch = rome_lens.WeightPatch.for_model(
            tiny, {f"blocks.{LAYER}.mlp.W_out": torch.ones(tiny.cfg.d_mlp, tiny.cfg.d_model)}
        )
        with rome_lens.edited(tiny, patch):
            assert model_fingerprint(tiny, upto_layer=LAYER) == stats.fingerprint
            stats.check(tiny, LAYER)
            assert model_fingerprint(tiny) != model_fingerprint(rome_lens.tiny_model())
        patch_in = rome_lens.WeightPatch.for_model(
            tiny, {f"blocks.{LAYER}.mlp.W_in": torch.ones(tiny.cfg.d_model, tiny.cfg.d_mlp)}
        )
        with rome_lens.edited(tiny, patch_in), pytest.raises(ValueError, match="another model"):
            stats.check(tiny, LAYER)

    def test_round_trip(self, tiny, tmp_path):
        """KeyStats save and load with their moments."""
        stats = key_second_moment(tiny, LAYER, corpus=TEXTS[:2], cache_dir=tmp_path, progress=False)
        loaded = KeyStats.load(stats.save(tmp_path / "k.st"), model=tiny)
        assert torch.equal(loaded.moment, stats.moment) and loaded.layer == LAYER


class TestWithoutBOS:
    def test_a_sampled_corpus_is_text_as_the_model_reads_it(self, tmp_path):
        """Without BOS, samples drop their start token, every token counts, caches stay apart."""
        with_bos, bare = rome_lens.tiny_model(seed=0), rome_lens.tiny_model(seed=0)
        bare.cfg.default_prepend_bos = False
        assert model_fingerprint(bare) != model_fingerprint(with_bos)
        chunks = {
            name: Corpus.read(None).chunks(model, n_tokens=100, cache_dir=tmp_path, progress=False)
            for name, model in (("bos", with_bos), ("bare", bare))
        }
        bos_id = with_bos.tokenizer.bos_token_id
        assert all(int(c.tokens[0]) == bos_id for c in chunks["bos"])
        assert [len(c.tokens) for c in chunks["bare"]] == [len(c.tokens) - 1 for c in chunks["bos"]]
        stats = key_second_moment(bare, 1, n_tokens=100, cache_dir=tmp_path, progress=False)
        assert stats.moments.count == 100


class TestFingerprint:
    def test_memo_follows_in_place_and_data_writes(self):
        """The remembered fingerprint changes after copy_ and after a write through .data."""
        model = rome_lens.tiny_model()
        first = model_fingerprint(model)
        assert model_fingerprint(model) == first
        w = model.blocks[2].mlp.W_out
        with torch.no_grad():
            w.copy_(w + 1)
        second = model_fingerprint(model)
        assert second != first
        w.data[::7] += 1.0  # bypasses the version counter; the sampled values change
        assert model_fingerprint(model) != second

    def test_layout_does_not_change_it(self, tiny):
        """Column-major weights (linear_layout) have the same fingerprint."""
        from rome_lens.core.runtime import linear_layout

        before = model_fingerprint(tiny)
        with linear_layout(tiny):
            assert model_fingerprint(tiny) == before
