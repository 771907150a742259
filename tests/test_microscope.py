"""LLM-Microscope on the tiny model: exact cases, the released code's numbers, bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import rome_lens
from rome_lens.analysis import (
    ContextAdapter,
    ContextHyperParams,
    LinearMaps,
    anisotropy_of,
    contextualization,
    fit_linear_maps,
    intermediate_predictions,
    layer_linearity,
    linearity_score,
    representation_geometry,
    residual_states,
    text_states,
    token_nonlinearity,
    train_context_adapter,
    two_nn_dimension,
)
from rome_lens.analysis import context as context_module
from rome_lens.core import backend
from rome_lens.viz import token_layer_widget

from .conftest import hooks_left

TEXT = "The Eiffel Tower is located in the city of Paris. The Louvre is a museum in Paris."
QUICK = ContextHyperParams(prefix_length=3, steps=4, n_tokens=300, tokens_per_step=8)


def released():
    """LLM-Microscope 0.0.7's functions.py, loaded on its own (its __init__ does not import)."""
    spec = importlib.util.find_spec("llm_microscope")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-microscope 0.0.7 is not installed (it is in the dev extras)")
    path = Path(next(iter(spec.submodule_search_locations))) / "functions.py"
    module_spec = importlib.util.spec_from_file_location("llm_microscope_functions", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def identity_block():
    """A tiny model whose block 1 adds nothing: attention and MLP outputs are zeroed."""
    model = rome_lens.tiny_model(seed=3)
    if backend.is_bridge(model):  # the wrapped GPT-2's output projections
        block = model.original_model.transformer.h[1]
        outputs = [*block.attn.c_proj.parameters(), *block.mlp.c_proj.parameters()]
    else:
        names = ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")
        outputs = [model.get_parameter(f"blocks.1.{name}") for name in names]
    with torch.no_grad():
        for param in outputs:
            param.zero_()
    return model


@pytest.fixture(scope="module")
def maps(tiny, tmp_path_factory):
    """Linear maps of the tiny model fitted on 400 sampled tokens."""
    folder = tmp_path_factory.mktemp("maps")
    return fit_linear_maps(tiny, n_tokens=400, cache_dir=folder, progress=False)


@pytest.fixture(scope="module")
def states(tiny):
    """The tiny model's residual streams over 300 sampled tokens."""
    return residual_states(tiny, None, n_tokens=300, progress=False)


class TestLinearity:
    def test_an_exactly_linear_block_scores_one(self, identity_block, tmp_path):
        """A block that passes the residual stream through unchanged has linearity 1."""
        result = layer_linearity(identity_block, n_tokens=200, cache_dir=tmp_path, progress=False)
        assert float(result.linearity[1]) == pytest.approx(1.0, abs=1e-9)
        assert float(result.linearity_without_residual[1]) == 1.0  # Y − X = 0: constant
        assert float(result.linearity[0]) < 1 - 1e-3  # a real block is not

    def test_an_exactly_linear_block_has_no_token_nonlinearity(self, identity_block, tmp_path):
        """Token nonlinearity of the pass-through block is 0 for every token."""
        maps = fit_linear_maps(identity_block, n_tokens=200, cache_dir=tmp_path, progress=False)
        result = token_nonlinearity(identity_block, TEXT, maps=maps, progress=False)
        assert float(result.errors[1].abs().max()) < 1e-5
        assert float(result.errors[0].min()) > 0

    def test_scores_match_a_plain_least_squares(self, states):
        """The score is 1 − ‖XA − Y‖² with A from a dense pseudo-inverse, written out here."""
        x, y = states.states[1].double(), states.states[2].double()
        xn = (x - x.mean(0)) / (x - x.mean(0)).norm()
        yn = (y - y.mean(0)) / (y - y.mean(0)).norm()
        a = torch.linalg.pinv(xn) @ yn
        assert linearity_score(x, y) == pytest.approx(
            float(1 - (xn @ a - yn).square().sum()), abs=1e-9
        )

    def test_token_errors_average_to_the_reference_score(self, tiny, maps):
        """Over the reference tokens the mean squared token error is 1 − linearity."""
        states = residual_states(tiny, None, n_tokens=400, progress=False)
        errors = maps.errors(states.states)
        torch.testing.assert_close(
            errors.double().square().mean(1), 1 - maps.linearity, atol=1e-4, rtol=1e-4
        )

    def test_maps_are_cached_and_keyed_by_model(self, tiny, tmp_path, monkeypatch):
        """A second fit loads the cache; a corrupt file is rebuilt; another model refits."""
        first = fit_linear_maps(tiny, n_tokens=200, cache_dir=tmp_path, progress=False)
        monkeypatch.setattr("rome_lens.analysis.linearity._fit_states", lambda *a: pytest.fail())
        again = fit_linear_maps(tiny, n_tokens=200, cache_dir=tmp_path, progress=False)
        assert torch.equal(first.maps, again.maps)
        monkeypatch.undo()
        (path,) = (tmp_path / "microscope").glob("maps-*.st")
        path.write_bytes(b"corrupt")
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            fit_linear_maps(tiny, n_tokens=200, cache_dir=tmp_path, progress=False)
        with pytest.raises(ValueError, match="another model"):
            LinearMaps.load(path, model=rome_lens.tiny_model(seed=1))

    def test_layer_linearity_without_the_cache(self, tiny, tmp_path, monkeypatch):
        """use_cache=False fits afresh and saves no maps; with the cache it reads them back."""
        kwargs = {"n_tokens": 200, "cache_dir": tmp_path, "progress": False}
        fresh = layer_linearity(tiny, use_cache=False, **kwargs)
        assert not list(tmp_path.rglob("maps-*.st"))
        stored = layer_linearity(tiny, **kwargs)
        assert len(list(tmp_path.rglob("maps-*.st"))) == 1
        assert torch.equal(fresh.linearity, stored.linearity)
        monkeypatch.setattr("rome_lens.analysis.linearity._fit_states", lambda *a: pytest.fail())
        assert torch.equal(layer_linearity(tiny, **kwargs).linearity, stored.linearity)


class TestAgainstTheReleasedCode:
    """LLM-Microscope 0.0.7 on the same activations gives the same numbers."""

    def test_linearity(self, states):
        """procrustes_similarity equals linearity_score at every block."""
        functions = released()
        for layer in range(states.states.shape[0] - 1):
            x, y = states.states[layer].double(), states.states[layer + 1].double()
            assert linearity_score(x, y) == pytest.approx(
                functions.procrustes_similarity(x, y), abs=1e-5
            )

    def test_residual_removed_linearity_where_theirs_returns_none(self, states):
        """Their procrustes_similarity_centered returns None (it ends in `sim = float`);
        its intended value, procrustes_similarity on (X, Y − X), is what we compute."""
        functions = released()
        x, y = states.states[1].double(), states.states[2].double()
        assert functions.procrustes_similarity_centered(x, y) is None
        assert linearity_score(x, y - x) == pytest.approx(
            functions.procrustes_similarity(x, y - x), abs=1e-5
        )

    def test_anisotropy(self, states):
        """calculate_anisotropy_torch equals anisotropy_of at every depth."""
        functions = released()
        for depth in range(states.states.shape[0]):
            points = states.states[depth].double()
            assert anisotropy_of(points) == pytest.approx(
                functions.calculate_anisotropy_torch(points), abs=1e-5
            )

    def test_intrinsic_dimension(self, states):
        """Their intrinsic_dimension (fit on the smallest 20% of ratios) equals ours at 0.2."""
        functions = released()
        points = states.states[2].double()
        theirs = functions.intrinsic_dimension(points, "cpu")
        assert two_nn_dimension(points, fit_fraction=0.2) == pytest.approx(theirs, abs=1e-5)

    def test_intrinsic_dimension_with_duplicate_points(self, states):
        """Repeated points (the same token in the same context) are dropped by both alike."""
        functions = released()
        points = states.states[2].double()
        points = torch.cat([points, points[:40], points[5:9]])
        theirs = functions.intrinsic_dimension(points, "cpu")
        assert two_nn_dimension(points, fit_fraction=0.2) == pytest.approx(theirs, abs=1e-5)


class TestGeometry:
    def test_two_nn_recovers_a_five_dimensional_subspace(self):
        """Points filling a 5-d subspace of a 576-d space have TwoNN dimension 5 (± 0.5)."""
        generator = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(torch.randn(576, 5, generator=generator)).Q
        points = torch.randn(3000, 5, generator=generator) @ basis.T
        assert two_nn_dimension(points) == pytest.approx(5.0, abs=0.5)
        blocked = two_nn_dimension(points, block=128)
        assert blocked == pytest.approx(two_nn_dimension(points, block=4096), rel=1e-12)

    def test_anisotropy_of_one_dominant_direction(self):
        """Variance 100 along one axis and 1 along three others: 100/103."""
        points = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(1))
        points[:, 0] *= 10
        assert anisotropy_of(points) == pytest.approx(100 / 103, abs=0.01)

    def test_every_depth_is_measured(self, tiny, tmp_path):
        """One anisotropy and one dimension per depth (embeddings and every block)."""
        result = representation_geometry(tiny, n_tokens=200, cache_dir=tmp_path, progress=False)
        assert result.anisotropy.shape == (tiny.cfg.n_layers + 1,)
        assert bool(torch.isfinite(result.intrinsic_dimension).all())


class TestIntermediatePredictions:
    def test_last_layer_is_the_models_loss_and_guess(self, tiny):
        """At the last layer the loss and top-1 are the model's own next-token output."""
        result = intermediate_predictions(tiny, TEXT, progress=False)
        tokens = tiny.to_tokens(TEXT)[0]
        with torch.no_grad():
            log_probs = tiny(tokens[None])[0].log_softmax(-1)
        expected = -log_probs[:-1].gather(-1, tokens[1:, None])[:, 0]
        torch.testing.assert_close(result.losses[-1], expected, atol=1e-4, rtol=1e-4)
        top = [tiny.to_single_str_token(int(i)) for i in log_probs[:-1].argmax(-1)]
        assert result.top_tokens[-1] == top

    def test_a_text_longer_than_the_context_is_read_in_windows(self, tiny):
        """A text of more than n_ctx tokens gives a loss for every token but each window's BOS."""
        long_text = " ".join([TEXT] * 8)
        n_tokens = len(tiny.to_tokens(long_text, prepend_bos=False, truncate=False)[0])
        assert n_tokens > tiny.cfg.n_ctx
        result = intermediate_predictions(tiny, long_text, progress=False)
        assert result.losses.shape == (tiny.cfg.n_layers, n_tokens)
        states = text_states(tiny, long_text)
        assert states.n_tokens == n_tokens


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A frozen-decoder adapter trained briefly on the tiny model."""
    folder = tmp_path_factory.mktemp("adapter")
    return train_context_adapter(tiny, hparams=QUICK, cache_dir=folder, progress=False)


class TestContextualization:
    def test_scores_are_the_prefix_cross_entropy(self, tiny, adapter):
        """C_i is the mean NLL of the 3 tokens before i, read by the model after e_i and BOS."""
        result = contextualization(tiny, TEXT, adapter, progress=False)
        f_and_g, decoder = adapter.modules(tiny)
        tokens = tiny.to_tokens(TEXT)[0]
        states = text_states(tiny, TEXT).states  # [depth token d]
        i = 6  # a token with three before it (BOS not counted)
        with torch.no_grad():
            vector = f_and_g(states[:, i][None])[0]
            prefix = tokens[1 + i - 3 : 1 + i]
            inputs = torch.cat([tokens[:1], prefix[:1], prefix[:-1]])[None]

            def put(act, hook):
                act = act.clone()
                act[0, 1] = vector
                return act

            logits = tiny.run_with_hooks(inputs, fwd_hooks=[("hook_embed", put)])[0]
        expected = -logits[1:].log_softmax(-1).gather(-1, prefix[:, None]).mean()
        assert float(result.scores[i]) == pytest.approx(float(expected), abs=1e-4)
        assert bool(result.scores[:3].isnan().all()) and bool(
            torch.isfinite(result.scores[3:]).all()
        )
        assert hooks_left(tiny) == 0

    def test_training_is_seeded_cached_and_checked(self, tiny, adapter, tmp_path):
        """The same seed trains the same adapter; the cache returns it; another model refuses it."""
        again = train_context_adapter(tiny, hparams=QUICK, use_cache=False, progress=False)
        assert again.losses == adapter.losses
        assert torch.equal(again.adapter["up.weight"], adapter.adapter["up.weight"])
        path = adapter.save(tmp_path / "adapter.st")
        assert ContextAdapter.load(path, model=tiny).losses == adapter.losses
        with pytest.raises(ValueError, match="another model"):
            ContextAdapter.load(path, model=rome_lens.tiny_model(seed=1))
        with pytest.raises(ValueError, match="another model"):
            contextualization(rome_lens.tiny_model(seed=1), TEXT, adapter, progress=False)

    def test_full_decoder_trains_a_copy_and_leaves_the_model(self, tiny):
        """decoder="full" trains a copy of the model; the model's weights stay as they were."""
        before = {n: p.clone() for n, p in tiny.state_dict().items()}  # the decoder's names
        full = train_context_adapter(
            tiny, hparams=ContextHyperParams(**{**QUICK.__dict__, "decoder": "full"}),
            use_cache=False, progress=False,
        )  # fmt: skip
        assert all(torch.equal(p, before[n]) for n, p in tiny.state_dict().items())
        assert any(not torch.equal(full.decoder[n], before[n]) for n in before if n in full.decoder)
        result = contextualization(tiny, TEXT, full, progress=False)
        assert result.decoder == "full" and bool(torch.isfinite(result.scores[3:]).all())

    def test_a_failure_mid_training_leaves_no_hook(self, tiny, monkeypatch):
        """An exception inside a training step leaves no hook and no frozen flags behind."""
        calls = []
        real = context_module._prefix_loss

        def failing(*args):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return real(*args)

        monkeypatch.setattr(context_module, "_prefix_loss", failing)
        flags = [p.requires_grad for p in tiny.parameters()]
        with pytest.raises(RuntimeError, match="interrupted"):
            train_context_adapter(tiny, hparams=QUICK, use_cache=False, progress=False)
        assert hooks_left(tiny) == 0
        assert [p.requires_grad for p in tiny.parameters()] == flags

    def test_batch_size_is_sequences_per_forward_pass(self, tiny, adapter):
        """Scoring two prefixes at a time gives the scores of scoring them all at once."""
        whole = contextualization(tiny, TEXT, adapter, batch_size=64, progress=False)
        pairs = contextualization(tiny, TEXT, adapter, batch_size=2, progress=False)
        torch.testing.assert_close(pairs.scores, whole.scores, equal_nan=True)

    def test_use_cache_decides_whether_the_adapter_is_kept(self, tiny, tmp_path):
        """Training on demand keeps the adapter only with use_cache; then it is read back."""
        kwargs = {"hparams": QUICK, "cache_dir": tmp_path, "progress": False}
        fresh = contextualization(tiny, TEXT, use_cache=False, **kwargs)
        assert not list(tmp_path.rglob("context-*.st"))
        kept = contextualization(tiny, TEXT, **kwargs)
        (path,) = tmp_path.rglob("context-*.st")
        torch.testing.assert_close(kept.scores, fresh.scores, equal_nan=True)
        assert ContextAdapter.load(path, model=tiny).settings == QUICK

    def test_the_old_name_of_tokens_per_step_still_works(self):
        """batch_size= and .batch_size warn and mean tokens_per_step; saved settings convert."""
        with pytest.warns(DeprecationWarning, match="now tokens_per_step"):
            old = ContextHyperParams(prefix_length=3, steps=4, n_tokens=300, batch_size=8)
        assert old == QUICK
        with pytest.warns(DeprecationWarning, match="now tokens_per_step"):
            assert QUICK.batch_size == 8
        with pytest.raises(TypeError, match="not both"), pytest.warns(DeprecationWarning):
            ContextHyperParams(batch_size=8, tokens_per_step=8)
        saved = {**QUICK.__dict__, "batch_size": 8}
        del saved["tokens_per_step"]
        assert ContextHyperParams.from_dict(saved) == QUICK


class TestBadInput:
    @pytest.mark.parametrize("text", ["", "   ", None])
    def test_empty_text(self, tiny, maps, text):
        for call in (
            lambda: token_nonlinearity(tiny, text, maps=maps, progress=False),
            lambda: intermediate_predictions(tiny, text, progress=False),
        ):
            with pytest.raises(ValueError, match="text must be a non-empty string"):
                call()

    def test_too_few_reference_tokens(self, tiny, tmp_path):
        """Fewer tokens than 2 × d_model is refused, saying how many are needed."""
        with pytest.raises(ValueError, match=r"needs at least 128 \(2 × d_model, d_model = 64\)"):
            fit_linear_maps(tiny, n_tokens=100, cache_dir=tmp_path, progress=False)
        with pytest.raises(ValueError, match=r"the reference corpus has \d+ tokens"):
            fit_linear_maps(tiny, ["The Louvre is in Paris. " * 2], n_tokens=None,
                            cache_dir=tmp_path, progress=False)  # fmt: skip

    def test_a_layer_out_of_range(self, tiny, maps):
        result = token_nonlinearity(tiny, TEXT, maps=maps, progress=False)
        with pytest.raises(ValueError, match=r"layer 3 is out of range: the result has 3 layers"):
            token_layer_widget(result, layer=3)

    def test_settings(self):
        """A decoder that does not exist and a non-positive size are named."""
        with pytest.raises(ValueError, match="decoder must be 'frozen' or 'full', got 'lora'"):
            ContextHyperParams(decoder="lora")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="prefix_length must be a positive integer"):
            ContextHyperParams(prefix_length=0)
