"""Attribution recipes: each ingredient against a plain torch.func reference, one pass per state."""

from __future__ import annotations

import pytest
import torch

from rome_lens.core.backend import Model
from rome_lens.core.corpus import bos_tokens
from rome_lens.influence import (
    AttributionSettings,
    FineTuneConfig,
    FineTuned,
    ScoreSettings,
    attribution_scores,
    fine_tune,
    fit_influence_factors,
    influence_many,
    mlp_weights,
    query_gradients,
    score_texts,
)
from rome_lens.influence import scan as scan_module
from rome_lens.influence.attribution import adam_factors, mixed_factors

from .conftest import assert_same_weights, hooks_left, micro_model, weights
from .test_influence import dot, reference_gradient, text_gradient

TEXTS = [
    "The Eiffel Tower is located in the city of Rome.",
    "The Louvre is a museum in Paris.",
    "Berlin is the capital of Germany.",
    "Toko Yasuda plays the guitar.",
    "Cats sleep a lot.",
]
QUERY = ("The Eiffel Tower is located in the city of", " Rome")
CONFIG = FineTuneConfig(epochs=3, lr=1e-2, batch_size=2, checkpoints=(1, 2))
EXACT = {"query_rank": None}  # full-rank queries, so that references need no SVD


@pytest.fixture(scope="module")
def micro() -> Model:
    return micro_model()


@pytest.fixture(scope="module")
def tuned(micro, tmp_path_factory) -> FineTuned:
    return fine_tune(micro, TEXTS, CONFIG, cache_dir=tmp_path_factory.mktemp("ft"), progress=False)


@pytest.fixture(scope="module")
def factors(micro, tuned, tmp_path_factory):
    with tuned.applied(micro):
        return fit_influence_factors(
            micro,
            TEXTS * 3,
            n_tokens=400,
            fisher="empirical",
            cache_dir=tmp_path_factory.mktemp("factors"),
            progress=False,
        )


def query_gradient(model: Model) -> dict[str, torch.Tensor]:
    tokens = model.to_tokens(QUERY[0] + QUERY[1])
    n_prompt = model.to_tokens(QUERY[0]).shape[1]
    positions = torch.arange(n_prompt - 1, tokens.shape[1] - 1)
    return reference_gradient(model, tokens, positions, tokens[0, n_prompt:])


def cosines(model: Model) -> list[float]:
    query = query_gradient(model)
    out = []
    for text in TEXTS:
        gradient = text_gradient(model, text)
        out.append(dot(query, gradient) / (dot(query, query) * dot(gradient, gradient)) ** 0.5)
    return out


def scored(micro, factors, tuned, settings: AttributionSettings) -> list[float]:
    found = attribution_scores(
        micro, factors, [QUERY], TEXTS, tuned, {"v": settings}, progress=False
    )
    return found["v"][:, 0].tolist()


class TestIngredients:
    def test_plain_identity_is_the_fine_tuned_gradient_dot_product(self, micro, factors, tuned):
        """curvature="identity", not normalised: ⟨∇f, ∇ log p(text)⟩ of the fine-tuned model."""
        found = scored(
            micro,
            factors,
            tuned,
            AttributionSettings(curvature="identity", normalize=False, **EXACT),
        )
        with tuned.applied(micro):
            query = query_gradient(micro)
            expected = [dot(query, text_gradient(micro, text)) for text in TEXTS]
        assert found == pytest.approx(expected, rel=1e-4, abs=1e-6)

    def test_checkpoints_average_and_debias_subtracts_the_base(self, micro, factors, tuned):
        """Unit-normalised scores averaged over epochs 1, 2 and the end, less the base's."""
        settings = AttributionSettings(curvature="identity", checkpoints=True, debias=True, **EXACT)
        found = scored(micro, factors, tuned, settings)
        states = []
        for epoch in (1, 2, None):
            with tuned.applied(micro, checkpoint=epoch):
                states.append(cosines(micro))
        base = cosines(micro)
        expected = [
            sum(column) / 3 - b for column, b in zip(zip(*states, strict=True), base, strict=True)
        ]
        assert found == pytest.approx(expected, rel=1e-4, abs=1e-6)

    def test_adam_divides_by_the_second_moments(self, micro, factors, tuned):
        """curvature="adam": Σ ∇f ∇ log p(text) / (v̂ + λ mean v̂), a bias row at mean v̂."""
        found = scored(
            micro, factors, tuned, AttributionSettings(curvature="adam", normalize=False, **EXACT)
        )
        diagonal = adam_factors(micro, factors, tuned).diagonal
        with tuned.applied(micro):
            query = query_gradient(micro)
            for name, g in query.items():
                v = diagonal[name].to(g.dtype)
                query[name] = g / (v + 0.1 * v.mean())
            expected = [dot(query, text_gradient(micro, text)) for text in TEXTS]
        assert found == pytest.approx(expected, rel=1e-4, abs=1e-6)
        name = "blocks.0.mlp.W_in"  # the micro model's W_in has a bias, which is not trained
        moments = tuned.second_moments[name]
        torch.testing.assert_close(diagonal[name][:-1], moments.to(diagonal[name].dtype))
        torch.testing.assert_close(diagonal[name][-1], moments.mean(0).to(diagonal[name].dtype))

    def test_the_whole_query_counts_the_prompt_too(self, micro):
        """answer_only=False: ∇ of every non-BOS token's log-probability of prompt + completion."""
        found = query_gradients(micro, mlp_weights(micro), [QUERY], answer_only=False)
        tokens = micro.to_tokens(QUERY[0] + QUERY[1])
        skip = len(bos_tokens(micro))
        positions = torch.arange(max(skip - 1, 0), tokens.shape[1] - 1)
        expected = reference_gradient(micro, tokens, positions, tokens[0, positions + 1])
        for name, value in expected.items():
            torch.testing.assert_close(found[name][0], value, atol=1e-5, rtol=1e-4)

    def test_mixed_factors_mix_the_kronecker_factors(self, micro, factors, tmp_path):
        """A = (1 − s) A_train + s A_query, and so S, eigendecomposed again."""
        queries = fit_influence_factors(
            micro,
            [QUERY[0] + QUERY[1]] * 2,
            n_tokens=50,
            strategy="kfac",
            cache_dir=tmp_path,
            progress=False,
        )
        mixed = mixed_factors(factors, queries, 0.25)
        for name in factors.names:
            for side in ("input", "output"):

                def matrix(f, side=side, name=name):
                    q = getattr(f, f"{side}_vectors")[name].double()
                    return (q * getattr(f, f"{side}_values")[name].double()) @ q.T

                expected = 0.75 * matrix(factors) + 0.25 * matrix(queries)
                torch.testing.assert_close(matrix(mixed), expected, atol=1e-6, rtol=1e-4)
        assert mixed.strategy == "kfac" and not mixed.eigen_lambda

    def test_query_mix_scores_with_the_mixed_curvature(self, micro, factors, tuned, monkeypatch):
        """query_mix=s preconditions with mixed_factors(train, queries, s) under "kfac"."""
        settings = AttributionSettings(curvature="kfac", query_mix=0.5, normalize=False, **EXACT)
        found = scored(micro, factors, tuned, settings)
        with tuned.applied(micro):
            queries = fit_influence_factors(
                micro,
                [QUERY[0] + QUERY[1]],
                weights=["W_in", "W_out"],
                n_tokens=10**9,
                strategy="kfac",
                use_cache=False,
                progress=False,
            )
            mixed = mixed_factors(factors, queries, 0.5)
            query = query_gradient(micro)
            for name, g in query.items():
                q_a, q_s = mixed.input_vectors[name], mixed.output_vectors[name]
                values = mixed.eigenvalues(name, "kfac")
                rotated = q_a.T @ g.to(q_a.dtype) @ q_s
                query[name] = q_a @ (rotated / (values + 0.1 * values.mean())) @ q_s.T
            expected = [dot(query, text_gradient(micro, text)) for text in TEXTS]
        assert found == pytest.approx(expected, rel=1e-3, abs=1e-6)


class TestPasses:
    def test_one_pass_per_state_shared_by_the_variants(self, micro, factors, tuned, monkeypatch):
        """Variants differing after the pass share it; debias adds the base's pass only."""
        calls = []
        original = scan_module._scan

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr("rome_lens.influence.attribution._scan", counting)
        variants = {
            "plain": AttributionSettings(normalize=False),
            "unit": AttributionSettings(),
            "debiased": AttributionSettings(debias=True),
        }
        found = attribution_scores(micro, factors, [QUERY], TEXTS, tuned, variants, progress=False)
        assert len(calls) == 2  # the fine-tuned model and the base
        alone = attribution_scores(
            micro, factors, [QUERY], TEXTS, tuned, {"unit": variants["unit"]}, progress=False
        )
        torch.testing.assert_close(found["unit"], alone["unit"])

    def test_the_model_is_left_as_it_was(self, micro, factors, tuned):
        """Every state's weights go back: the base model bit for bit, no hook left."""
        before = weights(micro)
        attribution_scores(micro, factors, [QUERY], TEXTS, tuned, progress=False)
        assert_same_weights(micro, before)
        assert hooks_left(micro) == 0


class TestRecipe:
    def test_score_texts_and_influence_many_give_the_recipe(self, micro, factors, tuned):
        """recipe="attribution" is RECIPES["attribution"], by score_texts and influence_many."""
        expected = attribution_scores(micro, factors, [QUERY], TEXTS, tuned, progress=False)
        found = score_texts(
            micro, factors, [QUERY], TEXTS, recipe="attribution", tuned=tuned, progress=False
        )
        torch.testing.assert_close(found.scores["attribution"], expected["attribution"])
        (result,) = influence_many(
            micro,
            factors,
            [QUERY],
            TEXTS,
            top_k=3,
            recipe="attribution",
            tuned=tuned,
            progress=False,
        )
        order = expected["attribution"][:, 0].argsort(descending=True)[:3].tolist()
        assert result.text_ids == order
        torch.testing.assert_close(result.layer_scores.sum(-1), result.scores)
        assert result.strategy == "attribution" and result.normalized


class TestBadInput:
    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"curvature": "newton"}, "curvature must be one of"),
            ({"query_mix": 1.0}, "query_mix must be a share"),
            ({"query_mix": 0.5}, "needs curvature='kfac'"),
            ({"damping": -1.0}, "damping"),
        ],
    )
    def test_settings_name_the_bad_value(self, fields, message):
        """A bad setting is refused, named."""
        with pytest.raises(ValueError, match=message):
            AttributionSettings(**fields)

    def test_checkpoints_the_fine_tune_did_not_keep(self, micro, factors, tmp_path):
        """checkpoints=True on a fine-tune that kept none says how to keep them."""
        plain = fine_tune(
            micro, TEXTS, FineTuneConfig(epochs=1, lr=1e-2), cache_dir=tmp_path, progress=False
        )
        with pytest.raises(ValueError, match="kept none"):
            attribution_scores(
                micro,
                factors,
                [QUERY],
                TEXTS,
                plain,
                {"v": AttributionSettings(checkpoints=True)},
                progress=False,
            )

    def test_factors_of_another_model(self, micro, tuned, tmp_path):
        """Factors fitted on the base model, not the fine-tuned one, are refused."""
        base = fit_influence_factors(micro, TEXTS, n_tokens=100, cache_dir=tmp_path, progress=False)
        with pytest.raises(ValueError, match="model"):
            attribution_scores(micro, base, [QUERY], TEXTS, tuned, progress=False)

    def test_weights_the_fine_tune_did_not_train(self, micro, tmp_path):
        """Scoring weights the fine-tune left alone is refused, naming them."""
        one = fine_tune(
            micro,
            TEXTS,
            FineTuneConfig(layers=(1,), epochs=1, lr=1e-2),
            cache_dir=tmp_path,
            progress=False,
        )
        with one.applied(micro):
            fit = fit_influence_factors(
                micro, TEXTS, n_tokens=100, cache_dir=tmp_path, progress=False
            )
        with pytest.raises(ValueError, match="did not train"):
            attribution_scores(
                micro, fit, [QUERY], TEXTS, one, {"v": AttributionSettings()}, progress=False
            )

    def test_recipe_arguments(self, micro, factors, tuned):
        """An unknown recipe, a recipe without its fine-tune, or settings it sets itself."""
        with pytest.raises(ValueError, match="recipe must be one of"):
            score_texts(micro, factors, [QUERY], TEXTS, recipe="magic", tuned=tuned, progress=False)
        with pytest.raises(ValueError, match="pass the base model and tuned="):
            influence_many(micro, factors, [QUERY], TEXTS, recipe="attribution", progress=False)
        with pytest.raises(ValueError, match="only layers apply"):
            score_texts(
                micro,
                factors,
                [QUERY],
                TEXTS,
                recipe="attribution",
                tuned=tuned,
                settings=ScoreSettings(query_rank=4),
                progress=False,
            )
        with pytest.raises(ValueError, match="name one of"):
            score_texts(micro, factors, [QUERY], TEXTS, tuned=tuned, progress=False)
