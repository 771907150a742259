"""One interface for every result: to_dataframe, plot, widget, save and load."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import rome_lens
from rome_lens.analysis import logit_lens
from rome_lens.core.results import Result, register_type, register_view, view
from rome_lens.editing import (
    EditRequest,
    FTHyperParams,
    MEMITHyperParams,
    ROMEHyperParams,
    WeightEdit,
    ft_edit,
    memit_edit,
    rome_edit,
)
from rome_lens.evaluation import evaluate_edits, load_counterfact_sample, sequential_edits
from rome_lens.stats import accumulate_moments, key_second_moment
from rome_lens.tracing import average_causal_effects, trace_fact, trace_severed
from rome_lens.viz import Widget

PROMPT = "The Eiffel Tower is located in"
SUBJECT = "The Eiffel Tower"
REQUEST = EditRequest("{} is located in", SUBJECT, "Rome", "Paris")
QUICK = ROMEHyperParams(context_lengths=(), v_steps=2, mom2_adjustment=False)


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory) -> dict[str, Result]:
    """One of every result type, computed quickly on the tiny model."""
    folder = tmp_path_factory.mktemp("cache")
    texts = ["The Eiffel Tower is in Paris.", "The Louvre is in Paris."]
    cases = load_counterfact_sample(limit=2)
    facts = [{"prompt": PROMPT, "subject": SUBJECT}, {"prompt": PROMPT, "subject": "Tower"}]
    stats = {
        layer: key_second_moment(tiny, layer, n_tokens=1000, cache_dir=folder, progress=False)
        for layer in (0, 1)
    }
    memit = MEMITHyperParams(context_lengths=(), v_steps=2)
    return {
        "trace": trace_fact(tiny, PROMPT, SUBJECT, samples=2, progress=False),
        "severed": trace_severed(tiny, PROMPT, SUBJECT, samples=2, progress=False),
        "average": average_causal_effects(tiny, facts, kinds=("mlp",), samples=2, progress=False),
        "lens": logit_lens(tiny, PROMPT, targets=["Paris"], progress=False),
        "key_stats": stats[1],
        "moments": accumulate_moments(
            tiny,
            forward=["blocks.0.hook_resid_post"],
            corpus=texts,
            progress=False,
            use_cache=False,
        )["blocks.0.hook_resid_post", "forward"],
        "rome": rome_edit(tiny, REQUEST, layer=1, hparams=QUICK, progress=False),
        "memit": memit_edit(
            tiny,
            [REQUEST],
            layers=[0, 1],
            hparams=memit,
            stats=stats,
            cache_dir=folder,
            progress=False,
        ),
        "ft": ft_edit(tiny, REQUEST, layer=1, hparams=FTHyperParams(steps=2), progress=False),
        "evaluation": evaluate_edits(tiny, cases, "none", fluency=False, progress=False),
        "sequential": sequential_edits(
            tiny, cases, checkpoints=(1, 2), layer=1, hparams=QUICK, progress=False
        ),
    }


NAMES = [
    "trace", "severed", "average", "lens", "key_stats", "moments",
    "rome", "memit", "ft", "evaluation", "sequential",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
class TestCommonInterface:
    def test_to_dataframe(self, results, name):
        """to_dataframe gives a non-empty table."""
        table = results[name].to_dataframe()
        assert isinstance(table, pd.DataFrame) and len(table) > 0

    def test_plot_draws_a_figure_and_saves_it(self, results, name, tmp_path):
        """plot() returns a Figure with axes, and saves it when given a path."""
        figure = results[name].plot(path=tmp_path / "figure.png")
        assert isinstance(figure, Figure) and figure.axes
        assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG"

    def test_widget(self, results, name):
        """widget() returns a Widget with a title, HTML and the numbers behind it."""
        widget = results[name].widget()
        assert isinstance(widget, Widget) and widget.title
        assert widget.html(bundle=False).startswith('<div class="rome-lens">')
        assert len(widget.to_dataframe()) > 0

    def test_save_and_load_round_trip(self, results, name, tmp_path, tiny):
        """Every result saves to safetensors + JSON and loads back with the same table."""
        result = results[name]
        loaded = type(result).load(result.save(tmp_path / "result.st"), model=tiny)
        assert type(loaded) is type(result)
        pd.testing.assert_frame_equal(loaded.to_dataframe(), result.to_dataframe())

    def test_report_accepts_it(self, results, name, tmp_path):
        """viz.report takes the result as it is."""
        path = rome_lens.viz.report(tmp_path / "page.html", results[name])
        assert f"<h2>{results[name].widget().title}</h2>" in path.read_text()


class TestDrawingIntoAxes:
    @pytest.mark.parametrize(
        "name", ["severed", "key_stats", "moments", "rome", "memit", "evaluation", "sequential"]
    )
    def test_one_panel_results_draw_into_the_given_axes(self, results, name):
        """A one-panel figure goes into the Axes it is given."""
        figure = Figure()
        ax = figure.subplots()
        assert results[name].plot(ax=ax) is figure
        assert ax.has_data()

    def test_trace_panels_go_into_the_given_axes(self, results):
        """A three-kind trace draws into three given axes (and their colour bars)."""
        figure = Figure()
        axes = figure.subplots(1, 3)
        assert results["trace"].plot(ax=list(axes)) is figure
        with pytest.raises(ValueError, match="need 3 axes, got 1"):
            results["trace"].plot(ax=[axes[0]])


class TestSavedFiles:
    def test_another_model_is_refused(self, results, tmp_path):
        """A result computed on one model does not load for another."""
        other = rome_lens.tiny_model(seed=1)
        for name in ("trace", "lens", "key_stats", "rome"):
            path = results[name].save(tmp_path / f"{name}.st")
            with pytest.raises(ValueError, match="another model"):
                type(results[name]).load(path, model=other)

    def test_an_edit_loads_as_its_own_kind_through_the_base(self, results, tmp_path):
        """WeightEdit.load reads any edit kind back as that kind."""
        for name in ("rome", "memit", "ft"):
            loaded = WeightEdit.load(results[name].save(tmp_path / f"{name}.st"))
            assert type(loaded) is type(results[name])
            for key, delta in results[name].deltas().items():
                assert torch.equal(loaded.deltas()[key], delta)

    def test_nothing_is_pickled(self, results, tmp_path):
        """The metadata is plain JSON and the tensors plain safetensors."""
        import json

        path = results["average"].save(tmp_path / "average.st")
        meta = json.loads(path.with_suffix(".st.json").read_text())
        assert meta["metadata"]["kind"] == "average_effects"
        from safetensors.torch import load_file

        assert "traces.0.scores" in load_file(path)


class TestRegistries:
    def test_a_kind_cannot_be_claimed_twice(self):
        """Registering another class under an existing kind raises instead of replacing it."""

        class Impostor:
            pass

        with pytest.raises(ValueError, match="both claim the kind 'rank_one'"):
            register_type("rank_one")(Impostor)

    def test_a_view_cannot_be_registered_twice(self):
        """A second plot view for a result type raises."""
        from rome_lens.tracing import CausalTrace

        with pytest.raises(ValueError, match="CausalTrace already has a plot view"):
            register_view(CausalTrace, "plot")(lambda result, ax=None: None)
        assert view(CausalTrace.__new__(CausalTrace), "plot").__name__ == "plot_trace"

    def test_a_result_without_a_view_says_so(self):
        """A result type no view is registered for names what is missing."""
        from dataclasses import dataclass

        @dataclass
        class Bare(Result):
            kind = "test_bare"
            value: int

        with pytest.raises(NotImplementedError, match="Bare has no plot view"):
            Bare(1).plot()
