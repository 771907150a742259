"""Influence functions on small models: scores against torch.func gradients and dense solves."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call, grad

import rome_lens
from rome_lens.core.backend import Model, parameter
from rome_lens.core.backend import weight as backend_weight
from rome_lens.core.corpus import bos_tokens
from rome_lens.influence import (
    InfluenceFactors,
    ScoreSettings,
    fit_influence_factors,
    influence,
    influence_many,
    mlp_weights,
    preconditioned_gradients,
    query_gradients,
    score_texts,
)
from rome_lens.influence import factors as factors_module
from rome_lens.influence.factors import input_factor, layer_passes, moment_bytes
from rome_lens.influence.scores import low_rank
from rome_lens.stats import accumulate_moments, key_second_moment

from .conftest import assert_same_weights, hooks_left, micro_model, weights

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is a museum in Paris, the capital of France.",
    "The Colosseum is in the city of Rome.",
    "Berlin is the capital of Germany.",
    "Toko Yasuda plays the guitar.",
    "Steve Jobs founded Apple.",
]
QUERY = ("The Eiffel Tower is located in the city of", " Paris")
IDENTITY = ScoreSettings(strategy="identity")  # the plain gradient dot product


@pytest.fixture(scope="module")
def micro() -> Model:
    """A 2-layer model small enough for dense (d_in d_out)² matrices: d_model 16, d_mlp 24."""
    return micro_model()


@pytest.fixture(scope="module")
def factors(micro, tmp_path_factory) -> InfluenceFactors:
    folder = tmp_path_factory.mktemp("factors")
    return fit_influence_factors(
        micro, TEXTS * 3, n_tokens=400, fisher="empirical", cache_dir=folder, progress=False
    )


def reference_gradient(model: Model, tokens: torch.Tensor, positions, targets):
    """∇ of Σ log p(target at position) w.r.t. every MLP weight (and bias), by torch.func.

    The MLP's output at BOS (where the model prepends one) is detached, so the weights' use
    at BOS does not count, as in rome_lens.
    """
    skip = len(bos_tokens(model))
    paths = {id(p): n for n, p in model.named_parameters()}  # TL 3 names, or HF paths (TL 4)
    tl_paths = {}
    for layer in range(model.cfg.n_layers):
        for kind in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
            name = f"blocks.{layer}.mlp.{kind}"
            try:
                tl_paths[name] = paths[id(parameter(model, name))]
            except ValueError:
                continue
    params = {path: model.get_parameter(path).detach() for path in tl_paths.values()}

    def cut_bos(act, hook):
        return torch.cat([act[:, :skip].detach(), act[:, skip:]], dim=1)

    def log_likelihood(chosen):
        hooks = [(f"blocks.{layer}.hook_mlp_out", cut_bos) for layer in range(model.cfg.n_layers)]
        with model.hooks(fwd_hooks=hooks):
            logits = functional_call(model, chosen, (tokens,), tie_weights=False)
        log_probs = logits[0, positions].log_softmax(-1)
        return log_probs.gather(-1, targets[:, None]).sum()

    found = grad(log_likelihood)(params)
    out = {}
    for weight in mlp_weights(model):
        short = weight.short
        bias_name = {"W_in": "b_in", "W_out": "b_out"}.get(short)
        block = f"blocks.{weight.layer}.mlp"
        g = found[tl_paths[f"{block}.{short}"]]
        if g.shape != backend_weight(model, f"{block}.{short}").shape:
            g = g.T  # nn.Linear stores the weight transposed
        if weight.bias:
            g = torch.cat([g, found[tl_paths[f"{block}.{bias_name}"]][None]])
        out[weight.name] = g
    return out


def text_gradient(model, text):
    """∇ log p(text) (every next token) w.r.t. the MLP weights, by torch.func."""
    tokens = model.to_tokens(text)
    return reference_gradient(model, tokens, torch.arange(tokens.shape[1] - 1), tokens[0, 1:])


def dot(a: dict, b: dict) -> float:
    return float(sum((a[k].detach().double() * b[k].detach().double()).sum() for k in a))


class TestExactScores:
    def test_query_gradient_is_the_torch_func_gradient(self, micro):
        """∇ log p(completion | prompt) per weight equals torch.func's, BOS use excluded."""
        weights = mlp_weights(micro)
        found = query_gradients(micro, weights, [QUERY])
        tokens = micro.to_tokens(QUERY[0] + QUERY[1])
        n_prompt = micro.to_tokens(QUERY[0]).shape[1]
        positions = torch.arange(n_prompt - 1, tokens.shape[1] - 1)
        expected = reference_gradient(micro, tokens, positions, tokens[0, n_prompt:])
        for name, value in expected.items():
            torch.testing.assert_close(found[name][0], value, atol=1e-5, rtol=1e-4)

    def test_identity_scores_are_gradient_dot_products(self, micro, factors):
        """With "identity", each text's score is ⟨∇f, ∇ log p(text)⟩ from torch.func, to 1e-5."""
        result = influence(micro, factors, *QUERY, TEXTS, top_k=len(TEXTS), settings=IDENTITY,
                           progress=False)  # fmt: skip
        tokens = micro.to_tokens(QUERY[0] + QUERY[1])
        n_prompt = micro.to_tokens(QUERY[0]).shape[1]
        query = reference_gradient(
            micro, tokens, torch.arange(n_prompt - 1, tokens.shape[1] - 1), tokens[0, n_prompt:]
        )
        for text_id, score in zip(result.text_ids, result.scores.tolist(), strict=True):
            expected = dot(query, text_gradient(micro, TEXTS[text_id]))
            assert score == pytest.approx(expected, rel=1e-4, abs=1e-5)
        layer_total = result.layer_scores.sum(-1)
        torch.testing.assert_close(layer_total, result.scores)

    @pytest.mark.parametrize("query_rank", [None, 3])
    def test_normalized_identity_scores_are_gradient_cosines(self, micro, factors, query_rank):
        """normalize=True with "identity" gives cos(∇f, ∇ log p(text)), full rank or cut."""
        cosine = ScoreSettings(strategy="identity", query_rank=query_rank, normalize=True)
        result = influence(micro, factors, *QUERY, TEXTS, top_k=len(TEXTS), settings=cosine,
                           progress=False)  # fmt: skip
        tokens = micro.to_tokens(QUERY[0] + QUERY[1])
        n_prompt = micro.to_tokens(QUERY[0]).shape[1]
        query = reference_gradient(
            micro, tokens, torch.arange(n_prompt - 1, tokens.shape[1] - 1), tokens[0, n_prompt:]
        )
        if query_rank is not None:
            for name, g in query.items():
                u, s, vh = torch.linalg.svd(g.double())
                query[name] = u[:, :query_rank] @ torch.diag(s[:query_rank]) @ vh[:query_rank]
        assert result.normalized
        for text_id, score in zip(result.text_ids, result.scores.tolist(), strict=True):
            text = text_gradient(micro, TEXTS[text_id])
            expected = dot(query, text) / (dot(query, query) * dot(text, text)) ** 0.5
            assert score == pytest.approx(expected, rel=1e-4, abs=1e-6)

    def test_a_subset_is_its_share_of_the_whole(self, micro, factors):
        """Scoring one layer, or W_out alone, gives that part of the identity dot product."""
        full = influence(micro, factors, *QUERY, TEXTS, top_k=len(TEXTS), settings=IDENTITY,
                         progress=False)  # fmt: skip
        layer = influence(micro, factors, *QUERY, TEXTS, top_k=len(TEXTS),
                          settings=ScoreSettings(layers=(1,), strategy="identity"),
                          progress=False)  # fmt: skip
        assert layer.layers == [1] and layer.layer_scores.shape == (len(TEXTS), 1)
        by_id = dict(zip(full.text_ids, full.layer_scores[:, 1].tolist(), strict=True))
        for text_id, score in zip(layer.text_ids, layer.scores.tolist(), strict=True):
            assert score == pytest.approx(by_id[text_id], rel=1e-6, abs=1e-9)
        w_out = influence(micro, factors, *QUERY, TEXTS, top_k=len(TEXTS),
                          settings=ScoreSettings(weights=("W_out",), strategy="identity"),
                          progress=False)  # fmt: skip
        tokens = micro.to_tokens(QUERY[0] + QUERY[1])
        n_prompt = micro.to_tokens(QUERY[0]).shape[1]
        query = reference_gradient(
            micro, tokens, torch.arange(n_prompt - 1, tokens.shape[1] - 1), tokens[0, n_prompt:]
        )
        query = {name: g for name, g in query.items() if name.endswith("W_out")}
        for text_id, score in zip(w_out.text_ids, w_out.scores.tolist(), strict=True):
            text = {n: g for n, g in text_gradient(micro, TEXTS[text_id]).items() if n in query}
            assert score == pytest.approx(dot(query, text), rel=1e-4, abs=1e-5)

    def test_token_scores_add_up_to_the_score(self, micro, factors):
        """The split by token sums to each top text's score (Eq. 31)."""
        result = influence(micro, factors, *QUERY, TEXTS, top_k=3, progress=False)
        for tokens, score in zip(result.token_scores, result.scores.tolist(), strict=True):
            assert float(tokens.sum()) == pytest.approx(score, rel=1e-4, abs=1e-6)

    def test_kfac_is_the_dense_kronecker_solve(self, micro, factors):
        """P = (A ⊗ S + λI)⁻¹ vec(∇f), built densely for layer 0's W_in."""
        name = "blocks.0.mlp.W_in"
        weight = next(w for w in mlp_weights(micro) if w.name == name)
        moments = accumulate_moments(
            micro, forward=[weight.input_hook], backward=[weight.output_hook], corpus=TEXTS * 3,
            n_tokens=400, labels="empirical", use_cache=False, progress=False,
        )  # fmt: skip
        a = input_factor(micro, weight, moments[weight.input_hook, "forward"])
        s = moments[weight.output_hook, "backward"].second_moment
        gradient = query_gradients(micro, [weight], [QUERY])[name]
        dense = torch.kron(a, s)
        damping = 0.1 * torch.linalg.eigvalsh(dense).mean()
        expected = torch.linalg.solve(
            dense + damping * torch.eye(len(dense)), gradient.double().flatten()
        )
        found = preconditioned_gradients(factors, {name: gradient}, "kfac")[name]
        torch.testing.assert_close(found.flatten().double(), expected, rtol=2e-3, atol=1e-6)

    def test_ekfac_is_its_dense_eigenbasis_formula(self, micro, factors):
        """P = Q (Λ + λ)⁻¹ Qᵀ vec(∇f) with Q = Q_A ⊗ Q_S, built densely for layer 1's W_out."""
        name = "blocks.1.mlp.W_out"
        gradient = query_gradients(micro, mlp_weights(micro, [1]), [QUERY])[name]
        basis = torch.kron(factors.input_vectors[name], factors.output_vectors[name]).double()
        values = factors.eigen_lambda[name].double().flatten()
        middle = 1 / (values + 0.1 * values.mean())
        expected = basis @ (middle * (basis.T @ gradient.double().flatten()))
        found = preconditioned_gradients(factors, {name: gradient}, "ekfac")[name]
        scale = float(expected.abs().max())  # the factors are stored in float32
        torch.testing.assert_close(found.flatten().double(), expected, rtol=1e-4, atol=1e-5 * scale)

    def test_ekfac_eigenvalues_are_rotated_sequence_gradients(self, micro, factors):
        """Λ = mean over sequences of (Q_Aᵀ G Q_S)², G from torch.func (the fitting texts)."""
        name = "blocks.1.mlp.W_out"
        q_a, q_s = factors.input_vectors[name].double(), factors.output_vectors[name].double()
        total = torch.zeros_like(factors.eigen_lambda[name], dtype=torch.float64)
        for text in TEXTS * 3:
            total += (q_a.T @ text_gradient(micro, text)[name].double() @ q_s).square()
        torch.testing.assert_close(
            factors.eigen_lambda[name].double(), total / (3 * len(TEXTS)), rtol=1e-3, atol=1e-9
        )
        assert factors.n_sequences == 3 * len(TEXTS)

    def test_diagonal_is_the_mean_squared_sequence_gradient(self, micro, tmp_path):
        """The diagonal strategy divides by E_seq[G²] in the weights' basis (G by torch.func)."""
        fitted = fit_influence_factors(micro, TEXTS, n_tokens=400, strategy="diagonal",
                                       fisher="empirical", cache_dir=tmp_path,
                                       progress=False)  # fmt: skip
        name = "blocks.0.mlp.W_in"
        expected = sum(text_gradient(micro, text)[name].double().square() for text in TEXTS)
        torch.testing.assert_close(
            fitted.diagonal[name].double(), expected / len(TEXTS), rtol=1e-3, atol=1e-9
        )
        gradient = query_gradients(micro, mlp_weights(micro, [0]), [QUERY])[name]
        values = fitted.diagonal[name]
        found = preconditioned_gradients(fitted, {name: gradient}, "diagonal")[name]
        torch.testing.assert_close(found, gradient / (values + 0.1 * values.mean()))
        assert not fitted.supports("ekfac") and fitted.supports("kfac")

    def test_every_scoring_form_gives_the_same_scores(self, micro, factors, monkeypatch):
        """Token by token and text by text (forced either way) score alike."""
        from rome_lens.influence import scan as scan_module

        queries = [QUERY, ("Steve Jobs founded", " Apple")]
        found = []
        for limit in (0, 10**6):
            monkeypatch.setattr(scan_module, "_TOKEN_FORM_LIMIT", limit)
            results = influence_many(micro, factors, queries, TEXTS, top_k=6, progress=False)
            found.append(torch.stack([r.all_scores for r in results]))
        torch.testing.assert_close(found[0], found[1], rtol=1e-5, atol=1e-8)

    def test_low_rank_scores_use_the_truncated_query(self, micro, factors):
        """With query_rank, a score is ⟨rank-r SVD cut of ∇f, ∇ log p(text)⟩ (identity)."""
        result = influence(micro, factors, *QUERY, TEXTS, top_k=len(TEXTS),
                           settings=ScoreSettings(strategy="identity", query_rank=3),
                           progress=False)  # fmt: skip
        tokens = micro.to_tokens(QUERY[0] + QUERY[1])
        n_prompt = micro.to_tokens(QUERY[0]).shape[1]
        query = reference_gradient(
            micro, tokens, torch.arange(n_prompt - 1, tokens.shape[1] - 1), tokens[0, n_prompt:]
        )
        cut = {}
        for name, g in query.items():
            u, s, vh = torch.linalg.svd(g.double())
            cut[name] = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        for text_id, score in zip(result.text_ids, result.scores.tolist(), strict=True):
            expected = dot(cut, text_gradient(micro, TEXTS[text_id]))
            assert score == pytest.approx(expected, rel=1e-4, abs=1e-5)

    def test_low_rank_queries_in_groups_match_one_group(self, micro, factors, monkeypatch):
        """Cutting queries to low rank two at a time gives the scores of all at once."""
        queries = [QUERY, ("Steve Jobs founded", " Apple"), ("Berlin is the capital of",
                   " Germany"), ("The Louvre is a", " museum"), ("Cats", " sleep")]  # fmt: skip
        kwargs = {"top_k": 2, "settings": ScoreSettings(query_rank=3), "progress": False}
        whole = influence_many(micro, factors, queries, TEXTS, **kwargs)
        monkeypatch.setattr(rome_lens.influence.scan, "_QUERY_GROUP", 2)
        grouped = influence_many(micro, factors, queries, TEXTS, **kwargs)
        for a, b in zip(whole, grouped, strict=True):  # float32 gradients of other batch shapes
            scale = float(a.all_scores.abs().max())
            torch.testing.assert_close(a.all_scores, b.all_scores, rtol=1e-4, atol=1e-4 * scale)
            for x, y in zip(a.token_scores, b.token_scores, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * scale)

    @pytest.mark.parametrize("query_rank", [None, 3])
    def test_one_pass_for_several_strategies_matches_one_each(self, micro, tmp_path, query_rank):
        """score_texts gives each strategy's influence_many scores, and the cosine from norms."""
        both = [
            fit_influence_factors(
                micro,
                TEXTS * 3,
                n_tokens=400,
                strategy=strategy,
                cache_dir=tmp_path,
                progress=False,
            )  # fmt: skip
            for strategy in ("ekfac", "diagonal")
        ]
        queries = [QUERY, ("Steve Jobs founded", " Apple")]
        strategies = ("ekfac", "kfac", "diagonal", "identity")
        found = score_texts(micro, both, queries, TEXTS, strategies=strategies,
                            settings=ScoreSettings(query_rank=query_rank),
                            progress=False)  # fmt: skip
        for strategy in strategies:
            fit = both[1] if strategy == "diagonal" else both[0]
            settings = ScoreSettings(strategy=strategy, query_rank=query_rank)
            results = influence_many(micro, fit, queries, TEXTS, top_k=1, settings=settings,
                                     progress=False)  # fmt: skip
            expected = torch.stack([r.all_scores for r in results], 1)
            scale = float(expected.abs().max())  # float32 sums in another order
            torch.testing.assert_close(
                found.scores[strategy], expected, rtol=1e-4, atol=1e-5 * scale
            )
        settings = ScoreSettings(strategy="identity", query_rank=query_rank, normalize=True)
        cosine = influence_many(micro, both[0], queries, TEXTS, top_k=1, settings=settings,
                                progress=False)  # fmt: skip
        from_norms = found.scores["identity"] / (
            found.text_norms[:, None] * found.query_norms["identity"][None]
        )
        expected = torch.stack([r.all_scores for r in cosine], 1)
        torch.testing.assert_close(from_norms, expected, rtol=1e-4, atol=1e-7)

    @pytest.mark.parametrize("shape", [(3, 40, 12), (3, 12, 40)])
    def test_low_rank_is_the_truncated_svd(self, shape):
        """low_rank's L Rᵀ equals the SVD truncated to the same rank, tall or wide."""
        m = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        left, right = low_rank(m, 5)
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        expected = (u[..., :5] * s[..., None, :5]) @ vh[..., :5, :]
        torch.testing.assert_close((left @ right.mT).double(), expected, atol=1e-5, rtol=1e-5)
        assert left.shape == (*shape[:2], 5) and right.shape == (shape[0], shape[2], 5)

    def test_low_rank_queries_agree(self, micro, factors):
        """Rank-4 preconditioned queries rank the texts almost as full rank does."""
        full = influence(micro, factors, *QUERY, TEXTS, top_k=6, progress=False)
        low = influence(micro, factors, *QUERY, TEXTS, top_k=6,
                        settings=ScoreSettings(query_rank=4), progress=False)  # fmt: skip
        assert low.text_ids[0] == full.text_ids[0]


class TestScienceOfTheSign:
    def test_the_query_itself_ranks_first(self, tiny, tmp_path):
        """A training text identical to the query scores above the unrelated ones."""
        factors = fit_influence_factors(tiny, TEXTS * 2, layers=[1, 2], n_tokens=300,
                                        cache_dir=tmp_path, progress=False)  # fmt: skip
        corpus = ["Cats sleep most of the day.", QUERY[0] + QUERY[1], "Steve Jobs founded Apple."]
        result = influence(tiny, factors, *QUERY, corpus, top_k=3, progress=False)
        assert result.text_ids[0] == 1 and float(result.scores[0]) > float(result.scores[1])

    def test_many_queries_share_one_scan(self, micro, factors):
        """influence_many gives each query the scores influence gives it alone."""
        queries = [QUERY, ("Steve Jobs founded", " Apple")]
        together = influence_many(micro, factors, queries, TEXTS, top_k=6, progress=False)
        for query, result in zip(queries, together, strict=True):
            alone = influence(micro, factors, *query, TEXTS, top_k=6, progress=False)
            assert result.text_ids == alone.text_ids
            scale = float(alone.scores.abs().max())  # float32 sums in another order
            torch.testing.assert_close(result.scores, alone.scores, rtol=0, atol=1e-5 * scale)

    def test_prefilter_keeps_bm25s_choice(self, micro, factors):
        """With a prefilter only BM25's top texts are scored."""
        result = influence(micro, factors, *QUERY, TEXTS, top_k=2,
                           settings=ScoreSettings(prefilter=2), progress=False)  # fmt: skip
        assert len(result.all_ids) == 2 and 0 in result.all_ids


class TestFactors:
    def test_w_out_input_factor_is_romes_key_statistics(self, tiny, tmp_path):
        """For W_out, A's top-left block is ROME's C (one cache entry), then the bias column."""
        stats = key_second_moment(tiny, 1, corpus=TEXTS, n_tokens=200, cache_dir=tmp_path,
                                  progress=False)  # fmt: skip
        factors = fit_influence_factors(tiny, TEXTS, layers=[1], n_tokens=200, strategy="kfac",
                                        cache_dir=tmp_path, progress=False)  # fmt: skip
        name = "blocks.1.mlp.W_out"
        values, vectors = factors.input_values[name], factors.input_vectors[name]
        a = (vectors.double() * values.double()) @ vectors.double().T
        d = tiny.cfg.d_mlp
        torch.testing.assert_close(a[:d, :d], stats.moment, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[:d, d], stats.moments.mean, rtol=1e-4, atol=1e-5)
        assert len(list((tmp_path / "moments").glob("*.st"))) == 1  # the one entry, shared

    def test_one_layer_per_pass_gives_the_same_factors(self, micro, factors, tmp_path):
        """Summing the layers in separate passes over the corpus changes no factor."""
        apart = fit_influence_factors(
            micro, TEXTS * 3, n_tokens=400, fisher="empirical", layers_per_pass=1,
            cache_dir=tmp_path, progress=False,
        )  # fmt: skip
        for table in ("input_values", "output_values", "eigen_lambda"):
            for name in factors.names:
                torch.testing.assert_close(
                    getattr(apart, table)[name], getattr(factors, table)[name], rtol=1e-5,
                    atol=1e-7,
                )  # fmt: skip

    def test_factors_come_complete(self, micro, factors):
        """Every weight has its eigenbases and its Λ; the counts and the time are set."""
        for table in ("input_vectors", "input_values", "output_vectors", "output_values",
                      "eigen_lambda"):  # fmt: skip
            assert list(getattr(factors, table)) == factors.names, table
        assert factors.diagonal == {}
        tokens = sum(micro.to_tokens(text).shape[1] - len(bos_tokens(micro)) for text in TEXTS)
        assert factors.n_tokens == 3 * tokens  # the corpus runs out before 400
        assert factors.n_sequences == 3 * len(TEXTS) and factors.seconds > 0

    def test_passes_follow_the_memory_free(self, micro, monkeypatch):
        """With room for one layer's moments at a time, each layer gets its own pass."""
        chosen = mlp_weights(micro, [0, 1])
        one_layer = moment_bytes(micro, [w for w in chosen if w.layer == 0])
        assert layer_passes(micro, chosen) == [[0, 1]]  # this machine holds both
        monkeypatch.setattr(factors_module, "available_memory", lambda device: 3 * one_layer)
        assert layer_passes(micro, chosen) == [[0], [1]]
        with pytest.raises(ValueError, match="layers_per_pass must be >= 1, got 0"):
            layer_passes(micro, chosen, 0)

    def test_cached_and_rebuilt_when_corrupt(self, micro, factors, tmp_path, monkeypatch):
        """A second fit loads the cache; a damaged file is reported and rebuilt."""
        kwargs = {"n_tokens": 200, "strategy": "kfac", "cache_dir": tmp_path, "progress": False}
        first = fit_influence_factors(micro, TEXTS, **kwargs)
        (path,) = (tmp_path / "influence").glob("*.st")
        path.write_bytes(b"broken")
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            again = fit_influence_factors(micro, TEXTS, **kwargs)
        assert torch.equal(
            first.input_vectors["blocks.0.mlp.W_in"], again.input_vectors["blocks.0.mlp.W_in"]
        )

    def test_fitting_leaves_the_model_as_it_was(self, micro, tmp_path):
        """No weight changes, no hook stays, no gradient lands, requires_grad flags kept."""
        before = weights(micro)
        flags = [p.requires_grad for p in micro.parameters()]
        fit_influence_factors(micro, TEXTS, n_tokens=100, use_cache=False, progress=False)
        influence(micro, fit_influence_factors(micro, TEXTS, n_tokens=100, strategy="kfac",
                  use_cache=False, progress=False), *QUERY, TEXTS, progress=False)  # fmt: skip
        assert_same_weights(micro, before)
        assert hooks_left(micro) == 0
        assert [p.requires_grad for p in micro.parameters()] == flags
        assert all(p.grad is None for p in micro.parameters())

    def test_an_interrupt_mid_fit_leaves_no_hook(self, micro, monkeypatch):
        """An exception in the eigenvalue pass leaves no hook and the flags as they were."""
        calls = []
        real = factors_module.sequence_gradients

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(factors_module, "sequence_gradients", failing)
        flags = [p.requires_grad for p in micro.parameters()]
        with pytest.raises(KeyboardInterrupt):
            fit_influence_factors(micro, TEXTS, n_tokens=300, use_cache=False, batch_size=2,
                                  progress=False)  # fmt: skip
        assert hooks_left(micro) == 0
        assert [p.requires_grad for p in micro.parameters()] == flags


class TestBadInput:
    def test_empty_completion(self, micro, factors):
        with pytest.raises(ValueError, match="completion must be a non-empty string, got ' '"):
            influence(micro, factors, QUERY[0], " ", TEXTS, progress=False)

    def test_too_long(self, micro, factors):
        with pytest.raises(ValueError, match=r"have \d+ tokens, more than the model's n_ctx=64"):
            influence(micro, factors, "The Louvre " * 20, " Paris" * 30, TEXTS, progress=False)

    def test_factors_of_another_model(self, tiny, factors):
        with pytest.raises(ValueError, match="another model"):
            influence(tiny, factors, *QUERY, TEXTS, progress=False)

    def test_factors_of_other_layers(self, micro, tmp_path):
        only_one = fit_influence_factors(micro, TEXTS, layers=[0], n_tokens=100, strategy="kfac",
                                         cache_dir=tmp_path, progress=False)  # fmt: skip
        with pytest.raises(ValueError, match=r"factors cover layers \[0\], not \[1\]"):
            influence(micro, only_one, *QUERY, TEXTS, settings=ScoreSettings(layers=(1,)),
                      progress=False)  # fmt: skip

    def test_empty_corpus_and_top_k(self, micro, factors):
        with pytest.raises(ValueError, match="corpus must hold texts"):
            influence(micro, factors, *QUERY, [], progress=False)
        with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
            influence(micro, factors, *QUERY, TEXTS, top_k=0, progress=False)

    def test_a_strategy_the_factors_lack(self, micro, tmp_path):
        kfac = fit_influence_factors(micro, TEXTS, n_tokens=100, strategy="kfac",
                                     cache_dir=tmp_path, progress=False)  # fmt: skip
        with pytest.raises(ValueError, match="fitted for 'kfac'.*fit with strategy='ekfac'"):
            influence(micro, kfac, *QUERY, TEXTS, settings=ScoreSettings(strategy="ekfac"),
                      progress=False)  # fmt: skip
        with pytest.raises(ValueError, match="strategy must be one of"):
            fit_influence_factors(micro, TEXTS, strategy="newton", progress=False)  # type: ignore[arg-type]

    def test_weights_unknown_or_not_fitted(self, micro, tmp_path):
        with pytest.raises(ValueError, match=r"weights must name some of .*got \['W_up'\]"):
            fit_influence_factors(micro, TEXTS, weights=["W_up"], progress=False)
        with pytest.raises(ValueError, match="have no \\['W_gate'\\]"):
            fit_influence_factors(micro, TEXTS, weights=["W_gate"], progress=False)
        w_out = fit_influence_factors(micro, TEXTS, weights=["W_out"], n_tokens=100,
                                      strategy="kfac", cache_dir=tmp_path,
                                      progress=False)  # fmt: skip
        assert w_out.names == ["blocks.0.mlp.W_out", "blocks.1.mlp.W_out"]
        with pytest.raises(ValueError, match=r"not \['blocks.0.mlp.W_in', 'blocks.1.mlp.W_in'\]"):
            influence(micro, w_out, *QUERY, TEXTS, settings=ScoreSettings(weights=("W_in",)),
                      progress=False)  # fmt: skip

    def test_layer_out_of_range(self, micro):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\), got 5"):
            fit_influence_factors(micro, TEXTS, layers=[5], progress=False)


def test_tiny_model_has_every_weight(tiny):
    """A standard MLP gives W_in (with its bias) and W_out per layer."""
    names = [w.name for w in mlp_weights(tiny)]
    assert names == [f"blocks.{layer}.mlp.{w}" for layer in range(3) for w in ("W_in", "W_out")]
    assert rome_lens.tiny_model is not None


class TestScoreSettings:
    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"damping": -1.0}, "damping must be a finite number >= 0, got -1.0"),
            ({"damping": float("nan")}, "damping must be a finite number >= 0, got nan"),
            ({"query_rank": 0}, "query_rank must be a positive integer or None, got 0"),
            ({"prefilter": 2.5}, "prefilter must be a positive integer or None, got 2.5"),
            ({"strategy": "newton"}, "strategy must be one of .*, got 'newton'"),
            ({"layers": (1, -2)}, r"each an integer >= 0, got \[1, -2\]"),
            ({"layers": ()}, r"layers must name at least one layer, .*got \[\]"),
            ({"weights": ("W_up",)}, r"weights must name some of .*, got \['W_up'\]"),
            ({"normalize": "yes"}, "normalize must be True or False, got 'yes'"),
        ],
    )
    def test_a_bad_value_is_named(self, fields, message):
        """Each field is checked when the settings are made, and the error shows the value."""
        with pytest.raises(ValueError, match=message):
            ScoreSettings(**fields)

    def test_sequences_become_tuples_that_compare_by_value(self):
        """Layers are kept ascending and once each; equal settings are equal and hash alike."""
        settings = ScoreSettings(layers=[2, 1, 2], weights=["W_out"])  # type: ignore[arg-type]
        assert settings.layers == (1, 2) and settings.weights == ("W_out",)
        same = ScoreSettings(layers=(1, 2), weights=("W_out",))
        assert settings == same and hash(settings) == hash(same)
        with pytest.raises(AttributeError):
            settings.damping = 0.2  # type: ignore[misc]

    @pytest.mark.parametrize("caller", ["influence", "influence_many", "score_texts"])
    def test_old_keywords_warn_once_and_score_as_settings(self, micro, factors, caller):
        """The keywords of before warn once, at the caller's line, and give the same scores."""
        fields = {"damping": 0.2, "query_rank": 3}
        run = {
            "influence": lambda **kw: [influence(micro, factors, *QUERY, TEXTS, **kw)],
            "influence_many": lambda **kw: influence_many(micro, factors, [QUERY], TEXTS, **kw),
            "score_texts": lambda **kw: [score_texts(micro, factors, [QUERY], TEXTS, **kw)],
        }[caller]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = run(progress=False, **fields)
        assert [w.category for w in caught] == [DeprecationWarning]
        assert f"{caller}(damping=0.2, query_rank=3) is deprecated" in str(caught[0].message)
        assert "settings=ScoreSettings(damping=0.2, query_rank=3)" in str(caught[0].message)
        assert caught[0].filename == __file__
        new = run(progress=False, settings=ScoreSettings(**fields))
        for a, b in zip(old, new, strict=True):
            if caller == "score_texts":
                assert torch.equal(a.scores["ekfac"], b.scores["ekfac"])
            else:
                assert a.text_ids == b.text_ids and torch.equal(a.all_scores, b.all_scores)

    def test_settings_given_twice_or_unknown_raise(self, micro, factors):
        """Settings both as settings= and as keywords, or a keyword that is none, raise."""
        with pytest.raises(TypeError, match=r"not both: move \['damping'\]"):
            influence(micro, factors, *QUERY, TEXTS, settings=ScoreSettings(), damping=0.2)
        with pytest.raises(TypeError, match="unexpected keyword argument 'dampening'"):
            influence(micro, factors, *QUERY, TEXTS, dampening=0.2)
        with pytest.raises(TypeError, match="unexpected keyword argument 'strategy'"):
            score_texts(micro, factors, [QUERY], TEXTS, strategy="kfac")  # it never took one

    def test_score_texts_refuses_what_it_gives_another_way(self, micro, factors):
        """score_texts takes strategies=, returns the norms and scores every text."""
        for fields in ({"strategy": "kfac"}, {"normalize": True}, {"prefilter": 2}):
            name = next(iter(fields))
            with pytest.raises(ValueError, match=f"score_texts takes no settings.{name}"):
                score_texts(micro, factors, [QUERY], TEXTS, settings=ScoreSettings(**fields))

    def test_score_texts_scores_the_chosen_weights(self, micro, factors):
        """score_texts with a layer and a weight kind gives influence_many's scores of them."""
        chosen = ScoreSettings(layers=(1,), weights=("W_out",))
        found = score_texts(micro, factors, [QUERY], TEXTS, strategies=("identity",),
                            settings=chosen, progress=False)  # fmt: skip
        (expected,) = influence_many(micro, factors, [QUERY], TEXTS, top_k=1,
                                     settings=replace(chosen, strategy="identity"),
                                     progress=False)  # fmt: skip
        torch.testing.assert_close(found.scores["identity"][:, 0], expected.all_scores)


class TestOtherRankings:
    def test_bm25_and_fused_tops_come_with_the_result(self, micro, factors):
        """rankings holds BM25's top texts and the reciprocal-rank fusion of both rankings."""
        from rome_lens.influence import bm25_top

        result = influence(micro, factors, *QUERY, TEXTS, top_k=3, progress=False)
        words = bm25_top(TEXTS, [f"{QUERY[0]} {QUERY[1].strip()}"], len(TEXTS))[0]
        assert result.rankings["bm25"] == words[:3]
        by_scores = result.all_scores.argsort(descending=True).tolist()
        fused = {
            i: 1 / (60 + by_scores.index(i) + 1) + 1 / (60 + words.index(i) + 1)
            for i in range(len(TEXTS))
        }
        assert result.rankings["fused"] == sorted(fused, key=lambda i: -fused[i])[:3]
        table = result.to_dataframe()
        first_bm25 = words[0]
        if first_bm25 in result.text_ids:
            assert table.set_index("text_id").loc[first_bm25, "bm25_rank"] == 1
        html = result.widget().html()
        assert "also top by" in html and "Three rankings of the same texts" in html
