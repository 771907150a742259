"""The editors as one family: one protocol, one registry, one settings tree; an editor of
one's own serves in evaluate_edits, SequentialEditor and the command line."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import pytest
import torch

from rome_lens.cli import main
from rome_lens.core.backend import Model
from rome_lens.core.models import save_model, tiny_model
from rome_lens.editing import (
    AlphaEditHyperParams,
    Editor,
    EditorSettings,
    EditorState,
    EditRequest,
    FTHyperParams,
    MEMITHyperParams,
    MultiLayerHyperParams,
    ROMEHyperParams,
    SequentialEditor,
    WeightEdit,
    WeightPatch,
    alphaedit_edit,
    edited,
    editors,
    get_editor,
    measure_outcomes,
    memit_edit,
    register_editor,
)
from rome_lens.editing.multilayer import target_path
from rome_lens.editing.registry import unregister_editor
from rome_lens.editing.requests import EditHyperParams
from rome_lens.evaluation import case_scores, evaluate_edits, load_counterfact_sample
from rome_lens.stats import KeyStats

from .conftest import weights

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
OTHER = EditRequest("{} is located in the city of", "The Louvre", "Berlin", "Paris")


@dataclasses.dataclass(frozen=True)
class ShiftSettings(EditorSettings):
    """The toy editor's one setting."""

    scale: float = 0.5
    """How large ΔW is."""


@dataclasses.dataclass(frozen=True)
class ShiftState(EditorState):
    """The toy editor's state: how many of its edits are applied."""

    written: int = 0
    """Edits applied so far."""

    def after(self, edit: WeightEdit) -> ShiftState:
        return dataclasses.replace(self, written=self.written + 1)


class ShiftEditor:
    """An editor of one's own, written against the protocol alone: it adds the fixed
    rank-one ΔW = scale · (1 + edits so far) · u vᵀ to one W_out, whatever the requests."""

    name = "toy_shift"
    settings_type = ShiftSettings
    batched = True

    def default_layers(self, model: Model) -> list[int]:
        return [1]

    def start(
        self,
        model: Model,
        settings: ShiftSettings,
        *,
        layers: Sequence[int] | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        cache_dir: object = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> ShiftState:
        return ShiftState(tuple(self.default_layers(model) if layers is None else layers))

    def edit(
        self,
        model: Model,
        requests: Sequence[EditRequest],
        settings: ShiftSettings | None = None,
        *,
        layers: Sequence[int] | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        state: EditorState | None = None,
        cache_dir: object = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> WeightEdit:
        settings = ShiftSettings() if settings is None else settings
        state = self.start(model, settings, layers=layers) if state is None else state
        assert isinstance(state, ShiftState)
        patch = WeightPatch.for_model(model, shift(model, state, settings), requests=requests)
        return dataclasses.replace(patch, outcomes=measure_outcomes(model, patch))


def shift(model: Model, state: ShiftState, settings: ShiftSettings) -> dict[str, torch.Tensor]:
    """The toy editor's ΔW for the state it edits from."""
    (layer,) = state.layers
    u = torch.ones(model.cfg.d_mlp, dtype=torch.float64)
    v = torch.linspace(-1, 1, model.cfg.d_model, dtype=torch.float64)
    return {f"blocks.{layer}.mlp.W_out": settings.scale * (1 + state.written) * torch.outer(u, v)}


@pytest.fixture
def toy():
    """The toy editor, registered for the test."""
    editor = register_editor(ShiftEditor())
    yield editor
    unregister_editor(editor.name)


class TestRegistry:
    def test_the_built_in_editors_are_registered_and_follow_the_protocol(self):
        """ROME, MEMIT, AlphaEdit and FT+L are registered under their names, each an Editor."""
        found = editors()
        assert {"rome", "memit", "alphaedit", "ft"} <= set(found)
        for name, editor in found.items():
            assert isinstance(editor, Editor) and editor.name == name
        batched = [found[name].batched for name in ("rome", "memit", "alphaedit", "ft")]
        assert batched == [False, True, True, False]

    def test_an_unknown_name_lists_the_registered_ones(self):
        """get_editor names what it was given and what it knows."""
        with pytest.raises(ValueError, match=r"method must be one of \['alphaedit', .*got 'rmoe'"):
            get_editor("rmoe")

    def test_a_taken_name_is_refused_unless_replaced(self, toy):
        """Registering another editor under a name in use raises; replace=True replaces it."""
        other = ShiftEditor()
        with pytest.raises(ValueError, match="'toy_shift' is registered already"):
            register_editor(other)
        assert register_editor(other, replace=True) is get_editor("toy_shift") is other
        register_editor(toy, replace=True)

    def test_an_object_without_the_protocol_is_refused(self):
        """Something lacking the protocol's members raises TypeError naming them."""
        with pytest.raises(TypeError, match="lacks"):
            register_editor(object())  # type: ignore[type-var]

    def test_an_editor_object_is_taken_as_it_is(self):
        """get_editor returns an editor it is given, registered or not."""
        editor = ShiftEditor()
        assert get_editor(editor) is editor


class TestAnEditorOfOnesOwn:
    def test_evaluate_edits_scores_it(self, tiny, toy):
        """evaluate_edits runs the toy editor by name: every case scored with its ΔW applied."""
        cases = load_counterfact_sample(limit=2)
        before = weights(tiny)
        df = evaluate_edits(tiny, cases, "toy_shift", fluency=False, progress=False).to_dataframe()
        assert all(torch.equal(p, before[n]) for n, p in weights(tiny).items())
        expected_edit = WeightPatch.for_model(tiny, shift(tiny, ShiftState((1,)), ShiftSettings()))
        with edited(tiny, expected_edit):
            expected = case_scores(tiny, cases)
        assert (df["method"] == "toy_shift").all()
        assert df["post_efficacy_magnitude"].tolist() == pytest.approx(
            expected["efficacy_magnitude"].tolist(), abs=1e-6
        )

    def test_sequential_editor_carries_its_state(self, tiny, toy):
        """SequentialEditor edits from the state the last batch left: the second ΔW is twice
        the first; revert_last goes back to the state before, revert_all to the weights."""
        original = weights(tiny)
        editor = SequentialEditor(tiny, "toy_shift", hparams=ShiftSettings(scale=0.25))
        (first,) = editor.edit([REQUEST])
        (second,) = editor.edit([OTHER])
        name = "blocks.1.mlp.W_out"
        torch.testing.assert_close(second.deltas()[name], 2 * first.deltas()[name])
        assert isinstance(editor.state, ShiftState) and editor.state.written == 2
        editor.revert_last()
        assert editor.state.written == 1  # type: ignore[attr-defined]
        editor.revert_all()
        assert all(torch.equal(p, original[n]) for n, p in weights(tiny).items())

    def test_sequential_editor_takes_an_unregistered_editor(self, tiny):
        """An editor object serves without being registered."""
        editor = SequentialEditor(tiny, ShiftEditor())
        editor.edit([REQUEST])
        assert editor.method == "toy_shift" and len(editor) == 1
        editor.revert_all()

    def test_the_command_line_edits_with_it(self, tiny, toy, tmp_path, capsys):
        """`rome-lens edit --method toy_shift` writes and saves the toy editor's edit."""
        folder = tmp_path / "model"
        save_model(tiny, folder)
        args = ["edit", "{} is located in", "--subject", "The Eiffel Tower", "--new", "Rome"]
        args += ["--method", "toy_shift", "--model-path", str(folder), "--allow-miss"]
        assert main([*args, "--no-progress", "--out", str(tmp_path / "out")]) == 0
        assert "edited blocks.1.mlp.W_out" in capsys.readouterr().out
        saved = WeightPatch.load(tmp_path / "out" / "edit.safetensors", model=tiny)
        expected = shift(tiny, ShiftState((1,)), ShiftSettings())
        torch.testing.assert_close(saved.delta, expected)

    def test_the_command_line_names_an_unknown_method(self, tiny, tmp_path, capsys):
        """An unknown --method exits 2 with the registered names."""
        folder = tmp_path / "model"
        save_model(tiny, folder)
        args = ["edit", "{} is in", "--subject", "The Louvre", "--new", "Rome", "--method", "rmoe"]
        assert main([*args, "--model-path", str(folder), "--out", str(tmp_path / "out")]) == 2
        assert "method must be one of" in capsys.readouterr().err


class TestOneProtocol:
    def test_rome_refuses_several_requests(self, tiny):
        """ROME writes one request per edit and says so, before any slow work."""
        with pytest.raises(ValueError, match="ROME writes one request per edit, got 2"):
            get_editor("rome").edit(tiny, [REQUEST, OTHER], layers=[1], progress=False)

    def test_a_state_and_layers_together_are_refused(self, tiny):
        """The state holds the layers and statistics: giving both is a mistake."""
        ft = get_editor("ft")
        state = ft.start(tiny, FTHyperParams(), layers=[1])
        with pytest.raises(ValueError, match="not both"):
            ft.edit(tiny, [REQUEST], state=state, layers=[1], progress=False)

    def test_a_state_from_another_model_is_refused(self, tiny, tmp_path):
        """The statistics a state holds must be the edited model's own."""
        rome = get_editor("rome")
        settings = ROMEHyperParams(context_lengths=(), mom2_n_tokens=500)
        state = rome.start(tiny, settings, layers=[1], cache_dir=tmp_path, progress=False)
        with pytest.raises(ValueError, match="another model"):
            rome.edit(tiny_model(seed=1), [REQUEST], settings, state=state, progress=False)

    def test_rome_refuses_a_state_without_the_statistics_it_reads(self, tiny):
        """A state started without C cannot serve settings that read C (no silent C = I)."""
        rome = get_editor("rome")
        bare = rome.start(tiny, ROMEHyperParams(mom2_adjustment=False), layers=[1])
        with pytest.raises(ValueError, match="no key statistics of layer 1"):
            rome.edit(tiny, [REQUEST], ROMEHyperParams(context_lengths=()), state=bare)

    def test_each_editor_starts_from_its_layers(self, tiny):
        """start checks the layers: one for ROME and FT+L, the model's defaults otherwise."""
        assert get_editor("ft").start(tiny, FTHyperParams()).layers == (1,)
        settings = ROMEHyperParams(mom2_adjustment=False)
        assert get_editor("rome").start(tiny, settings, layers=[2]).layers == (2,)
        with pytest.raises(ValueError, match=r"FT\+L edits one layer, got layers=\[0, 1\]"):
            get_editor("ft").start(tiny, FTHyperParams(), layers=[0, 1])
        with pytest.raises(ValueError, match="stats were given but FT"):
            get_editor("ft").start(tiny, FTHyperParams(), stats={1: None})  # type: ignore[dict-item]

    def test_fine_tuning_in_a_row(self, tiny):
        """SequentialEditor writes FT+L one request at a time and reverts it exactly."""
        original = weights(tiny)
        settings = FTHyperParams(steps=2)
        editor = SequentialEditor(tiny, "ft", layers=[1], hparams=settings, progress=False)
        with warnings.catch_warnings(record=True):
            batch = editor.edit([REQUEST, OTHER])
        assert len(batch) == 2
        assert [r.subject for r in editor.requests] == ["The Eiffel Tower", "The Louvre"]
        editor.revert_all()
        assert all(torch.equal(p, original[n]) for n, p in weights(tiny).items())

    def test_preserved_keys_alone_start_alphaedit_from_the_statistics(self, tiny, tmp_path):
        """alphaedit_edit with preserved keys and no projectors builds the projectors itself:
        nothing preserved gives the edit without preserved keys."""
        settings = AlphaEditHyperParams(context_lengths=(), v_steps=2, mom2_n_tokens=500)
        options = {"layers": [0, 1], "hparams": settings, "cache_dir": tmp_path, "progress": False}
        with warnings.catch_warnings(record=True):
            plain = alphaedit_edit(tiny, [REQUEST], **options)
            empty = alphaedit_edit(tiny, [REQUEST], preserved={}, **options)
        for layer in (0, 1):
            assert torch.equal(plain.delta[layer], empty.delta[layer])


class TestSettingsTree:
    def test_no_settings_class_carries_a_field_it_does_not_read(self):
        """MEMIT's λ, ridges and history are MEMIT's alone; AlphaEdit's null space is
        AlphaEdit's alone."""

        def names(cls: type) -> set[str]:
            return {f.name for f in dataclasses.fields(cls)}

        shared = names(MultiLayerHyperParams)
        assert names(MEMITHyperParams) - shared == {
            "mom2_update_weight", "max_condition", "norm_ridge", "history"
        }  # fmt: skip
        assert names(AlphaEditHyperParams) - shared == {"null_space_energy", "l2"}
        assert not {"mom2_n_tokens", "max_condition"} & names(EditHyperParams)
        assert not names(FTHyperParams) & names(EditHyperParams) - {"early_stop_nll"}

    @pytest.mark.parametrize(
        ("run", "given", "expected"),
        [
            (memit_edit, AlphaEditHyperParams(), "MEMITHyperParams, got AlphaEditHyperParams"),
            (alphaedit_edit, MEMITHyperParams(), "AlphaEditHyperParams, got MEMITHyperParams"),
        ],
    )
    def test_settings_of_another_editor_are_refused(self, tiny, run, given, expected):
        """An exact type check: AlphaEdit's settings derive from MEMIT's base, yet MEMIT
        refuses them, naming both classes."""
        with pytest.raises(TypeError, match=f"hparams must be {expected}"):
            run(tiny, [REQUEST], layers=[0, 1], hparams=given, progress=False)

    def test_the_settings_name_what_changes_the_targets(self, tmp_path):
        """MEMIT and AlphaEdit with the same δ settings share one cached z; a δ setting
        changes it, a solve setting does not."""
        memit = MEMITHyperParams(v_steps=3)
        alpha = AlphaEditHyperParams(v_steps=3, l2=1.0, null_space_energy=0.1)
        assert memit.value_settings() == alpha.value_settings()
        every = {f.name for f in dataclasses.fields(EditHyperParams)}
        assert set(memit.value_settings()) == every - {"early_stop"}  # "nll": keys as before

        def path(settings: EditHyperParams) -> object:
            return target_path("fingerprint", REQUEST, 1, settings, tmp_path)

        assert path(memit) == path(alpha) == path(dataclasses.replace(memit, max_condition=5.0))
        assert path(memit) != path(dataclasses.replace(memit, v_steps=4))
        assert path(memit) != path(dataclasses.replace(memit, early_stop="most_probable"))
