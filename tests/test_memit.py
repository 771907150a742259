"""MEMIT on the tiny model: each layer's least-squares update, batching, undo, saving, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rome_lens
from rome_lens.core import backend
from rome_lens.core.backend import Model
from rome_lens.editing import (
    EditHyperParams,
    EditRequest,
    MEMITHyperParams,
    MultiLayerEdit,
    WeightEdit,
    default_memit_layers,
    edited,
    memit_edit,
    memory,
    multilayer,
)
from rome_lens.editing.memory import compute_keys, optimize_deltas
from rome_lens.stats import key_second_moment

from .conftest import assert_same_weights, hooks_left, weights

REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("{} is located in the city of", "The Louvre", "Berlin", "Paris"),
    EditRequest("{} is a museum in", "The Prado", "Oslo", "Madrid"),
]
LAYERS = [0, 1]
FAST = MEMITHyperParams(context_lengths=((3, 2),), v_steps=4, mom2_update_weight=50.0)


@pytest.fixture(scope="module")
def stats(tiny: Model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Key statistics of the tiny model's layers 0 and 1."""
    folder = tmp_path_factory.mktemp("cache")
    return {
        layer: key_second_moment(tiny, layer, n_tokens=1000, cache_dir=folder, progress=False)
        for layer in LAYERS
    }


@pytest.fixture(scope="module")
def z_cache(tmp_path_factory: pytest.TempPathFactory):
    """A folder for the per-request z cache."""
    return tmp_path_factory.mktemp("z")


def edit_tiny(tiny, stats, folder, requests=REQUESTS) -> MultiLayerEdit:
    """MEMIT on the tiny model with the test settings, caching z in ``folder``."""
    return memit_edit(
        tiny, requests, layers=LAYERS, hparams=FAST, stats=stats, cache_dir=folder, progress=False
    )


@pytest.fixture(scope="module")
def edit(tiny, stats, z_cache) -> MultiLayerEdit:
    """Three facts written into layers 0 and 1 of the tiny model."""
    return edit_tiny(tiny, stats, z_cache)


def subject_residuals(model, layer: int) -> torch.Tensor:
    return multilayer.subject_residuals(model, REQUESTS, layer)


class TestLeastSquares:
    def test_each_layer_solves_its_regularised_least_squares(self, tiny, stats, tmp_path):
        """ΔW_l minimises ‖K ΔW − R‖² + λ tr(ΔWᵀ C ΔW), checked against an augmented lstsq."""
        hparams = dataclasses.replace(FAST, key_match="averaged")
        edit = memit_edit(tiny, REQUESTS, layers=LAYERS, hparams=hparams, stats=stats,
                          cache_dir=tmp_path, progress=False)  # fmt: skip
        templates = memory.context_templates(tiny, hparams)
        lam = hparams.mom2_update_weight
        for i, layer in enumerate(LAYERS):
            earlier = [p for p in edit.deltas() if int(p.split(".")[1]) < layer]
            partial = rome_lens.WeightPatch.for_model(tiny, {p: edit.deltas()[p] for p in earlier})
            with edited(tiny, partial):
                keys = compute_keys(tiny, REQUESTS, layer, templates)
                residual = edit.targets - subject_residuals(tiny, LAYERS[-1])
            target = residual / (len(LAYERS) - i)
            eigenvalues, vectors = torch.linalg.eigh(stats[layer].moment)
            root = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T  # C^½
            a = torch.cat([keys, lam**0.5 * root])
            b = torch.cat([target, torch.zeros(len(root), target.shape[1], dtype=torch.float64)])
            expected = torch.linalg.lstsq(a, b, driver="gelsd").solution
            torch.testing.assert_close(edit.delta[layer], expected, atol=1e-6, rtol=1e-4)

    def test_both_keys_solve_the_least_squares_with_half_weight_rows(self, tiny, stats, tmp_path):
        """``key_match="both"``: rows k_avg and k_bare, each with residual R, both at weight ½."""
        hparams = dataclasses.replace(FAST, key_match="both")
        edit = memit_edit(tiny, REQUESTS, layers=[1], hparams=hparams, stats=stats,
                          cache_dir=tmp_path, progress=False)  # fmt: skip
        templates = memory.context_templates(tiny, hparams)
        averaged = compute_keys(tiny, REQUESTS, 1, templates)
        bare = compute_keys(tiny, REQUESTS, 1, ["{}"])
        assert not torch.allclose(averaged, bare)  # the two rows differ
        residual = edit.targets - subject_residuals(tiny, 1)
        lam = hparams.mom2_update_weight
        eigenvalues, vectors = torch.linalg.eigh(stats[1].moment)
        root = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T  # C^½
        a = torch.cat([averaged * 0.5**0.5, bare * 0.5**0.5, lam**0.5 * root])
        zeros = torch.zeros(len(root), residual.shape[1], dtype=torch.float64)
        b = torch.cat([residual * 0.5**0.5, residual * 0.5**0.5, zeros])
        expected = torch.linalg.lstsq(a, b, driver="gelsd").solution
        torch.testing.assert_close(edit.delta[1], expected, atol=1e-6, rtol=1e-4)
        assert edit.keys[1].shape == (2 * len(REQUESTS), tiny.cfg.d_mlp)

    def test_key_match_does_not_change_the_cached_targets(self, tiny, stats, z_cache, edit):
        """z does not depend on key_match, so both settings share one cache file per request."""
        hparams = dataclasses.replace(FAST, key_match="both")
        paths = {multilayer.target_path("f", REQUESTS[0], 1, h, z_cache) for h in (FAST, hparams)}
        assert len(paths) == 1

    def test_edit_moves_the_residual_towards_the_targets(self, tiny, edit):
        """After apply, h at the last layer is closer to every z than before."""
        before = (edit.targets - subject_residuals(tiny, LAYERS[-1])).norm(dim=1)
        with edit.apply(tiny):
            after = (edit.targets - subject_residuals(tiny, LAYERS[-1])).norm(dim=1)
        assert (after < before).all()
        assert edit.residual_norms[0] == pytest.approx(before.mean().item(), rel=1e-6)

    def test_targets_are_residual_plus_clamped_delta(self, tiny, edit):
        """z − h is within MEMIT's clamp of 0.75 ‖h‖."""
        h = subject_residuals(tiny, LAYERS[-1])
        ratio = (edit.targets - h).norm(dim=1) / h.norm(dim=1)
        assert (ratio > 0).all() and (ratio <= FAST.clamp_norm_factor + 1e-5).all()


class TestBatchedValues:
    @pytest.mark.parametrize("batch_size", [3, 2])
    def test_a_batch_gives_each_request_its_own_delta(self, tiny, batch_size):
        """Batched δ (batched by suffix length) equal each request's own, in request order."""
        hparams = EditHyperParams(context_lengths=((3, 2),), v_steps=6, early_stop_nll=1.0)
        templates = memory.context_templates(tiny, hparams)
        requests = REQUESTS[::-1]  # longest suffix first, so batching reorders them
        norms = torch.tensor([3.0, 5.0, 4.0])
        together, losses = optimize_deltas(
            tiny, requests, 1, templates, norms, hparams, batch_size=batch_size, progress=False
        )
        for i, request in enumerate(requests):
            alone, alone_losses = optimize_deltas(
                tiny, [request], 1, templates, norms[i : i + 1], hparams, progress=False
            )
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-4)
            assert len(losses[i]) == len(alone_losses[0])

    def test_targets_are_cached_per_request(self, tiny, stats, z_cache, edit, monkeypatch):
        """A second edit with the same requests reads every z from the cache."""
        monkeypatch.setattr(
            multilayer, "optimize_deltas", lambda *a, **k: pytest.fail("recomputed")
        )
        again = edit_tiny(tiny, stats, z_cache)
        assert torch.equal(again.targets, edit.targets)

    def test_corrupt_cached_target_is_rebuilt(self, tiny, stats, tmp_path):
        """A damaged z file is reported and recomputed."""
        first = edit_tiny(tiny, stats, tmp_path, REQUESTS[:1])
        (path,) = (tmp_path / "memit_z").glob("*.st")
        path.write_bytes(b"garbage")
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            again = edit_tiny(tiny, stats, tmp_path, REQUESTS[:1])
        torch.testing.assert_close(again.targets, first.targets)


class TestUndoAndSaving:
    def test_revert_is_bit_exact(self, tiny, edit):
        """Reverting restores every weight bit for bit, and only W_out of the layers changed."""
        before = weights(tiny)
        handle = edit.apply(tiny)
        changed = {n for n, p in backend.named_weights(tiny) if not torch.equal(p, before[n])}
        assert changed == {f"blocks.{layer}.mlp.W_out" for layer in LAYERS}
        handle.revert()
        assert_same_weights(tiny, before)

    def test_memit_edit_leaves_model_untouched(self, tiny, stats, tmp_path):
        """Computing an edit changes no weight, leaves no hook, restores requires_grad."""
        before = weights(tiny)
        flags = [p.requires_grad for p in tiny.parameters()]
        edit_tiny(tiny, stats, tmp_path)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0
        assert [p.requires_grad for p in tiny.parameters()] == flags

    def test_failure_between_layers_leaves_model_clean(self, tiny, stats, tmp_path, monkeypatch):
        """An exception while the first layer's update is applied reverts it."""
        before = weights(tiny)
        calls = []
        real = multilayer.compute_keys

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return real(*args, **kwargs)

        monkeypatch.setattr(multilayer, "compute_keys", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            edit_tiny(tiny, stats, tmp_path)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0

    def test_save_load_round_trip(self, tiny, edit, tmp_path):
        """A saved edit loads with the same tensors and requests, and applies identically."""
        loaded = WeightEdit.load(edit.save(tmp_path / "batch.safetensors"), model=tiny)
        assert isinstance(loaded, MultiLayerEdit)
        assert loaded.requests == edit.requests and loaded.layers == edit.layers
        assert loaded.residual_norms == edit.residual_norms
        assert torch.equal(loaded.targets, edit.targets)
        for layer in LAYERS:
            assert torch.equal(loaded.delta[layer], edit.delta[layer])
        with pytest.raises(ValueError, match="another model"):
            MultiLayerEdit.load(tmp_path / "batch.safetensors", model=rome_lens.tiny_model(seed=1))

    def test_tables_per_request_and_per_layer(self, edit):
        """to_dataframe has a row per request with its outcome; layer_dataframe one per layer."""
        df = edit.to_dataframe()
        assert df["subject"].tolist() == [r.subject for r in REQUESTS]
        assert df["took"].tolist() == [o.took for o in edit.outcomes]
        layers = edit.layer_dataframe()
        assert layers["layer"].tolist() == LAYERS
        expected = [edit.delta[layer].norm().item() for layer in LAYERS]
        assert layers["delta_norm"].tolist() == pytest.approx(expected)


class TestBadInput:
    def test_conflicting_targets_name_both(self, tiny):
        a = EditRequest("{} is in", "The Louvre", "Rome")
        b = EditRequest("{} is in", "The Louvre", "Oslo")
        with pytest.raises(ValueError, match="'Rome'.*'Oslo'.*without_conflicts"):
            memit_edit(tiny, [a, b], layers=LAYERS, progress=False)

    def test_repeated_request_is_allowed(self, tiny, stats, tmp_path):
        """The same fact twice is no conflict: both rows share one target and the first layer's
        update is the least-squares solution with that fact's keys counted twice."""
        edit = edit_tiny(tiny, stats, tmp_path, [REQUESTS[0], REQUESTS[0]])
        assert torch.equal(edit.targets[0], edit.targets[1])
        templates = memory.context_templates(tiny, FAST)
        averaged = compute_keys(tiny, REQUESTS[:1], LAYERS[0], templates)
        bare = compute_keys(tiny, REQUESTS[:1], LAYERS[0], ["{}"])
        keys = torch.cat([averaged, bare]) / 2**0.5  # key_match="both"
        residual = (edit.targets[:1] - subject_residuals(tiny, LAYERS[-1])[:1]) / len(LAYERS)
        residual = torch.cat([residual, residual]) / 2**0.5
        lam, c = FAST.mom2_update_weight, stats[LAYERS[0]].moment
        expected = torch.linalg.solve(lam * c + 2 * keys.T @ keys, 2 * keys.T @ residual)
        torch.testing.assert_close(edit.delta[LAYERS[0]], expected, rtol=1e-4, atol=1e-7)

    def test_no_requests(self, tiny):
        with pytest.raises(ValueError, match="at least one EditRequest"):
            memit_edit(tiny, [], layers=LAYERS, progress=False)

    def test_not_a_request(self, tiny):
        with pytest.raises(TypeError, match="EditRequest objects"):
            memit_edit(tiny, ["The Louvre is in Rome"], layers=LAYERS, progress=False)

    @pytest.mark.parametrize("layers", [[0, 3], [-1, 1]])
    def test_layer_out_of_range(self, tiny, layers):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\)"):
            memit_edit(tiny, REQUESTS, layers=layers, progress=False)

    @pytest.mark.parametrize("layers", [[1, 0], [1, 1], []])
    def test_layers_not_ascending(self, tiny, layers):
        with pytest.raises(ValueError, match="ascending|at least one"):
            memit_edit(tiny, REQUESTS, layers=layers, progress=False)

    def test_prompt_longer_than_context(self, tiny):
        long = EditRequest("{} is" + " very" * 80 + " far from", "The Louvre", "Rome")
        with pytest.raises(ValueError, match="n_ctx"):
            memit_edit(tiny, [long], layers=LAYERS, progress=False)

    def test_statistics_from_another_layer(self, tiny, stats):
        swapped = {0: stats[1], 1: stats[0]}
        with pytest.raises(ValueError, match="layer 1, not layer 0"):
            memit_edit(tiny, REQUESTS, layers=LAYERS, stats=swapped, progress=False)

    def test_statistics_from_another_model(self, stats):
        with pytest.raises(ValueError, match="another model"):
            memit_edit(rome_lens.tiny_model(seed=1), REQUESTS, layers=LAYERS, stats=stats)


def test_default_layers_fall_back_to_the_rome_layer(tiny):
    """An unknown model gets ROME's default layer and up to four before it."""
    assert default_memit_layers(tiny) == [0, 1]
