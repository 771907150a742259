"""AlphaEdit and editing in a row, on the tiny model: the null space holds, reverts are exact."""

from __future__ import annotations

import warnings

import pytest
import torch

from rome_lens.core import backend
from rome_lens.editing import (
    DEFAULT_ALPHAEDIT_LAYERS,
    AlphaEditHyperParams,
    EditRequest,
    MEMITHyperParams,
    ROMEHyperParams,
    SequentialEditor,
    alphaedit_edit,
    default_alphaedit_layers,
    default_memit_layers,
    null_space_projector,
    null_space_update,
)
from rome_lens.stats import key_second_moment

from .conftest import hooks_left, weights

LAYERS = [0, 1]
QUICK = AlphaEditHyperParams(context_lengths=(), v_steps=4)
REQUESTS = [
    EditRequest("{} is located in", "The Eiffel Tower", "Rome"),
    EditRequest("{} is located in", "The Louvre", "Berlin"),
]
LATER = [EditRequest("{} plays the", "Toko Yasuda", "piano")]


@pytest.fixture(scope="module")
def stats(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats")
    return {
        layer: key_second_moment(tiny, layer, n_tokens=2000, cache_dir=folder, progress=False)
        for layer in LAYERS
    }


@pytest.fixture
def editor(tiny, stats, tmp_path):
    made = SequentialEditor(tiny, layers=LAYERS, hparams=QUICK, stats=stats, cache_dir=tmp_path,
                            progress=False)  # fmt: skip
    yield made
    made.revert_all()


def preserved_keys(stats, layer: int, energy: float) -> torch.Tensor:
    """Random keys in the span of C's large-eigenvalue eigenvectors (the preserved space)."""
    values, vectors = torch.linalg.eigh(stats[layer].moment.double())
    share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
    kept = vectors[:, share > energy]
    return (
        torch.randn(
            16, kept.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        @ kept.T
    )


class TestNullSpace:
    def test_preserved_keys_keep_their_outputs(self, tiny, stats, tmp_path):
        """Keys in the preserved subspace give W_out's outputs unchanged, to 1e-5."""
        with warnings.catch_warnings(record=True):
            edit = alphaedit_edit(tiny, REQUESTS, layers=LAYERS, hparams=QUICK, stats=stats,
                                  cache_dir=tmp_path, progress=False)  # fmt: skip
        for layer in LAYERS:
            keys = preserved_keys(stats, layer, QUICK.null_space_energy)
            w_out = tiny.blocks[layer].mlp.W_out.detach().double()
            before, after = keys @ w_out, keys @ (w_out + edit.delta[layer])
            torch.testing.assert_close(
                after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max())
            )
            assert float(edit.delta[layer].norm()) > 0  # the edit did write something

    def test_update_is_ridge_regression_without_a_projector(self):
        """With P = I and nothing preserved, ΔW = (KᵀK + l2 I)⁻¹ KᵀR, solved densely here."""
        generator = torch.Generator().manual_seed(3)
        keys = torch.randn(5, 12, generator=generator, dtype=torch.float64)
        residual = torch.randn(5, 7, generator=generator, dtype=torch.float64)
        found = null_space_update(torch.eye(12, dtype=torch.float64), keys, residual, None, 0.5)
        expected = (
            torch.linalg.inv(keys.T @ keys + 0.5 * torch.eye(12, dtype=torch.float64))
            @ keys.T
            @ residual
        )
        torch.testing.assert_close(found, expected)

    def test_update_is_ridge_regression_inside_the_null_space(self):
        """ΔW = N Z with Z the ridge solution in an orthonormal basis N of P's range."""
        generator = torch.Generator().manual_seed(4)
        dims = dict(generator=generator, dtype=torch.float64)
        basis, _ = torch.linalg.qr(torch.randn(12, 8, **dims))  # N: 12 × 8, orthonormal
        keys, residual = torch.randn(5, 12, **dims), torch.randn(5, 7, **dims)
        earlier = torch.randn(3, 12, **dims)
        found = null_space_update(basis @ basis.T, keys, residual, earlier.T @ earlier, 0.5)
        fit, keep = keys @ basis, earlier @ basis  # min ‖fit Z − R‖² + ‖keep Z‖² + l2‖Z‖²
        z = torch.linalg.solve(
            fit.T @ fit + keep.T @ keep + 0.5 * torch.eye(8, dtype=torch.float64), fit.T @ residual
        )
        torch.testing.assert_close(found, basis @ z)

    def test_projector_is_the_small_eigenvalue_span(self, stats):
        """P is symmetric, idempotent, and kills C's large-eigenvalue directions."""
        p = null_space_projector(stats[0], 0.03)
        torch.testing.assert_close(p, p.T)
        torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)
        keys = preserved_keys(stats, 0, 0.03)
        assert float((keys @ p).abs().max()) < 1e-10 * float(keys.abs().max())

    def test_bad_settings(self):
        with pytest.raises(ValueError, match=r"null_space_energy must be in \(0, 1\), got 0"):
            AlphaEditHyperParams(null_space_energy=0)
        with pytest.raises(ValueError, match="l2 must be positive, got -1"):
            AlphaEditHyperParams(l2=-1)


class TestSequentialEditor:
    def test_reverting_is_bit_exact(self, tiny, editor):
        """revert_last restores the weights after the first batch, revert_all the original."""
        original = weights(tiny)
        with warnings.catch_warnings(record=True):
            editor.edit(REQUESTS)
            first = weights(tiny)
            editor.edit(LATER)
        assert not all(torch.equal(first[n], p) for n, p in backend.named_weights(tiny))
        editor.revert_last()
        assert all(torch.equal(first[n], p) for n, p in backend.named_weights(tiny))
        editor.revert_all()
        assert all(torch.equal(original[n], p) for n, p in backend.named_weights(tiny))
        assert len(editor) == 0 and editor.preserved == {} and hooks_left(tiny) == 0

    def test_preserved_sums_the_keys_of_applied_batches(self, editor):
        """preserved[L] is Σ KᵀK over the batches applied, and drops a reverted one."""
        with warnings.catch_warnings(record=True):
            first = editor.edit(REQUESTS)[0]
            editor.edit(LATER)
        for layer in LAYERS:
            keys = torch.cat([edit.keys[layer] for edit in editor.edits]).double()
            torch.testing.assert_close(editor.preserved[layer], keys.T @ keys)
        editor.revert_last()
        for layer in LAYERS:
            keys = first.keys[layer].double()
            torch.testing.assert_close(editor.preserved[layer], keys.T @ keys)
        assert [r.subject for r in editor.requests] == ["The Eiffel Tower", "The Louvre"]

    def test_a_later_batch_moves_earlier_keys_less(self, tiny, editor):
        """Keeping earlier keys in K_p moves their outputs under half as much as forgetting them."""

        def moved_by_second_batch(keep: bool) -> dict[int, float]:
            with warnings.catch_warnings(record=True):
                (first,) = editor.edit(REQUESTS)
                before = {layer: tiny.blocks[layer].mlp.W_out.detach().double() for layer in LAYERS}
                if not keep:
                    editor.preserved = {}
                editor.edit(LATER)
            moved = {
                layer: float(
                    (
                        first.keys[layer].double()
                        @ (tiny.blocks[layer].mlp.W_out.detach().double() - w)
                    ).norm()
                )
                for layer, w in before.items()
            }
            editor.revert_all()
            return moved

        kept, forgotten = moved_by_second_batch(True), moved_by_second_batch(False)
        for layer in LAYERS:
            assert 0 < kept[layer] < 0.5 * forgotten[layer]

    def test_a_failing_batch_is_rolled_back(self, tiny, stats, tmp_path, monkeypatch):
        """An interrupt after part of a ROME batch is applied undoes that part, bit for bit."""
        editor = SequentialEditor(tiny, "rome", layers=[1], stats={1: stats[1]},
                                  hparams=ROMEHyperParams(context_lengths=(), v_steps=3),
                                  cache_dir=tmp_path, progress=False)  # fmt: skip
        with warnings.catch_warnings(record=True):
            editor.edit(LATER)
        after_first = weights(tiny)
        calls = []
        real = editor.editor.edit

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(editor.editor, "edit", failing)
        with pytest.raises(KeyboardInterrupt), warnings.catch_warnings(record=True):
            editor.edit(REQUESTS)
        assert len(editor) == 1 and hooks_left(tiny) == 0
        assert all(torch.equal(after_first[n], p) for n, p in backend.named_weights(tiny))
        editor.revert_all()

    @pytest.mark.parametrize("method", ["memit", "rome"])
    def test_memit_and_rome_in_a_row(self, tiny, stats, tmp_path, method):
        """MEMIT writes a batch as one edit, ROME one edit per request; both revert exactly."""
        original = weights(tiny)
        hparams = (MEMITHyperParams(context_lengths=(), v_steps=3) if method == "memit"
                   else ROMEHyperParams(context_lengths=(), v_steps=3))  # fmt: skip
        layers = LAYERS if method == "memit" else [1]
        editor = SequentialEditor(tiny, method, layers=layers, hparams=hparams,
                                  stats={k: v for k, v in stats.items() if k in layers},
                                  cache_dir=tmp_path, progress=False)  # fmt: skip
        with warnings.catch_warnings(record=True):
            batch = editor.edit(REQUESTS)
            editor.edit(LATER)
        assert len(batch) == (1 if method == "memit" else 2)
        assert len(editor.to_dataframe()) == 3
        editor.revert_all()
        assert all(torch.equal(original[n], p) for n, p in backend.named_weights(tiny))

    def test_bad_input(self, tiny, stats, editor):
        with pytest.raises(ValueError, match="method must be one of .*got 'rmoe'"):
            SequentialEditor(tiny, "rmoe")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"ROME edits one layer, got layers=\[0, 1\]"):
            SequentialEditor(tiny, "rome", layers=[0, 1], stats=stats, progress=False)
        with pytest.raises(TypeError, match="hparams must be AlphaEditHyperParams"):
            SequentialEditor(tiny, hparams=ROMEHyperParams(), stats=stats, progress=False)
        with pytest.raises(ValueError, match="a batch needs at least one EditRequest"):
            editor.edit([])
        with pytest.raises(ValueError, match="no batch to revert"):
            editor.revert_last()


class TestDefaultLayers:
    def test_a_listed_model_gets_its_layers(self, tiny, stats, tmp_path, monkeypatch):
        """A model in DEFAULT_ALPHAEDIT_LAYERS gets those layers, in SequentialEditor too."""
        monkeypatch.setitem(DEFAULT_ALPHAEDIT_LAYERS, tiny.cfg.model_name, [1])
        assert default_alphaedit_layers(tiny) == [1]
        editor = SequentialEditor(tiny, hparams=QUICK, stats=stats, cache_dir=tmp_path,
                                  progress=False)  # fmt: skip
        assert editor.layers == [1]

    def test_an_unlisted_model_gets_memit_layers(self, tiny):
        """A model missing from the table edits MEMIT's layers."""
        assert default_alphaedit_layers(tiny) == default_memit_layers(tiny) == [0, 1]

    def test_listed_layers_beyond_the_model_are_ignored(self, tiny, monkeypatch):
        """A listed layer the model does not have falls back to MEMIT's layers."""
        monkeypatch.setitem(DEFAULT_ALPHAEDIT_LAYERS, tiny.cfg.model_name, [1, 2, 3])
        assert default_alphaedit_layers(tiny) == default_memit_layers(tiny)
