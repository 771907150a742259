"""The corpus gradient index: projected gradients stored once, queries scored from them."""

from __future__ import annotations

import json

import pytest
import torch

from rome_lens.core.backend import Model
from rome_lens.influence import (
    GradientIndex,
    IndexSettings,
    ScoreSettings,
    build_gradient_index,
    fit_influence_factors,
    influence,
    influence_many,
)
from rome_lens.influence import index as index_module
from rome_lens.influence import scores as scores_module

from . import test_influence
from .conftest import assert_same_weights, hooks_left, micro_model, weights
from .test_influence import reference_gradient, text_gradient

TEXTS = [*test_influence.TEXTS, "Cats sleep for most of the day."]  # seven: shards of 3, 3, 1
QUERIES = [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("Steve Jobs founded", " Apple"),
]
FULL = IndexSettings(basis="eigen", rank_in=10_000, rank_out=10_000, chunks_per_shard=3)
TOKENS = IndexSettings(basis="tokens", chunks_per_shard=3)  # every token's ā_t and g_t


@pytest.fixture(scope="module")
def micro() -> Model:
    """A 2-layer model small enough for full-rank projections: d_model 16, d_mlp 24."""
    return micro_model()


@pytest.fixture(scope="module")
def factors(micro, tmp_path_factory):
    folder = tmp_path_factory.mktemp("factors")
    return fit_influence_factors(
        micro, TEXTS * 3, n_tokens=400, fisher="empirical", cache_dir=folder, progress=False
    )


@pytest.fixture(scope="module")
def full_index(micro, factors, tmp_path_factory) -> GradientIndex:
    folder = tmp_path_factory.mktemp("index")
    return build_gradient_index(micro, factors, TEXTS, folder, settings=FULL, progress=False)


@pytest.fixture(scope="module")
def token_index(micro, factors, tmp_path_factory) -> GradientIndex:
    folder = tmp_path_factory.mktemp("tokens")
    return build_gradient_index(micro, factors, TEXTS, folder, settings=TOKENS, progress=False)


def scan_and_index(model, factors, index, settings=None):
    """The same queries scored by a scan and from ``index``."""
    common = {"top_k": len(TEXTS), "settings": settings, "progress": False}
    return (
        influence_many(model, factors, QUERIES, TEXTS, **common),
        influence_many(model, factors, QUERIES, TEXTS, index=index, **common),
    )


SETTINGS = [
    None,
    ScoreSettings(strategy="kfac", normalize=True),
    ScoreSettings(strategy="identity", layers=(1,), normalize=True),
    ScoreSettings(query_rank=2),
]


class TestScores:
    @pytest.mark.parametrize("settings", SETTINGS)
    @pytest.mark.parametrize("which", ["full_index", "token_index"])
    def test_a_lossless_index_gives_the_scans_scores(self, micro, factors, request, which,
                                                     settings):  # fmt: skip
        """Every direction of the eigenbasis kept, or every token's ā_t and g_t: the index's
        scores, layer splits and ranking are the scan's (any strategy, normalised, a subset of
        layers, low-rank queries)."""
        index = request.getfixturevalue(which)
        scanned, indexed = scan_and_index(micro, factors, index, settings)
        for s, i in zip(scanned, indexed, strict=True):
            torch.testing.assert_close(i.all_scores, s.all_scores, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(i.layer_scores, s.layer_scores, rtol=1e-4, atol=1e-6)
            assert i.text_ids == s.text_ids

    def test_the_token_split_needs_no_pass(self, micro, factors, token_index, monkeypatch):
        """The top texts' scores by token are read from the index, with no forward pass, and
        equal the scan's."""
        scanned, _ = scan_and_index(micro, factors, token_index)
        monkeypatch.setattr(scores_module, "text_gradients", None)  # a pass would fail
        indexed = influence_many(micro, factors, QUERIES, TEXTS, top_k=len(TEXTS),
                                 index=token_index, progress=False)  # fmt: skip
        for s, i in zip(scanned, indexed, strict=True):
            assert i.str_tokens == s.str_tokens
            for mine, theirs in zip(i.token_scores, s.token_scores, strict=True):
                torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)

    def test_a_tokens_shard_holds_each_texts_gradient(self, micro, factors, token_index):
        """Σ_t ā_t g_tᵀ over a chunk's stored tokens is its gradient, from torch.func."""
        shard = index_module._read_shard(token_index, 0)
        assert shard is not None
        for row, document in enumerate(shard["documents"].tolist()):
            expected = text_gradient(micro, TEXTS[document])
            mine = shard["token_chunks"] == row
            for name in factors.names:
                a, g = shard[f"{name}.inputs"][mine], shard[f"{name}.gradients"][mine]
                torch.testing.assert_close((a.T @ g).double(), expected[name].detach().double(),
                                           rtol=1e-4, atol=1e-6)  # fmt: skip

    def test_bfloat16_halves_the_bytes(self, micro, factors, token_index, tmp_path):
        """Tokens kept in bfloat16 take half the bytes; the scores stay within bfloat16's
        rounding of the float32 ones."""
        half = IndexSettings(basis="tokens", dtype="bfloat16", chunks_per_shard=3)
        index = build_gradient_index(micro, factors, TEXTS, tmp_path, settings=half,
                                     progress=False)  # fmt: skip
        assert abs(index.bytes_per_text * 2 - token_index.bytes_per_text) <= 1  # rounding
        _, exact = scan_and_index(micro, factors, token_index)
        _, rounded = scan_and_index(micro, factors, index)
        for e, r in zip(exact, rounded, strict=True):
            scale = e.all_scores.abs().max()
            torch.testing.assert_close(r.all_scores / scale, e.all_scores / scale, rtol=0,
                                       atol=3e-2)  # fmt: skip

    def test_a_cut_basis_scores_the_projected_gradients(self, micro, factors, tmp_path):
        """At rank r the score is ⟨M_inᵀ ∇f M_out, M_inᵀ G M_out⟩ with the top-r eigenvectors,
        ∇f and each text's G from torch.func."""
        settings = IndexSettings(basis="eigen", rank_in=5, rank_out=3)
        index = build_gradient_index(micro, factors, TEXTS, tmp_path, settings=settings,
                                     progress=False)  # fmt: skip
        result = influence(micro, factors, *QUERIES[0], TEXTS, top_k=3, index=index,
                           settings=ScoreSettings(strategy="identity"), progress=False)  # fmt: skip
        tokens = micro.to_tokens(QUERIES[0][0] + QUERIES[0][1])
        n_prompt = micro.to_tokens(QUERIES[0][0]).shape[1]
        positions = torch.arange(n_prompt - 1, tokens.shape[1] - 1)
        query = reference_gradient(micro, tokens, positions, tokens[0, n_prompt:])
        expected = torch.zeros(len(TEXTS), dtype=torch.float64)
        for t, text in enumerate(TEXTS):
            gradient = text_gradient(micro, text)
            for name in factors.names:
                input_basis = factors.input_vectors[name].double()[:, -5:]
                output_basis = factors.output_vectors[name].double()[:, -3:]
                p = input_basis.T @ query[name].detach().double() @ output_basis
                g = input_basis.T @ gradient[name].detach().double() @ output_basis
                expected[t] += (p * g).sum()
        torch.testing.assert_close(result.all_scores, expected, rtol=1e-4, atol=1e-7)

    @pytest.mark.parametrize(("basis", "strategy"), [("random", "identity"), ("whitened", "ekfac")])
    def test_a_random_basis_is_unbiased_in_expectation(self, micro, factors, tmp_path, basis,
                                                       strategy):  # fmt: skip
        """Random bases of different seeds average towards the exact score: the dot product
        (random), EK-FAC's with the preconditioning split between the sides (whitened)."""
        settings = ScoreSettings(strategy=strategy)
        exact = influence(micro, factors, *QUERIES[0], TEXTS, top_k=1, progress=False,
                          settings=settings).all_scores  # fmt: skip
        draws = []
        for seed in range(40):
            built = IndexSettings(rank_in=6, rank_out=6, basis=basis, seed=seed)
            index = build_gradient_index(micro, factors, TEXTS, tmp_path / str(seed),
                                         settings=built, progress=False)  # fmt: skip
            draws.append(influence(micro, factors, *QUERIES[0], TEXTS, top_k=1, index=index,
                                   settings=settings, progress=False).all_scores)  # fmt: skip
        one_draw = (draws[0] - exact).abs().max()
        average = (torch.stack(draws).mean(0) - exact).abs().max()
        assert average < one_draw / 2

    @pytest.mark.parametrize("built", [FULL, TOKENS], ids=["eigen", "tokens"])
    def test_texts_longer_than_the_context_sum_their_chunks(self, micro, factors, tmp_path,
                                                            built):  # fmt: skip
        """A text cut into several chunks gets their summed score and token scores over all of
        them, as in the scan."""
        texts = [*TEXTS[:3], " ".join(TEXTS * 3)]  # the last is longer than n_ctx 64
        index = build_gradient_index(micro, factors, texts, tmp_path, settings=built,
                                     progress=False)  # fmt: skip
        assert index.n_chunks > index.n_texts
        scanned = influence(micro, factors, *QUERIES[0], texts, top_k=4, progress=False)
        indexed = influence(micro, factors, *QUERIES[0], texts, top_k=4, index=index,
                            progress=False)  # fmt: skip
        torch.testing.assert_close(indexed.all_scores, scanned.all_scores, rtol=1e-4, atol=1e-6)
        for result in (scanned, indexed):  # token scores span every chunk of a long text
            totals = torch.stack([t.sum() for t in result.token_scores])
            torch.testing.assert_close(totals, scanned.scores, rtol=1e-4, atol=1e-6)


class TestFiles:
    def test_the_folder_describes_the_index(self, micro, factors, full_index):
        """index.json names the model, factors and corpus; GradientIndex.open reads it back."""
        manifest = json.loads((full_index.path / "index.json").read_text())
        assert manifest["n_texts"] == len(TEXTS)
        reopened = GradientIndex.open(full_index.path)
        assert reopened == full_index
        assert reopened.n_shards == 3  # 7 chunks, 3 a shard
        assert len(list(full_index.path.glob("shard-*.safetensors"))) == 3

    @pytest.mark.parametrize("which", ["full_index", "token_index"])
    def test_bytes_per_text_counts_the_stored_gradients(self, request, which):
        """bytes_per_text is the stored gradients' bytes over the texts, read from the shards."""
        index = request.getfixturevalue(which)
        stored = 0
        for k in range(index.n_shards):
            shard = index_module._read_shard(index, k)
            assert shard is not None
            stored += sum(t.numel() * t.element_size() for name, t in shard.items()
                          if name.startswith("blocks."))  # fmt: skip
        assert index.bytes_per_text == round(stored / index.n_texts)

    @pytest.mark.parametrize("built", [FULL, TOKENS], ids=["eigen", "tokens"])
    def test_a_corrupt_shard_is_rebuilt(self, micro, factors, tmp_path, built):
        """A shard that no longer matches its digest is rebuilt, with a warning, and the
        scores do not change."""
        index = build_gradient_index(micro, factors, TEXTS, tmp_path, settings=built,
                                     progress=False)  # fmt: skip
        before = influence(micro, factors, *QUERIES[0], TEXTS, top_k=2, index=index,
                           progress=False).all_scores  # fmt: skip
        shard = index.shard_path(1)
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(data)
        index_module._VERIFIED.clear()
        with pytest.warns(UserWarning, match="rebuilding gradient index shard"):
            after = influence(micro, factors, *QUERIES[0], TEXTS, top_k=2, index=index,
                              progress=False).all_scores  # fmt: skip
        torch.testing.assert_close(after, before)

    def test_building_again_keeps_good_shards(self, micro, factors, tmp_path, monkeypatch):
        """A second build of the same index projects nothing; a deleted shard alone is redone."""
        build_gradient_index(micro, factors, TEXTS, tmp_path, settings=FULL, progress=False)
        built = []
        original = index_module._project_chunks

        def counted(*args, **kwargs):
            built.append(len(args[3]))
            return original(*args, **kwargs)

        monkeypatch.setattr(index_module, "_project_chunks", counted)
        build_gradient_index(micro, factors, TEXTS, tmp_path, settings=FULL, progress=False)
        assert built == []
        (tmp_path / "shard-00002.safetensors").unlink()
        build_gradient_index(micro, factors, TEXTS, tmp_path, settings=FULL, progress=False)
        assert built == [1]  # the last shard holds the seventh chunk

    def test_building_and_querying_leave_the_model_as_it_was(self, micro, factors, tmp_path):
        """No hook is left and no weight moves."""
        before = weights(micro)
        index = build_gradient_index(micro, factors, TEXTS, tmp_path, progress=False)
        influence(micro, factors, *QUERIES[0], TEXTS, top_k=2, index=index, progress=False)
        assert_same_weights(micro, before)
        assert not hooks_left(micro)


class TestBadInput:
    def test_another_model_is_named(self, micro, factors, full_index):
        """An index queried through a model with other weights is refused as another model's."""
        other = micro_model()
        with torch.no_grad():
            other.blocks[0].mlp.W_out.add_(0.01)
        with pytest.raises(ValueError, match="(another model|factors were fitted)"):
            influence(other, factors, *QUERIES[0], TEXTS, index=full_index, progress=False)

    def test_other_factors_are_named(self, micro, full_index, tmp_path):
        """Factors fitted on other text are refused as other factors."""
        refit = fit_influence_factors(micro, TEXTS[:4] * 3, n_tokens=300, fisher="empirical",
                                      cache_dir=tmp_path, progress=False)  # fmt: skip
        with pytest.raises(ValueError, match="other factors"):
            influence(micro, refit, *QUERIES[0], TEXTS, index=full_index, progress=False)

    def test_another_corpus_is_named(self, micro, factors, full_index):
        """A corpus that is not the indexed one is refused as another corpus."""
        with pytest.raises(ValueError, match="another corpus"):
            influence(micro, factors, *QUERIES[0], TEXTS[:-1], index=full_index, progress=False)

    def test_a_folder_with_another_index_is_not_overwritten(self, micro, factors, full_index):
        """Building other settings into an index's folder raises and keeps the old index."""
        with pytest.raises(ValueError, match="holds another gradient index"):
            build_gradient_index(micro, factors, TEXTS, full_index.path,
                                 settings=IndexSettings(rank_in=2), progress=False)  # fmt: skip
        assert GradientIndex.open(full_index.path) == full_index

    def test_a_whitened_index_serves_its_own_curvature(self, micro, factors, tmp_path):
        """A whitened index refuses queries preconditioned with another strategy or damping."""
        whitened = IndexSettings(rank_in=4, rank_out=4, basis="whitened")
        index = build_gradient_index(micro, factors, TEXTS, tmp_path, settings=whitened,
                                     progress=False)  # fmt: skip
        for other in (ScoreSettings(damping=0.2), ScoreSettings(strategy="kfac")):
            with pytest.raises(ValueError, match="the index is whitened for strategy='ekfac'"):
                influence(micro, factors, *QUERIES[0], TEXTS, index=index, settings=other,
                          progress=False)  # fmt: skip

    def test_an_index_too_big_for_the_disk_is_refused(self, micro, factors, tmp_path,
                                                      monkeypatch):  # fmt: skip
        """An index that would not fit on the disk raises before anything is written, naming
        the sizes and what to change."""
        usage = index_module.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(index_module.shutil, "disk_usage",
                            lambda path: usage._replace(free=1000))  # fmt: skip
        with pytest.raises(OSError, match=r"needs about [\d.]+ MB, and 0\.0 MB are free.*bfloat16"):
            build_gradient_index(micro, factors, TEXTS, tmp_path / "big", progress=False)
        assert not (tmp_path / "big").exists()

    def test_a_folder_without_an_index(self, tmp_path):
        """Opening a folder with no index.json names the missing file."""
        with pytest.raises(FileNotFoundError, match="index.json"):
            GradientIndex.open(tmp_path)

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"rank_in": 0}, "rank_in must be a positive integer, got 0"),
            ({"chunks_per_shard": 1.5}, "chunks_per_shard must be a positive integer"),
            ({"basis": "pca"}, "basis must be 'eigen', 'random', 'whitened' or 'tokens', got"),
            ({"dtype": "float16"}, "dtype must be 'float32' or 'bfloat16', got 'float16'"),
            ({"strategy": "diagonal"}, "strategy must be 'ekfac' or 'kfac', got 'diagonal'"),
            ({"damping": -1}, "damping must be a number >= 0, got -1"),
        ],
    )
    def test_a_bad_setting_is_named(self, fields, message):
        """A bad setting raises, naming its value."""
        with pytest.raises(ValueError, match=message):
            IndexSettings(**fields)

    def test_prefilter_and_unindexed_weights(self, micro, factors, tmp_path):
        """A prefilter, or a layer the index does not hold, is refused."""
        first_layer = IndexSettings(layers=(1,))
        index = build_gradient_index(micro, factors, TEXTS, tmp_path, settings=first_layer,
                                     progress=False)  # fmt: skip
        with pytest.raises(ValueError, match="prefilter"):
            influence(micro, factors, *QUERIES[0], TEXTS, index=index, progress=False,
                      settings=ScoreSettings(prefilter=2))  # fmt: skip
        with pytest.raises(ValueError, match="the gradient index holds"):
            influence(micro, factors, *QUERIES[0], TEXTS, index=index, progress=False)

    def test_a_query_longer_than_the_context(self, micro, factors, full_index):
        """A query longer than n_ctx is refused before the index is read."""
        with pytest.raises(ValueError, match="n_ctx"):
            influence(micro, factors, "word " * 80, " Paris", TEXTS, index=full_index,
                      progress=False)  # fmt: skip
