"""ROME editing on the tiny model: the update's algebra, outcomes, exact undo, saving, errors."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import rome_lens
from rome_lens.core import backend
from rome_lens.core.backend import Model
from rome_lens.core.fingerprint import check_layer
from rome_lens.core.hooks import add_at_rows, attached
from rome_lens.core.models import _hooked_transformer
from rome_lens.core.predict import predict_next, target_nll
from rome_lens.core.runtime import pad
from rome_lens.editing import (
    EditMissWarning,
    EditRequest,
    FTHyperParams,
    MEMITHyperParams,
    RankOneEdit,
    ROMEHyperParams,
    WeightEdit,
    WeightPatch,
    edited,
    ft_edit,
    memory,
    rome_edit,
)
from rome_lens.editing import rome as rome_module
from rome_lens.stats import KeyStats, key_second_moment

from .conftest import assert_same_weights, hooks_left, weights

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is a museum in Paris, the capital of France.",
]
FAST = ROMEHyperParams(context_lengths=((3, 2),), v_steps=5)
LAYER = 1


@pytest.fixture(scope="module")
def stats(tiny: Model, tmp_path_factory: pytest.TempPathFactory) -> KeyStats:
    """Key statistics of the tiny model's layer 1 over a few hundred sampled tokens."""
    folder = tmp_path_factory.mktemp("cache")
    return key_second_moment(tiny, LAYER, n_tokens=1000, cache_dir=folder, progress=False)


@pytest.fixture(scope="module")
def edit(tiny: Model, stats: KeyStats) -> RankOneEdit:
    """The Eiffel Tower moved to Rome, at layer 1 of the tiny model."""
    return rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)


@pytest.fixture(scope="module")
def averaged_edit(tiny: Model, stats: KeyStats) -> RankOneEdit:
    """The same edit with ``key_match="averaged"``: ROME's closed form with k* alone."""
    hparams = dataclasses.replace(FAST, key_match="averaged")
    return rome_edit(tiny, REQUEST, layer=LAYER, hparams=hparams, stats=stats, progress=False)


class TestRankOneUpdate:
    def test_key_maps_to_value_after_apply(self, tiny, edit):
        """After the edit, W_outᵀ k* + b_out equals v*."""
        mlp = tiny.blocks[LAYER].mlp
        with edit.apply(tiny):
            value = mlp.W_out.T.double() @ edit.key + mlp.b_out.double()
        torch.testing.assert_close(value, edit.value, atol=1e-4, rtol=1e-4)

    def test_update_is_rank_one_with_inverse_moment(self, averaged_edit, stats):
        """ΔW = C⁻¹k* ⊗ (v* − W_outᵀk* − b_out) / (k*ᵀC⁻¹k*)."""
        edit = averaged_edit
        u = torch.linalg.solve(stats.moment, edit.key)
        torch.testing.assert_close(edit.left, u / (u @ edit.key))
        assert torch.linalg.matrix_rank(edit.deltas()[edit.parameter]) == 1

    def test_default_update_is_rank_one_and_matches_both_keys(self, edit):
        """The default (``key_match="both"``) stays rank one and gives k* exactly δ."""
        assert ROMEHyperParams().key_match == "both"
        assert torch.linalg.matrix_rank(edit.deltas()[edit.parameter]) == 1
        assert float(edit.key @ edit.left) == pytest.approx(1.0, rel=1e-9)

    def test_other_keys_move_least(self, tiny, averaged_edit, stats):
        """Of all ΔW mapping k* to v*, ROME's minimises tr(ΔWᵀ C ΔW): any other costs more.

        Every other solution is ΔW + N with Nᵀk* = 0; the cost's gradient at ΔW,
        2 C ΔW, is k* times a row (the optimality condition), so no N lowers it.
        """
        edit = averaged_edit
        delta = edit.deltas()[edit.parameter]
        c, k = stats.moment, edit.key

        def cost(change: torch.Tensor) -> float:
            return float(torch.trace(change.T @ c @ change))

        assert torch.allclose(delta.T @ k, edit.right, atol=1e-8)  # feasible: maps k* to v*
        generator = torch.Generator().manual_seed(0)
        for scale in (1e-3, 1e-1, 10.0):
            noise = torch.randn(delta.shape, dtype=torch.float64, generator=generator)
            feasible = noise - torch.outer(k, k @ noise) / (k @ k)  # Nᵀk = 0
            assert torch.allclose(feasible.T @ k, torch.zeros_like(edit.right), atol=1e-8)
            assert cost(delta + scale * delta.norm() * feasible / feasible.norm()) > cost(delta)
        gradient = c @ delta
        along_k = torch.outer(k, k @ gradient) / (k @ k)
        assert torch.allclose(gradient, along_k, atol=1e-9 * gradient.abs().max())

    @pytest.mark.parametrize("match", ["bare", "both"])
    def test_key_match_maps_the_chosen_keys_exactly(self, tiny, stats, match):
        """With "bare", k_bare · ℓ = 1 (ROME's original form); "both": k* · ℓ = k_bare · ℓ = 1 with
        the least C-norm, checked against a dense constrained solve (Lagrange system)."""
        hparams = ROMEHyperParams(context_lengths=((3, 2),), v_steps=5, key_match=match)
        found = rome_edit(tiny, REQUEST, layer=LAYER, hparams=hparams, stats=stats,
                          progress=False)  # fmt: skip
        bare = memory.compute_keys(tiny, [REQUEST], LAYER, ["{}"])[0]
        assert float(bare @ found.left) == pytest.approx(1.0, rel=1e-9)
        if match == "bare":
            u = torch.linalg.solve(stats.moment, found.key)
            torch.testing.assert_close(found.left, u / (bare @ u))
            return
        assert float(found.key @ found.left) == pytest.approx(1.0, rel=1e-9)
        keys = torch.stack([found.key, bare])  # min ℓᵀCℓ s.t. Kℓ = 1: [[2C, Kᵀ], [K, 0]]
        d = len(bare)
        system = torch.zeros(d + 2, d + 2, dtype=torch.float64)
        system[:d, :d], system[:d, d:], system[d:, :d] = 2 * stats.moment, keys.T, keys
        rhs = torch.cat([torch.zeros(d, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
        torch.testing.assert_close(found.left, torch.linalg.solve(system, rhs)[:d])

    def test_edit_raises_target_probability(self, tiny, edit):
        """The new target becomes more likely after the edit."""
        before = target_nll(tiny, [REQUEST.text], ["Rome"])
        with edit.apply(tiny):
            after = target_nll(tiny, [REQUEST.text], ["Rome"])
        assert after < before


class TestOutcomes:
    def test_outcome_is_read_on_the_edited_model(self, tiny, edit):
        """p_new, p_true and rank_new are what the model gives with the edit applied."""
        (outcome,) = edit.outcomes
        before = torch.exp(-target_nll(tiny, [REQUEST.text], ["Rome"])).item()
        with edited(tiny, edit):
            p_new, p_true = torch.exp(-target_nll(tiny, [REQUEST.text] * 2, ["Rome", "Paris"]))
            rank = predict_next(tiny, [REQUEST.text], targets=["Rome"]).target_rank
        assert outcome.p_new_before == pytest.approx(before, rel=1e-5)
        assert outcome.p_new == pytest.approx(p_new.item(), rel=1e-5)
        assert outcome.p_true == pytest.approx(p_true.item(), rel=1e-5)
        assert outcome.rank_new == int(rank[0])
        assert outcome.took == (outcome.rank_new == 0 or outcome.p_new > outcome.p_true)
        row = edit.to_dataframe().iloc[0]
        assert row["took"] == outcome.took and row["p_new"] == outcome.p_new

    def test_an_edit_that_changes_nothing_warns_and_is_marked(self, tiny, stats, monkeypatch):
        """With δ forced to zero the new answer cannot take: rome_edit warns, and took is False."""

        def no_change(model, requests, *args, **kwargs):
            return torch.zeros(len(requests), model.cfg.d_model), [[0.0] for _ in requests]

        monkeypatch.setattr(rome_module, "optimize_deltas", no_change)
        words = ["Paris", "Rome", "Berlin", "France", "Italy", "Seattle", "Apple", "guitar"]
        nll = target_nll(tiny, [REQUEST.text] * len(words), words)
        worst, best = words[int(nll.argmax())], words[int(nll.argmin())]
        request = EditRequest(REQUEST.prompt, REQUEST.subject, worst, best)
        with pytest.warns(EditMissWarning, match="did not take for 1 of 1 requests"):
            edit = rome_edit(tiny, request, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert not edit.took and edit.misses == edit.outcomes
        assert edit.outcomes[0].p_new == pytest.approx(edit.outcomes[0].p_new_before, rel=1e-5)

    def test_repr_is_one_line(self, edit):
        """repr(edit) names the weight, the request, ΔW's norm and whether it took."""
        text = repr(edit)
        assert "\n" not in text and len(text) < 200
        assert text.startswith("RankOneEdit(blocks.1.mlp.W_out: 'The Eiffel Tower is located")
        assert "‖ΔW‖=" in text and ("took" in text or "missed" in text)

    def test_identity_moment_is_explicit(self, tiny):
        """mom2_adjustment=False uses C = I, so u is k* itself."""
        hparams = ROMEHyperParams(context_lengths=(), v_steps=2, mom2_adjustment=False)
        edit = rome_edit(tiny, REQUEST, layer=LAYER, hparams=hparams, progress=False)
        torch.testing.assert_close(edit.left, edit.key / (edit.key @ edit.key))

    def test_value_objective_matches_plain_forward(self, tiny):
        """The prefix-cached objective gives the log-probs of a full forward pass."""
        templates = memory.context_templates(tiny, FAST)
        texts = memory.in_contexts(REQUEST, templates)
        sequences, last = memory.encode(tiny, texts)
        reads = [(row, len(seq) - 1) for row, seq in enumerate(sequences)]
        reads += [(row, last[row]) for row in range(len(sequences))]
        delta = torch.randn(1, tiny.cfg.d_model)
        fast = memory.ValueObjective(tiny, LAYER, sequences, last, reads)(delta)
        tokens, _ = pad([torch.tensor(s) for s in sequences], 0, "right")
        hook = add_at_rows(torch.arange(len(sequences)), torch.tensor(last), delta)
        with torch.no_grad(), attached(tiny, [(f"blocks.{LAYER}.hook_mlp_out", hook)]):
            logits = tiny(tokens)
        rows, positions = zip(*reads, strict=True)
        expected = logits[list(rows), list(positions)].log_softmax(-1)
        torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)

    def test_context_templates_hold_the_prompt_slot(self, tiny):
        """Templates are "{}" and sampled prefixes ending in ". {}", as many as asked."""
        hparams = ROMEHyperParams(context_lengths=((2, 3), (4, 2)))
        templates = memory.context_templates(tiny, hparams)
        assert templates[0] == "{}" and len(templates) == 6
        assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])


class TestUndo:
    def test_revert_is_bit_exact(self, tiny, edit):
        """Reverting restores every weight bit for bit."""
        before = weights(tiny)
        handle = edit.apply(tiny)
        assert not torch.equal(tiny.blocks[LAYER].mlp.W_out, before[edit.parameter])
        handle.revert()
        assert_same_weights(tiny, before)

    def test_edited_reverts_on_exception(self, tiny, edit):
        """The context manager reverts even when its body raises."""
        before = weights(tiny)
        with pytest.raises(KeyError), edited(tiny, [edit]):
            raise KeyError("boom")
        assert_same_weights(tiny, before)

    def test_sequential_edits_revert_in_reverse_order(self, tiny, edit, stats):
        """Two stacked edits revert exactly in reverse order, and out of order is refused."""
        before = weights(tiny)
        first = edit.apply(tiny)
        request = EditRequest("{} is in", "The Louvre", "Berlin")
        second_edit = rome_edit(
            tiny, request, layer=LAYER, hparams=FAST, stats=stats, progress=False
        )
        second = second_edit.apply(tiny)
        with pytest.raises(RuntimeError, match="reverse order"):
            first.revert()
        second.revert()
        first.revert()
        assert_same_weights(tiny, before)
        with pytest.raises(RuntimeError, match="already been reverted"):
            first.revert()

    def test_rome_edit_leaves_model_untouched(self, tiny, stats):
        """Computing an edit changes no weight, leaves no hook and restores requires_grad."""
        before = weights(tiny)
        flags = [p.requires_grad for p in tiny.parameters()]
        rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0
        assert [p.requires_grad for p in tiny.parameters()] == flags

    def test_failure_mid_optimisation_leaves_model_clean(self, tiny, stats, monkeypatch):
        """An exception inside the v* loop leaves weights, hooks and grad flags as they were."""
        before = weights(tiny)
        calls = []
        original = memory.ValueObjective.__call__

        def failing(self, delta):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return original(self, delta)

        monkeypatch.setattr(memory.ValueObjective, "__call__", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0
        assert all(p.requires_grad for p in tiny.parameters())

    def test_non_finite_apply_is_refused_untouched(self, tiny):
        """An edit that would make a weight non-finite raises and writes nothing."""
        before = weights(tiny)
        delta = torch.zeros(tiny.cfg.d_mlp, tiny.cfg.d_model)
        delta[0, 0] = float("inf")
        patch = WeightPatch.for_model(
            tiny, {"blocks.0.mlp.W_out": torch.zeros_like(delta), "blocks.1.mlp.W_out": delta}
        )
        with pytest.raises(ValueError, match="non-finite"):
            patch.apply(tiny)
        assert_same_weights(tiny, before)


class TestSaving:
    def test_missing_sidecar_is_named(self, edit, tmp_path):
        """Loading an edit whose .json sidecar is gone names the sidecar, not the edit file."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        path.with_suffix(".safetensors.json").unlink()
        with pytest.raises(FileNotFoundError, match=r"eiffel\.safetensors\.json .* is missing"):
            RankOneEdit.load(path)

    def test_errors_call_it_an_edit_file(self, edit, tmp_path):
        """A damaged edit file is called a RankOneEdit file, not a cache entry."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(RuntimeError, match="RankOneEdit file .* bytes, expected"):
            RankOneEdit.load(path)

    def test_save_load_round_trip(self, tiny, edit, tmp_path):
        """A saved edit loads with the same tensors, request and fields, and applies identically."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        loaded = WeightEdit.load(path, model=tiny)
        assert isinstance(loaded, RankOneEdit)
        assert loaded.request == edit.request and loaded.layer == edit.layer
        assert loaded.fingerprint == edit.fingerprint and loaded.losses == edit.losses
        for name in ("left", "right", "key", "value"):
            assert torch.equal(getattr(loaded, name), getattr(edit, name))
        with edit.apply(tiny):
            expected = tiny.blocks[LAYER].mlp.W_out.clone()
        with loaded.apply(tiny):
            assert torch.equal(tiny.blocks[LAYER].mlp.W_out, expected)

    def test_load_refuses_another_model(self, edit, tmp_path):
        """An edit made on one model will not load onto a model with other weights."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        with pytest.raises(ValueError, match="another model"):
            RankOneEdit.load(path, model=rome_lens.tiny_model(seed=1))
        with pytest.raises(ValueError, match="another model"):
            edit.apply(rome_lens.tiny_model(seed=1))

    def test_corrupt_edit_file_is_reported(self, edit, tmp_path):
        """A damaged edit file raises instead of loading garbage."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(RuntimeError, match="eiffel"):
            RankOneEdit.load(path)

    def test_load_refuses_another_kind(self, edit, tmp_path):
        """A ROME edit file does not load as a dense patch."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        with pytest.raises(ValueError, match="holds a RankOneEdit, not a WeightPatch"):
            WeightPatch.load(path)

    def test_dense_patch_round_trip(self, tiny, tmp_path):
        """The fine-tuning result saves and loads as a WeightPatch."""
        patch = ft_edit(tiny, REQUEST, layer=LAYER, hparams=FTHyperParams(steps=3), progress=False)
        loaded = WeightEdit.load(patch.save(tmp_path / "ft.safetensors"), model=tiny)
        assert isinstance(loaded, WeightPatch) and loaded.info["method"] == "ft"
        assert torch.equal(loaded.delta["blocks.1.mlp.W_out"], patch.delta["blocks.1.mlp.W_out"])


class TestBadInput:
    def test_prompt_without_placeholder(self):
        with pytest.raises(ValueError, match=r"\{\}"):
            EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome")

    @pytest.mark.parametrize("target", ["", "   "])
    def test_empty_target(self, target):
        with pytest.raises(ValueError, match="target_new"):
            EditRequest("{} is in", "The Eiffel Tower", target)

    def test_target_equal_to_truth_warns(self):
        with pytest.warns(UserWarning, match="equals the true answer"):
            EditRequest("{} is in", "The Eiffel Tower", "Paris", target_true="Paris")

    def test_kl_prompt_without_subject_slot(self):
        """The KL prompt must have a slot for the subject."""
        with pytest.raises(ValueError, match="kl_prompt"):
            ROMEHyperParams(kl_prompt="Paris is a")

    @pytest.mark.parametrize("layer", [-1, 3, 1.0])
    def test_layer_out_of_range(self, tiny, layer):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\)"):
            rome_edit(tiny, REQUEST, layer=layer, progress=False)

    @pytest.mark.skipif(
        backend.transformer_lens_major() >= 4,
        reason="TL 4 bridges wrap Hugging Face models, and those all have MLPs",
    )
    def test_model_without_mlp(self):
        from transformer_lens import HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=2, d_model=16, d_head=4, n_ctx=16, d_vocab=50, attn_only=True, act_fn="relu"
        )
        with pytest.raises(ValueError, match=r"no blocks\.0\.mlp\.W_out"):
            check_layer(_hooked_transformer(cfg), 0)

    def test_statistics_from_another_layer(self, tiny, stats):
        with pytest.raises(ValueError, match="layer 1, not layer 2"):
            rome_edit(tiny, REQUEST, layer=2, stats=stats, progress=False)

    def test_statistics_from_another_model(self, stats):
        other = rome_lens.tiny_model(seed=1)
        with pytest.raises(ValueError, match="another model"):
            rome_edit(other, REQUEST, layer=LAYER, stats=stats, progress=False)

    def test_ill_conditioned_statistics_are_regularised(self, tiny, tmp_path):
        """C from fewer tokens than keys is singular: a ridge is added, warned and recorded."""
        few = key_second_moment(tiny, LAYER, corpus=TEXTS[:2], cache_dir=tmp_path, progress=False)
        assert few.n_tokens < tiny.cfg.d_mlp
        with pytest.warns(UserWarning, match="ill-conditioned"):
            edit = rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=few, progress=False)
        assert edit.ridge > 0 and edit.condition_number > FAST.max_condition
        assert torch.isfinite(edit.left).all()

    def test_no_warning_for_good_statistics(self, tiny, stats):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", EditMissWarning)
            edit = rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert edit.ridge == 0

    def test_hyperparameters_of_the_wrong_type(self, tiny):
        """MEMIT's settings passed to ROME raise TypeError naming both types."""
        with pytest.raises(
            TypeError, match="hparams must be ROMEHyperParams, got MEMITHyperParams"
        ):
            rome_edit(tiny, REQUEST, layer=LAYER, hparams=MEMITHyperParams(), progress=False)  # type: ignore[arg-type]

    def test_not_a_request(self, tiny):
        with pytest.raises(TypeError, match="EditRequest objects"):
            rome_edit(tiny, "The Louvre is in Rome", layer=LAYER, progress=False)  # type: ignore[arg-type]


class TestFineTuning:
    def test_constraint_and_effect(self, tiny):
        """FT+L keeps every entry of ΔW within ε and lowers the target's NLL."""
        hparams = FTHyperParams(steps=10, norm_constraint=1e-2, lr=1e-2)
        patch = ft_edit(tiny, REQUEST, layer=LAYER, hparams=hparams, progress=False)
        delta = patch.delta[f"blocks.{LAYER}.mlp.W_out"]
        assert delta.abs().max() <= 1e-2 + 1e-7
        before = target_nll(tiny, [REQUEST.text], ["Rome"])
        with edited(tiny, patch):
            assert target_nll(tiny, [REQUEST.text], ["Rome"]) < before
