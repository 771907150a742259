"""The TransformerLens seam: TL 3's HookedTransformer and TL 4's TransformerBridge behind one API.

The seam tests run on whichever TransformerLens is installed (``tiny_model()`` is
a ``HookedTransformer`` on TL 3 and a bridge on TL 4). The architecture matrix
needs TL 4: each family is a tiny random Hugging Face model wrapped in a bridge.
"""

from __future__ import annotations

import pytest
import torch

import rome_lens
from rome_lens.core import backend
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.hooks import add_at_rows, attached
from rome_lens.editing import EditRequest, ROMEHyperParams, memit_edit, rome_edit
from rome_lens.stats import key_second_moment
from tests.conftest import assert_same_weights, hooks_left, weights
from tests.test_influence import reference_gradient
from tests.test_tracing import PROMPT, SUBJECT, reference_trace

TL4 = backend.transformer_lens_major() >= 4
needs_tl4 = pytest.mark.skipif(not TL4, reason="the architecture matrix needs TransformerLens 4")
TOKENS = torch.tensor([[0, 5, 9, 3, 7, 8, 11], [0, 12, 13, 14, 15, 16, 17]])
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is located in the city of Paris, the capital of France.",
    "The Colosseum is located in the city of Rome, the capital of Italy.",
    "Toko Yasuda plays the guitar. Steve Jobs founded Apple.",
] * 8
FAST = ROMEHyperParams(context_lengths=((3, 2),), v_steps=5)
REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} is located in the city of", "The Louvre", "Rome"),
    EditRequest("{} plays the", "Toko Yasuda", "guitar"),
]


class TestForward:
    """``backend.forward`` runs any slice of the model as one full pass would."""

    def test_restart_at_every_layer_equals_the_full_pass(self, tiny):
        """The residual entering layer k, run on from k, gives the full pass's logits."""
        full = tiny(TOKENS)
        for layer in range(tiny.cfg.n_layers + 1):
            resid = backend.forward(tiny, TOKENS, stop_at_layer=layer)
            logits = backend.forward(tiny, resid, start_at_layer=layer)
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)

    def test_unembed_of_the_final_residual_gives_the_logits(self, tiny):
        """``unembed`` is ``ln_final`` then the unembedding."""
        final = backend.forward(tiny, TOKENS, stop_at_layer=tiny.cfg.n_layers)
        torch.testing.assert_close(backend.unembed(tiny, final), tiny(TOKENS), atol=1e-5, rtol=0)

    def test_a_frozen_prefix_cache_is_read_and_not_extended(self, tiny):
        """Suffixes run on a frozen prefix cache match the full pass, twice over."""
        full = tiny(TOKENS)
        cache = backend.new_kv_cache(tiny, 2)
        backend.forward(tiny, TOKENS[:, :4], past_kv_cache=cache, return_type=None)
        backend.freeze(cache)
        for _ in range(2):
            suffix = backend.forward(tiny, TOKENS[:, 4:], past_kv_cache=cache)
            torch.testing.assert_close(suffix, full[:, 4:], atol=1e-5, rtol=0)

    def test_one_layer_from_a_rebuilt_prefix(self, tiny):
        """``prefix_cache`` of one layer's cached keys runs that layer as the full pass does."""
        cache = backend.new_kv_cache(tiny, 2)
        backend.forward(tiny, TOKENS[:, :4], past_kv_cache=cache, return_type=None)
        keys, values = backend.cached_keys_values(tiny, cache)[1]
        resid = backend.forward(tiny, TOKENS, stop_at_layer=1)[:, 4:]
        prefix = backend.prefix_cache(tiny, 1, keys, values)
        out = backend.forward(tiny, resid, start_at_layer=1, stop_at_layer=2, past_kv_cache=prefix)
        expected = backend.forward(tiny, TOKENS, stop_at_layer=2)[:, 4:]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

    def test_left_padding_matches_the_unpadded_rows(self, tiny):
        """Left pads change neither the positions nor the logits of the real tokens."""
        padded = torch.tensor([[0, 0, 0, 5, 9, 3], [0, 12, 13, 14, 15, 16]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
        logits = backend.forward(tiny, padded, attention_mask=mask)
        torch.testing.assert_close(logits[0, 2:], tiny(padded[:1, 2:])[0], atol=1e-5, rtol=0)

    @pytest.mark.skipif(not TL4, reason="TL 3 models run their own forward")
    def test_an_unchecked_bridged_architecture_is_refused(self, tiny, monkeypatch):
        """A bridge whose blocks were never checked against a full pass gets a clear error."""
        monkeypatch.setattr(tiny.cfg, "architecture", "BloomForCausalLM")
        with pytest.raises(NotImplementedError, match="BloomForCausalLM is not among them"):
            backend.forward(tiny, TOKENS)

    def test_gradients_reach_a_vector_added_at_a_hook(self, tiny):
        """ROME's δ, added at ``hook_mlp_out``, gets the gradient autograd gives the full pass."""
        delta = torch.zeros(1, tiny.cfg.d_model, requires_grad=True)
        hook = add_at_rows(torch.tensor([0]), torch.tensor([2]), delta)
        with torch.enable_grad(), attached(tiny, [("blocks.0.hook_mlp_out", hook)]):
            (grad,) = torch.autograd.grad(backend.forward(tiny, TOKENS[:1])[0, -1, 3], delta)
        with torch.enable_grad(), attached(tiny, [("blocks.0.hook_mlp_out", hook)]):
            (reference,) = torch.autograd.grad(tiny(TOKENS[:1])[0, -1, 3], delta)
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, reference)


class TestWeights:
    """Weights by TL name, in TL's orientation, live and covered by the fingerprint."""

    def test_w_out_is_a_live_view_in_tl_orientation(self, tiny):
        """A write into ``blocks.1.mlp.W_out [d_mlp d_model]`` changes the logits; undoing it
        restores them exactly."""
        w_out = backend.weight(tiny, "blocks.1.mlp.W_out")
        assert tuple(w_out.shape) == (tiny.cfg.d_mlp, tiny.cfg.d_model)
        before, logits = w_out.detach().clone(), tiny(TOKENS)
        with torch.no_grad():
            w_out[0] += 1.0
        assert not torch.equal(tiny(TOKENS), logits)
        with torch.no_grad():
            w_out.copy_(before)
        assert torch.equal(tiny(TOKENS), logits)

    @pytest.mark.parametrize(
        "name", ["blocks.0.mlp.W_in", "blocks.2.mlp.W_out", "blocks.1.mlp.b_out"]
    )
    def test_the_parameter_holds_the_weight(self, tiny, name):
        """``parameter`` is the trainable tensor behind ``weight``: the same storage."""
        held, view = backend.parameter(tiny, name), backend.weight(tiny, name)
        assert isinstance(held, torch.nn.Parameter)
        assert held.data_ptr() == view.data_ptr() and held.numel() == view.numel()

    @pytest.mark.skipif(TL4, reason="a HookedTransformer's configuration flag")
    def test_a_post_mlp_norm_is_refused_by_editors_and_influence(self, tiny, monkeypatch):
        """TL 3 has no hook point for W_out's output behind a post-MLP norm: a clear error."""
        from rome_lens.influence import mlp_weights

        monkeypatch.setattr(tiny.cfg, "use_normalization_before_and_after", True)
        before = weights(tiny)
        with pytest.raises(ValueError, match="use_normalization_before_and_after"):
            rome_edit(tiny, REQUESTS[0], layer=1, hparams=FAST, progress=False)
        with pytest.raises(ValueError, match="load the model as a TransformerLens 4"):
            mlp_weights(tiny, [1])
        assert_same_weights(tiny, before)

    def test_unknown_weight_is_refused(self, tiny):
        """A name the model does not have gets a ValueError naming it."""
        with pytest.raises(ValueError, match="blocks.9.mlp.W_out"):
            backend.weight(tiny, "blocks.9.mlp.W_out")

    @pytest.mark.parametrize("kind", ["W_in", "W_out", "b_in", "b_out"])
    def test_fingerprint_sees_any_one_mlp_weight(self, tiny, kind):
        """Changing one entry of any MLP weight of any layer changes that layer's fingerprint."""
        for layer in range(tiny.cfg.n_layers):
            scope = layer + 1 if kind in ("W_out", "b_out") else layer
            scope = None if scope >= tiny.cfg.n_layers else scope
            before = model_fingerprint(tiny, upto_layer=scope)
            tensor = backend.weight(tiny, f"blocks.{layer}.mlp.{kind}")
            with torch.no_grad():
                tensor.view(-1)[3] += 1e-3
            try:
                assert model_fingerprint(tiny, upto_layer=scope) != before, (layer, kind)
            finally:
                with torch.no_grad():
                    tensor.view(-1)[3] -= 1e-3


@pytest.fixture(scope="module", params=["gpt2", "gptj", "neox", "llama", "mistral", "qwen2",
                                        "gemma", "gemma2"])  # fmt: skip
def family(request: pytest.FixtureRequest):
    """A tiny random model of one architecture family, as a TransformerBridge."""
    if not TL4:
        pytest.skip("the architecture matrix needs TransformerLens 4")
    from tests.architectures import tiny_family

    model = tiny_family(request.param)
    model(TOKENS)  # the bridge attaches some torch hooks of its own on its first run
    return model


@pytest.fixture(scope="module")
def family_stats(family, tmp_path_factory):
    """Key statistics of layers 0 and 1 over a small text corpus."""
    folder = tmp_path_factory.mktemp("stats")
    return {
        layer: key_second_moment(
            family, layer, corpus=TEXTS, n_tokens=300, cache_dir=folder, progress=False
        )
        for layer in (0, 1)
    }


@needs_tl4
class TestArchitectures:
    """Families a user is likely to bring: tracing, editing, statistics, influence, Microscope."""

    @pytest.mark.parametrize("kind", ["resid", "mlp"])
    def test_fast_trace_equals_the_one_pass_per_cell_reference(self, family, kind):
        """The engine's scores equal ROME's loop, one run_with_hooks per (token, layer)."""
        own_hooks = hooks_left(family)
        trace = rome_lens.trace_fact(
            family, PROMPT, SUBJECT, kinds=(kind,), window=1, samples=2, progress=False
        )
        assert hooks_left(family) == own_hooks
        expected = reference_trace(family, kind, 1, 2, 0, trace.noise_scale)
        torch.testing.assert_close(trace.scores[0], expected, atol=1e-5, rtol=0)

    def test_rome_raises_the_target_and_reverts_bit_exactly(self, family, family_stats):
        """The edit makes the new target more likely; revert restores every weight."""
        before, own_hooks = weights(family), hooks_left(family)
        w_out = backend.weight(family, "blocks.1.mlp.W_out")
        w_before = w_out.detach().clone()
        edit = rome_edit(
            family, REQUESTS[0], layer=1, hparams=FAST, stats=family_stats[1], progress=False
        )
        outcome = edit.outcomes[0]
        assert outcome.p_new > outcome.p_new_before
        with edit.apply(family):
            assert not torch.equal(w_out, w_before)
        assert_same_weights(family, before)
        assert hooks_left(family) == own_hooks

    def test_memit_batch_of_three(self, family, family_stats):
        """A MEMIT batch over layers 0-1 writes both layers and reverts bit-exactly."""
        before = weights(family)
        edit = memit_edit(family, REQUESTS, layers=[0, 1], stats=family_stats, progress=False)
        assert len(edit.outcomes) == 3
        handle = edit.apply(family)
        for layer in (0, 1):
            name = f"blocks.{layer}.mlp.W_out"
            expected = (before_w_out(before, family, layer) + edit.deltas()[name]).float()
            torch.testing.assert_close(backend.weight(family, name), expected, atol=1e-6, rtol=0)
        handle.revert()
        assert_same_weights(family, before)

    def test_key_statistics_are_the_moment_of_the_mlp_keys(self, family, family_stats):
        """Key statistics count the tokens and give a symmetric positive semi-definite moment."""
        moment = family_stats[1].moments
        assert moment.count == 300
        outer = moment.outer / moment.count
        torch.testing.assert_close(outer, outer.T)
        assert torch.linalg.eigvalsh(outer).min() > -1e-8

    def test_query_gradient_is_the_torch_func_gradient(self, family):
        """Every MLP weight's gradient, read at its hook points, equals torch.func's."""
        from rome_lens.influence import mlp_weights, query_gradients

        prompt, completion = "The Eiffel Tower is located in", " Paris"
        found = query_gradients(family, mlp_weights(family, [0, 1]), [(prompt, completion)])
        tokens = family.to_tokens(prompt + completion)
        n_prompt = family.to_tokens(prompt).shape[1]
        positions = torch.arange(n_prompt - 1, tokens.shape[1] - 1)
        expected = reference_gradient(family, tokens, positions, tokens[0, n_prompt:])
        for name, value in found.items():
            torch.testing.assert_close(value[0], expected[name], atol=1e-5, rtol=1e-4)

    def test_influence_factors_and_scan(self, family, tmp_path):
        """EK-FAC factors fit and a scan ranks the texts."""
        from rome_lens.influence import fit_influence_factors, influence

        factors = fit_influence_factors(
            family, TEXTS, layers=[1], n_tokens=200, cache_dir=tmp_path, progress=False
        )
        result = influence(
            family, factors, "The Eiffel Tower is located in", "Paris", TEXTS[:4],
            top_k=4, progress=False,
        )  # fmt: skip
        assert len(result.text_ids) == 4
        assert torch.isfinite(torch.as_tensor(result.scores)).all()

    def test_mlp_output_hook_is_w_outs_output(self, family):
        """The hook editors add δ at carries ``W_outᵀ k + b_out``, even behind a post-MLP norm."""
        layer = 1
        names = [f"blocks.{layer}.mlp.hook_post", backend.mlp_output_hook(family, layer)]
        _, cache = family.run_with_cache(TOKENS, names_filter=names)
        w_out = backend.weight(family, f"blocks.{layer}.mlp.W_out")
        b_out = backend.weight(family, f"blocks.{layer}.mlp.b_out")
        torch.testing.assert_close(cache[names[1]], cache[names[0]] @ w_out + b_out)

    def test_microscope_metrics(self, family, tmp_path):
        """Layer linearity and intermediate predictions run and give one value per layer."""
        from rome_lens.analysis import intermediate_predictions, layer_linearity

        linearity = layer_linearity(family, TEXTS, n_tokens=200, cache_dir=tmp_path, progress=False)
        assert len(linearity.to_dataframe()) >= family.cfg.n_layers
        predictions = intermediate_predictions(family, TEXTS[0], progress=False)
        assert predictions.to_dataframe()["layer"].nunique() == family.cfg.n_layers


def before_w_out(before: dict[str, torch.Tensor], model, layer: int) -> torch.Tensor:
    """``blocks.{layer}.mlp.W_out`` as it was in the copy ``before``, in TL orientation."""
    name = f"blocks.{layer}.mlp.W_out"
    live, saved = backend.weight(model, name), before[name]  # saved in the parameter's layout
    return saved if saved.shape == live.shape else saved.T


@pytest.fixture(scope="module")
def golden():
    """The tiny Llama's weights and what TL 3 computed from them."""
    from tests import golden_backends

    return golden_backends.load()


class TestParity:
    """The same Hugging Face weights give TL 3's numbers on the installed TransformerLens."""

    @pytest.fixture(scope="class")
    def computed(self, golden, tmp_path_factory):
        """Trace, ROME, statistics, influence and Microscope of the golden weights, here."""
        from tests import golden_backends

        model = golden_backends.model_from(golden[0])
        return golden_backends.compute(model, str(tmp_path_factory.mktemp("parity")))

    def test_every_trace_cell(self, golden, computed):
        """Every (kind, token, layer) score agrees to 1e-5."""
        torch.testing.assert_close(
            computed["trace_scores"], golden[1]["trace_scores"], atol=1e-5, rtol=0
        )

    @pytest.mark.parametrize("name", ["key", "value", "delta"])
    def test_rome_vectors(self, golden, computed, name):
        """ROME's k*, v* and δ agree to 1e-4 (relative)."""
        expected = golden[1][name]
        error = (computed[name] - expected).norm() / expected.norm()
        assert error < 1e-4, f"{name}: relative error {error:.2e}"

    def test_key_statistics(self, golden, computed):
        """The key second moment agrees to 1e-5 (relative)."""
        expected = golden[1]["key_moment"]
        error = (computed["key_moment"] - expected).norm() / expected.norm()
        assert error < 1e-5, f"relative error {error:.2e}"

    @pytest.mark.parametrize("side", ["input", "output"])
    @pytest.mark.parametrize("weight", ["W_in", "W_gate", "W_out"])
    def test_influence_factors(self, golden, computed, side, weight):
        """EK-FAC's A = E[ā āᵀ] and S = E[g gᵀ] of each MLP weight agree to 1e-5 (relative)."""
        name = f"{side}_factor.blocks.1.mlp.{weight}"
        expected = golden[1][name]
        error = (computed[name] - expected).norm() / expected.norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"

    def test_influence_scan(self, golden, computed):
        """Each text's EK-FAC influence score agrees to 1e-4 (relative to the largest)."""
        expected = golden[1]["scan_scores"]
        error = (computed["scan_scores"] - expected).abs().max() / expected.abs().max()
        assert error < 1e-4, f"relative error {error:.2e}"

    @pytest.mark.parametrize(
        "name", ["linearity", "linearity_without_residual", "token_errors", "lens_losses"]
    )
    def test_microscope(self, golden, computed, name):
        """Layer linearity, token nonlinearity and the logit lens's losses agree to 1e-5."""
        torch.testing.assert_close(computed[name], golden[1][name], atol=1e-5, rtol=1e-5)
