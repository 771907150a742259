"""Lifelong editing options on the tiny model: early stops, the solves' extra terms, weights
rewinding, the value-norm anchor, preserved facts, the per-layer drift table, exact undo."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from rome_lens.editing import (
    AlphaEditHyperParams,
    EditHyperParams,
    EditRequest,
    MEMITHyperParams,
    ROMEHyperParams,
    SequentialEditor,
    alphaedit_edit,
    anchored_targets,
    memit_update,
    multilayer,
    null_space_update,
    rome_edit,
    weights_as,
)
from rome_lens.editing.memory import context_templates, in_contexts, optimize_deltas
from rome_lens.editing.memory import subject_activations as activations_at
from rome_lens.stats import key_second_moment

from .conftest import assert_same_weights, hooks_left, weights

LAYERS = [0, 1]
QUICK = AlphaEditHyperParams(context_lengths=(), v_steps=4)
FIRST = [
    EditRequest("{} is located in", "The Eiffel Tower", "Rome"),
    EditRequest("{} is located in", "The Louvre", "Berlin"),
]
LATER = [EditRequest("{} plays the", "Toko Yasuda", "piano")]
ALL_OPTIONS = {
    "alphaedit": AlphaEditHyperParams(context_lengths=(), v_steps=4, rewind=True,
                                      value_norm_anchor=True, anchor=0.5,
                                      early_stop="most_probable"),
    "memit": MEMITHyperParams(context_lengths=(), v_steps=4, rewind=True, value_norm_anchor=True,
                              anchor=0.5, norm_ridge=2.0, history=True,
                              mom2_update_weight=50.0),
}  # fmt: skip


@pytest.fixture(scope="module")
def stats(tiny, tmp_path_factory):
    """Key statistics of the tiny model's layers 0 and 1."""
    folder = tmp_path_factory.mktemp("stats")
    return {
        layer: key_second_moment(tiny, layer, n_tokens=2000, cache_dir=folder, progress=False)
        for layer in LAYERS
    }


def in_a_row(tiny, stats, folder, method="alphaedit", hparams=QUICK, **kwargs) -> SequentialEditor:
    """A SequentialEditor on layers 0 and 1 that never reads or writes the z cache."""
    return SequentialEditor(tiny, method, layers=LAYERS, hparams=hparams, stats=stats,
                            cache_dir=folder, use_cache=False, progress=False,
                            **kwargs)  # fmt: skip


def two_batches(editor: SequentialEditor) -> None:
    with warnings.catch_warnings(record=True):
        editor.edit(FIRST)
        editor.edit(LATER)


def random_matrix(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def matrix_root(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def runner_up(model, prompt: str) -> str:
    """A word ``model`` already ranks high after ``prompt`` but not first: a target a few
    steps of δ put on top, on whichever backend's tiny model (each has its own weights)."""
    logits = model(model.to_tokens(prompt))[0, -1]
    for token in logits.argsort(descending=True)[1:].tolist():
        text = model.to_string([token])
        whole = model.to_tokens(text, prepend_bos=False)[0].tolist() == [token]
        if text.startswith(" ") and text.strip().isalpha() and whole:
            return text  # a space-led word of one token, as targets are read
    raise AssertionError("no usable runner-up token")


class TestEarlyStop:
    def test_most_probable_stops_once_the_target_is_on_top(self, tiny):
        """MPES ends each δ sooner, and smaller, than an NLL stop set tight, with the target
        token then the top prediction."""
        target = runner_up(tiny, "The Eiffel Tower is located in")
        request = EditRequest("{} is located in", "The Eiffel Tower", target)
        tight = EditHyperParams(context_lengths=(), v_steps=40, early_stop_nll=1e-4)
        mpes = dataclasses.replace(tight, early_stop="most_probable")
        hook = "blocks.1.hook_mlp_out"
        found = {}
        for name, hparams in (("nll", tight), ("most_probable", mpes)):
            templates = context_templates(tiny, hparams)
            norms = torch.full((1,), 50.0)  # a loose clamp: 4 × 50
            found[name] = optimize_deltas(tiny, [request], 1, templates, norms, hparams,
                                          hook=hook, progress=False)  # fmt: skip
        (delta_mp,), (losses_mp,) = found["most_probable"]
        (delta_nll,), (losses_nll,) = found["nll"]
        assert len(losses_mp) < len(losses_nll)
        assert float(delta_mp.norm()) < float(delta_nll.norm())
        # The check, by hand: the prompt, δ added at the subject's last token, predicts " the".
        tokens = tiny.to_tokens("The Eiffel Tower is located in")
        subject_end = tiny.to_tokens("The Eiffel Tower").shape[1] - 1

        def add_delta(activation, hook):
            activation[:, subject_end] += delta_mp.to(activation.dtype)
            return activation

        logits = tiny.run_with_hooks(tokens, fwd_hooks=[(hook, add_delta)])
        (target_id,) = tiny.to_tokens(target, prepend_bos=False)[0].tolist()
        assert int(logits[0, -1].argmax()) == target_id

    def test_rome_takes_the_most_probable_stop(self, tiny, stats, tmp_path):
        """A ROME edit with MPES stops sooner than with a tight NLL stop."""
        target = runner_up(tiny, "The Eiffel Tower is located in")
        request = EditRequest("{} is located in", "The Eiffel Tower", target)
        tight = ROMEHyperParams(context_lengths=(), v_steps=30, early_stop_nll=1e-4)
        steps = {}
        for stop in ("nll", "most_probable"):
            hparams = dataclasses.replace(tight, early_stop=stop)
            with warnings.catch_warnings(record=True):
                edit = rome_edit(tiny, request, layer=1, hparams=hparams, stats=stats[1],
                                 cache_dir=tmp_path, progress=False)  # fmt: skip
            steps[stop] = len(edit.losses)
        assert steps["most_probable"] < steps["nll"]

    def test_the_stop_is_part_of_the_target_cache_key_only_when_chosen(self):
        """``early_stop="nll"`` leaves the cached targets' settings as they were; MPES drops
        the unread NLL threshold."""
        assert "early_stop" not in EditHyperParams().value_settings()
        chosen = EditHyperParams(early_stop="most_probable").value_settings()
        assert chosen["early_stop"] == "most_probable" and "early_stop_nll" not in chosen

    def test_bad_stop(self):
        with pytest.raises(ValueError, match="early_stop must be 'nll' or 'most_probable', got"):
            EditHyperParams(early_stop="top1")  # type: ignore[arg-type]


class TestSolves:
    def test_memit_update_minimises_every_term(self):
        """ΔW minimises ‖KΔW − R‖² + λ‖C^½ΔW‖² + ridge‖ΔW‖² + ‖K_pΔW‖² + α‖D + ΔW‖²,
        checked against one augmented least squares."""
        keys, residual = random_matrix(5, 12, seed=0), random_matrix(5, 7, seed=1)
        basis = random_matrix(30, 12, seed=2)
        moment, earlier = basis.T @ basis / 30, random_matrix(4, 12, seed=3)
        drift = random_matrix(12, 7, seed=4)
        lam, ridge, alpha = 3.0, 0.7, 0.4
        found = memit_update(moment, keys, residual, lam, ridge=ridge,
                             preserved=earlier.T @ earlier, anchor=alpha, drift=drift)  # fmt: skip
        eye = torch.eye(12, dtype=torch.float64)
        a = torch.cat([keys, lam**0.5 * matrix_root(moment), ridge**0.5 * eye, earlier,
                       alpha**0.5 * eye])  # fmt: skip
        zeros = torch.zeros(12, 7, dtype=torch.float64)
        b = torch.cat([residual, zeros, zeros, torch.zeros(4, 7, dtype=torch.float64),
                       -(alpha**0.5) * drift])  # fmt: skip
        expected = torch.linalg.lstsq(a, b, driver="gelsd").solution
        torch.testing.assert_close(found, expected)

    def test_memit_update_without_options_is_memits(self):
        """No ridge, history or anchor: ΔW = (λC + KᵀK)⁻¹ KᵀR."""
        keys, residual = random_matrix(5, 12, seed=5), random_matrix(5, 7, seed=6)
        basis = random_matrix(30, 12, seed=7)
        moment = basis.T @ basis / 30
        expected = torch.linalg.inv(2.0 * moment + keys.T @ keys) @ keys.T @ residual
        torch.testing.assert_close(memit_update(moment, keys, residual, 2.0), expected)

    def test_the_ridge_shrinks_the_update(self):
        """‖ΔW‖ falls as the norm ridge grows."""
        keys, residual = random_matrix(5, 12, seed=8), random_matrix(5, 7, seed=9)
        moment = torch.eye(12, dtype=torch.float64) * 1e-3
        norms = [float(memit_update(moment, keys, residual, 1.0, ridge=r).norm())
                 for r in (0.0, 1.0, 10.0)]  # fmt: skip
        assert norms[0] > norms[1] > norms[2] > 0

    def test_null_space_update_with_an_anchor_minimises_inside_the_null_space(self):
        """ΔW = U Z, Z minimising ‖KUZ − R‖² + ‖K_pUZ‖² + l2‖Z‖² + α‖D + UZ‖², U an
        orthonormal basis of P's range."""
        basis, _ = torch.linalg.qr(random_matrix(12, 8, seed=10))
        keys, residual = random_matrix(5, 12, seed=11), random_matrix(5, 7, seed=12)
        earlier, drift = random_matrix(3, 12, seed=13), random_matrix(12, 7, seed=14)
        l2, alpha = 0.5, 0.8
        found = null_space_update(basis @ basis.T, keys, residual, earlier.T @ earlier, l2,
                                  anchor=alpha, drift=drift)  # fmt: skip
        eye = torch.eye(8, dtype=torch.float64)
        a = torch.cat([keys @ basis, earlier @ basis, l2**0.5 * eye, alpha**0.5 * basis])
        b = torch.cat([residual, torch.zeros(3 + 8, 7, dtype=torch.float64),
                       -(alpha**0.5) * drift])  # fmt: skip
        z = torch.linalg.lstsq(a, b, driver="gelsd").solution
        torch.testing.assert_close(found, basis @ z)

    @pytest.mark.parametrize("solve", ["memit", "alphaedit"])
    def test_an_anchor_needs_the_drift(self, solve):
        keys, residual = random_matrix(2, 4, seed=0), random_matrix(2, 3, seed=1)
        eye = torch.eye(4, dtype=torch.float64)
        with pytest.raises(ValueError, match="anchor > 0 needs the drift"):
            if solve == "memit":
                memit_update(eye, keys, residual, 1.0, anchor=1.0)
            else:
                null_space_update(eye, keys, residual, None, 1.0, anchor=1.0)

    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda: MEMITHyperParams(norm_ridge=-1.0), "norm_ridge must be a finite number"),
            (lambda: MEMITHyperParams(norm_ridge=float("nan")), "norm_ridge must be a finite"),
            (lambda: AlphaEditHyperParams(anchor=-0.1), "anchor must be a finite number ≥ 0"),
        ],
    )
    def test_bad_weights(self, make, message):
        with pytest.raises(ValueError, match=message):
            make()


class TestRewind:
    def test_rewound_targets_are_the_unedited_models(self, tiny, stats, tmp_path):
        """With rewind, a later batch's targets are those the unedited model gives; without,
        they are not."""
        rewind = dataclasses.replace(QUICK, rewind=True)
        with warnings.catch_warnings(record=True):
            alone = alphaedit_edit(tiny, LATER, layers=LAYERS, hparams=rewind, stats=stats,
                                   cache_dir=tmp_path, use_cache=False, progress=False)  # fmt: skip
        for hparams, same in ((rewind, True), (QUICK, False)):
            editor = in_a_row(tiny, stats, tmp_path, hparams=hparams)
            two_batches(editor)
            later = editor.edits[-1]
            editor.revert_all()
            assert torch.allclose(later.targets, alone.targets) is same

    def test_the_model_keeps_its_own_weights_while_targets_are_rewound(self, tiny, stats, tmp_path):
        """During a rewound batch the model holds W₀; after it, its own edited weights."""
        editor = in_a_row(tiny, stats, tmp_path, hparams=dataclasses.replace(QUICK, rewind=True))
        with warnings.catch_warnings(record=True):
            editor.edit(FIRST)
        start = editor.state.starting_weights()
        seen = []
        real = multilayer.subject_targets

        def watching(model, *args, **kwargs):
            seen.append(torch.equal(model.blocks[1].mlp.W_out, start["blocks.1.mlp.W_out"]))
            return real(model, *args, **kwargs)

        edited_weights = weights(tiny)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(multilayer, "subject_targets", watching)
            with warnings.catch_warnings(record=True):
                editor.edit(LATER)
        assert seen == [True]
        editor.revert_last()
        assert_same_weights(tiny, edited_weights)
        editor.revert_all()

    def test_the_state_keeps_weights_only_when_asked(self, tiny, stats, tmp_path):
        """Without rewind or anchor the state keeps no copy of W_out, and says so if asked."""
        editor = in_a_row(tiny, stats, tmp_path)
        assert editor.state.original == {}
        with pytest.raises(ValueError, match="kept no starting weights of layers"):
            editor.state.starting_weights()

    def test_projectors_cannot_rewind(self, tiny, stats, tmp_path):
        """Given projectors, the editor has no starting weights to rewind to, and says so."""
        projectors = {layer: torch.eye(tiny.cfg.d_mlp, dtype=torch.float64) for layer in LAYERS}
        rewind = dataclasses.replace(QUICK, rewind=True)
        with pytest.raises(ValueError, match="rewind and anchor need the starting weights"):
            alphaedit_edit(tiny, LATER, layers=LAYERS, projectors=projectors, hparams=rewind,
                           progress=False)  # fmt: skip


class TestValueNorm:
    def test_anchored_values_share_one_norm(self, tiny):
        """Each v* = v + (z − h) keeps its direction and takes the given norm."""
        layer, requests = 1, FIRST + LATER
        texts = [in_contexts(request, ["{}"])[0] for request in requests]
        h = activations_at(tiny, texts, f"blocks.{layer}.hook_resid_post")
        v = activations_at(tiny, texts, f"blocks.{layer}.hook_mlp_out")
        targets = h + random_matrix(3, tiny.cfg.d_model, seed=0)
        anchored, norm = anchored_targets(tiny, requests, layer, targets, 7.5)
        values, before = v + anchored - h, v + targets - h
        assert norm == 7.5
        torch.testing.assert_close(values.norm(dim=1), torch.full((3,), 7.5, dtype=torch.float64))
        cosine = torch.nn.functional.cosine_similarity(values, before, dim=1)
        torch.testing.assert_close(cosine, torch.ones(3, dtype=torch.float64))

    def test_the_first_batch_sets_the_norm_as_its_trimmed_mean(self, tiny):
        """With no norm yet, the anchor is the mean norm of the values, the largest 5% dropped."""
        requests = FIRST + LATER
        texts = [in_contexts(request, ["{}"])[0] for request in requests]
        h = activations_at(tiny, texts, "blocks.1.hook_resid_post")
        v = activations_at(tiny, texts, "blocks.1.hook_mlp_out")
        targets = h + random_matrix(3, tiny.cfg.d_model, seed=1)
        _, norm = anchored_targets(tiny, requests, 1, targets, None)
        norms = (v + targets - h).norm(dim=1).sort().values
        assert norm == pytest.approx(float(norms.mean()))  # ceil(0.95·3) = 3: none dropped

    def test_later_batches_keep_the_first_batchs_norm(self, tiny, stats, tmp_path):
        """The state takes the first edit's value norm and every later edit uses it."""
        hparams = dataclasses.replace(QUICK, value_norm_anchor=True)
        editor = in_a_row(tiny, stats, tmp_path, hparams=hparams)
        two_batches(editor)
        first, later = editor.edits
        assert first.value_norm > 0 and later.value_norm == first.value_norm
        assert editor.state.value_norm == first.value_norm
        editor.revert_all()


class TestPreserve:
    def test_preserve_adds_the_keys_second_moment_times_their_count(self, tiny, stats, tmp_path):
        """``preserve`` starts Σ KᵀK at n·C for each layer given."""
        editor = in_a_row(tiny, stats, tmp_path, preserve={0: stats[0]})
        expected = stats[0].n_tokens * stats[0].moment.double()
        torch.testing.assert_close(editor.preserved[0], expected)
        assert 1 not in editor.preserved

    def test_preserved_facts_move_less(self, tiny, stats, tmp_path):
        """Keys preserved by ``preserve`` change their outputs less than when not preserved."""
        prompts = ["The Prado is a museum in", "Toko Yasuda plays the guitar"]
        kept = {layer: key_second_moment(tiny, layer, corpus=prompts, n_tokens=10**6,
                                         cache_dir=tmp_path, progress=False)
                for layer in LAYERS}  # fmt: skip
        hparams = dataclasses.replace(QUICK, null_space_energy=0.9999)  # a near-full null space

        def output_change(preserve) -> float:
            editor = in_a_row(tiny, stats, tmp_path, hparams=hparams, preserve=preserve)
            with warnings.catch_warnings(record=True):
                (edit,) = editor.edit(FIRST)
            delta = edit.delta[1]
            editor.revert_all()
            return float((delta * (kept[1].moment.double() @ delta)).sum())

        assert output_change(kept) < 0.5 * output_change(None)

    def test_bad_preserve(self, tiny, stats, tmp_path):
        with pytest.raises(ValueError, match=r"preserve has layer 2, not one of \[0, 1\]"):
            in_a_row(tiny, stats, tmp_path, preserve={2: stats[1]})
        with pytest.raises(ValueError, match="layer"):
            in_a_row(tiny, stats, tmp_path, preserve={0: stats[1]})
        with pytest.raises(AttributeError, match="keeps no preserved keys"):
            SequentialEditor(tiny, "rome", layers=[1], stats={1: stats[1]},
                             hparams=ROMEHyperParams(context_lengths=(), v_steps=2),
                             preserve={1: stats[1]}, progress=False)  # fmt: skip


class TestLayerTable:
    def test_rows_measure_each_batchs_update_and_the_drift(self, tiny, stats, tmp_path):
        """delta_norm, relative_delta, drift and output_change, against dense references."""
        original = weights(tiny)
        editor = in_a_row(tiny, stats, tmp_path, held_out={1: stats[1]})
        with warnings.catch_warnings(record=True):
            editor.edit(FIRST)
            middle = weights(tiny)
            editor.edit(LATER)
        table = editor.layer_dataframe()
        assert list(table.batch) == [0, 0, 1, 1] and list(table.layer) == [0, 1, 0, 1]
        row = table.iloc[3]
        name = "blocks.1.mlp.W_out"
        w0, w1 = original[name].double(), middle[name].double()
        w2 = tiny.blocks[1].mlp.W_out.detach().double()
        assert row.delta_norm == pytest.approx(float((w2 - w1).norm()), rel=1e-9)
        assert row.relative_delta == pytest.approx(float((w2 - w1).norm() / w1.norm()), rel=1e-9)
        assert row.drift == pytest.approx(float((w2 - w0).norm() / w0.norm()), rel=1e-9)
        root = matrix_root(stats[1].moment.double())  # ‖ΔW K₀‖ / ‖W K₀‖ through C₀^½
        expected = float((root @ (w2 - w1)).norm() / (root @ w1).norm())
        assert row.output_change == pytest.approx(expected, rel=1e-6)
        assert table[table.layer == 0].output_change.isna().all()  # no held-out keys there
        editor.revert_last()
        assert list(editor.layer_dataframe().batch) == [0, 0]
        editor.revert_all()


class TestUndo:
    @pytest.mark.parametrize("method", ["alphaedit", "memit"])
    def test_every_option_reverts_bit_for_bit(self, tiny, stats, tmp_path, method):
        """Two batches with all options on, then revert_all: the weights are the originals."""
        original = weights(tiny)
        editor = in_a_row(tiny, stats, tmp_path, method, ALL_OPTIONS[method],
                          preserve={1: stats[1]})  # fmt: skip
        two_batches(editor)
        assert not torch.equal(tiny.blocks[1].mlp.W_out, original["blocks.1.mlp.W_out"])
        editor.revert_all()
        assert_same_weights(tiny, original)
        assert hooks_left(tiny) == 0

    @pytest.mark.parametrize("method", ["alphaedit", "memit"])
    def test_a_failing_rewound_batch_leaves_the_edited_weights(self, tiny, stats, tmp_path,
                                                               method):  # fmt: skip
        """An interrupt while the starting weights are swapped in puts the edited ones back."""
        editor = in_a_row(tiny, stats, tmp_path, method, ALL_OPTIONS[method])
        with warnings.catch_warnings(record=True):
            editor.edit(FIRST)
        after_first = weights(tiny)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(multilayer, "spread_over_layers", interrupted)
            with pytest.raises(KeyboardInterrupt), warnings.catch_warnings(record=True):
                editor.edit(LATER)
        assert_same_weights(tiny, after_first)
        assert len(editor) == 1 and hooks_left(tiny) == 0
        editor.revert_all()

    def test_weights_as_puts_the_weights_back(self, tiny):
        """weights_as swaps values in for the block and restores them bit for bit, even
        after an error; a wrong shape writes nothing."""
        original = weights(tiny)
        name = "blocks.0.mlp.W_out"
        zeros = torch.zeros_like(original[name])
        with pytest.raises(RuntimeError, match="inside"), weights_as(tiny, {name: zeros}):
            assert float(tiny.blocks[0].mlp.W_out.detach().abs().sum()) == 0
            raise RuntimeError("inside")
        assert_same_weights(tiny, original)
        with (
            pytest.raises(ValueError, match="blocks.0.mlp.W_out has shape"),
            weights_as(tiny, {name: zeros.T}),
        ):
            pass
        assert_same_weights(tiny, original)
