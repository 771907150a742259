"""Widgets, offline pages and figures."""

from __future__ import annotations

import re

import pytest
import torch
from matplotlib.figure import Figure

import rome_lens
from rome_lens import EditRequest, ROMEHyperParams, rome_edit, trace_fact
from rome_lens.analysis import logit_lens
from rome_lens.evaluation import Evaluation
from rome_lens.tracing import average_causal_effects, trace_severed
from rome_lens.viz import (
    Widget,
    edit_widget,
    evaluation_widget,
    logit_lens_widget,
    page,
    plot_logit_lens,
    report,
    trace_widget,
)

from .conftest import hooks_left

PROMPT = "The Eiffel Tower is located in"
SUBJECT = "The Eiffel Tower"
BUNDLE_MARK = "var CircuitsVis="


@pytest.fixture(scope="module")
def trace(tiny):
    return trace_fact(tiny, PROMPT, SUBJECT, samples=2, progress=False)


@pytest.fixture(scope="module")
def lens(tiny):
    return logit_lens(tiny, PROMPT, targets=["Paris", "Rome"], k=5, progress=False)


@pytest.fixture(scope="module")
def edit(tiny):
    """A quick edit (C = I, no context prefixes) of the tiny model."""
    hparams = ROMEHyperParams(mom2_adjustment=False, context_lengths=())
    request = EditRequest("{} is located in", SUBJECT, "Rome")
    return rome_edit(tiny, request, hparams=hparams, progress=False)


class TestWidgets:
    def test_trace_heatmaps_have_a_cell_per_token_and_layer(self, tiny, trace):
        """Each kind's panel holds one cell per (token, layer) carrying that score."""
        html = trace_widget(trace).html()
        panels = html.split('<g class="trace-heatmap"')[1:]
        assert len(panels) == len(trace.kinds)
        for k, panel in enumerate(panels):
            cells = re.findall(r'data-row="(\d+)" data-column="(\d+)" data-value="([^"]+)"', panel)
            assert len(cells) == len(trace.str_tokens) * tiny.cfg.n_layers
            for token, layer, score in cells:
                expected = float(trace.scores[k, int(token), int(layer)])
                assert float(score) == pytest.approx(expected, rel=1e-5)

    def test_every_heatmap_has_a_colour_bar_from_the_noised_p(self, trace):
        """A colour bar under each panel runs from the noised p to the panel's highest score."""
        html = trace_widget(trace).html()
        bars = html.split('<g class="colorbar">')[1:]
        assert len(bars) == len(trace.kinds)
        for k, bar in enumerate(bars):
            bar = bar[: bar.index("</g>")]
            ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', bar)
            assert float(ticks[0]) == pytest.approx(trace.corrupted_prob, rel=0.05)
            assert float(ticks[-1]) == pytest.approx(float(trace.scores[k].max()), rel=0.05)

    def test_trace_widget_warns_and_summarises(self, trace):
        """A trace the model cannot support shows its problems, in the widget and its summary."""
        widget = trace_widget(trace)
        assert trace.problems  # the tiny model knows no fact
        assert widget.html().count('class="warning"') == len(trace.problems)
        assert "cannot show where the fact is stored" in widget.summary[0]

    def test_subject_tokens_are_starred(self, trace):
        """Subject tokens carry a star in the heatmap labels, the others do not."""
        html = trace_widget(trace).html()
        first, last = trace.subject_range
        assert f"{trace.str_tokens[first]!r}*".replace("'", "&#x27;") in html
        assert f"{trace.str_tokens[-1]!r}*".replace("'", "&#x27;") not in html

    def test_notebook_html_inlines_the_bundle(self, trace):
        """_repr_html_ carries the circuitsvis bundle itself; no CDN is referenced."""
        html = trace_widget(trace)._repr_html_()
        assert html.count(BUNDLE_MARK) == 1
        assert "unpkg.com" not in html and "sourceMappingURL" not in html
        assert html.count('data-component="ColoredTokens"') == 1  # one strip, with a slider
        assert html.count('type="range"') == 1

    def test_page_inlines_the_bundle_once(self, trace, lens, tmp_path):
        """A page of several circuitsvis widgets holds the bundle exactly once."""
        path = report(tmp_path / "r", trace, logit_lens_widget(lens, layers=[0, 2]))
        text = path.read_text()
        assert path.suffix == ".html"
        assert text.count(BUNDLE_MARK) == 1
        assert text.count('class="circuitsvis"') == 2
        assert "<script src=" not in text
        assert text.count('<section class="widget"') == 2 and 'nav class="toc"' in text

    def test_lens_widget_lists_every_layer_and_target(self, tiny, lens):
        """The lens widget's table has a row per layer; one TokenLogProbs with a frame per layer."""
        widget = logit_lens_widget(lens, layers=[0, 2])
        html = widget.html(bundle=False)
        assert html.count('class="grid"') == 1
        assert html.count('data-component="TokenLogProbs"') == 1
        (part,) = widget.circuitsvis
        assert part.labels == ["layer 0", "layer 2"] and part.initial == 1
        assert part.frames[1]["prompt"][-1] == lens.targets[0]
        assert html.count("<tr><td>") == tiny.cfg.n_layers  # the target table
        assert widget.to_dataframe().equals(lens.to_dataframe())

    def test_lens_charts_tell_before_from_after_without_colour(self, lens):
        """With a lens before, each target has a solid line with circles and a dashed one with
        squares, on charts with layer and rank ticks and the legend outside the plot."""
        html = logit_lens_widget(lens, before=lens).html(bundle=False)
        rank = html[html.index('<svg class="lens-rank"') :]
        rank = rank[: rank.index("</svg>")]
        assert rank.count('class="series"') == 2 * len(lens.targets)
        assert rank.count("stroke-dasharray") >= len(lens.targets)
        ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', rank)
        assert {"0", "1", "2"} <= set(ticks) and "1" in ticks and f"{lens.vocab_size:,}" in ticks
        width = int(re.search(r'width="(\d+)"', rank).group(1))
        legend_x = min(float(x) for x in re.findall(r'<g class="legend"><line x1="([\d.]+)"', rank))
        plot_right = float(
            re.search(r'<rect x="(\d+)" y="\d+" width="(\d+)"', rank).group(1)
        ) + float(re.search(r'<rect x="\d+" y="\d+" width="(\d+)"', rank).group(1))
        assert width >= 500 and legend_x > plot_right

    def test_lens_widget_rejects_missing_layers(self, lens):
        """A layer the lens does not have is named."""
        with pytest.raises(ValueError, match=r"layers \[7\] are out of range"):
            logit_lens_widget(lens, layers=[0, 7])

    def test_edit_widget_compares_and_reverts(self, tiny, edit):
        """Before/after rows come from the unedited and edited model; the weights are restored."""
        original = tiny.blocks[edit.layer].mlp.W_out.clone()
        widget = edit_widget(tiny, edit, {"edit": PROMPT, "neighbour": "The Louvre is in"}, k=3)
        table = widget.to_dataframe()
        assert torch.equal(tiny.blocks[edit.layer].mlp.W_out, original)
        assert hooks_left(tiny) == 0
        assert list(table["label"].unique()) == ["edit", "neighbour"]
        edited_rows = table[table.label == "edit"]
        with torch.no_grad():
            with rome_lens.edited(tiny, edit):
                after = tiny(tiny.to_tokens(PROMPT))[0, -1].softmax(-1)
            before = tiny(tiny.to_tokens(PROMPT))[0, -1].softmax(-1)
        for column, probs in (("after", after), ("before", before)):
            assert edited_rows[column].iloc[0] == tiny.to_single_str_token(int(probs.argmax()))
            assert edited_rows[f"p_{column}"].iloc[0] == pytest.approx(float(probs.max()), rel=1e-5)
        assert not edited_rows["p_after"].equals(edited_rows["p_before"])

    def test_edit_widget_defaults_to_the_request_prompt(self, tiny, edit):
        """Without prompts the widget shows the edit's own prompt."""
        table = edit_widget(tiny, edit, k=2).to_dataframe()
        assert table["prompt"].unique().tolist() == [PROMPT]
        with pytest.raises(ValueError, match="at least one prompt"):
            edit_widget(tiny, edit, [])

    def test_evaluation_widget_summarises(self):
        """The evaluation widget's summary table holds ES/PS/NS of the cases, in percent."""
        rows = [
            {"case_id": i, "method": "rome", "edit_seconds": 1.0}
            | {
                f"{stage}_{m}_{kind}": value
                for stage in ("pre", "post")
                for m in ("efficacy", "paraphrase", "neighborhood")
                for kind in ("score", "magnitude")
            }
            for i, value in enumerate([1.0, 0.0])
        ]
        html = evaluation_widget(Evaluation(rows)).html()
        first_table = html[html.index("<table") : html.index("</table>")]
        headers = re.findall(r"<th>(.*?)</th>", first_table)
        cells = re.findall(r"<td>(.*?)</td>", first_table)
        summary = dict(zip(headers, cells, strict=True))
        assert (summary["method"], summary["cases"]) == ("rome", "2")
        assert summary["post_ES"] == summary["post_NS"] == "50.0"

    def test_report_rejects_unknown_items(self, tmp_path):
        """report() names what it cannot show."""
        with pytest.raises(TypeError, match="widgets or rome_lens results, got int"):
            report(tmp_path / "r.html", 3)

    def test_plain_widget_page(self):
        """A widget without circuitsvis parts needs no bundle."""
        assert BUNDLE_MARK not in page([Widget("x", "<p>hi</p>")])


class TestFigures:
    def test_trace_heatmaps_are_saved(self, tiny, tmp_path):
        """plot() draws one heatmap per kind and writes a PNG."""
        trace = trace_fact(tiny, PROMPT, SUBJECT, kinds=("mlp", "attn"), samples=2, progress=False)
        fig = trace.plot(path=tmp_path / "trace.png")
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 4  # two heatmaps, two colour bars
        assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_severed_and_average_plots(self, tiny, tmp_path):
        """The severed bars and the average lines save as SVG too."""
        severed = trace_severed(tiny, PROMPT, SUBJECT, samples=2, progress=False)
        severed.plot(path=tmp_path / "severed.svg")
        facts = [{"prompt": PROMPT, "subject": SUBJECT}, {"prompt": PROMPT, "subject": "Tower"}]
        average = average_causal_effects(tiny, facts, kinds=("mlp",), samples=2, progress=False)
        average.plot(path=tmp_path / "average.svg")
        assert (tmp_path / "severed.svg").read_text().lstrip().startswith("<?xml")
        assert "<svg" in (tmp_path / "average.svg").read_text()

    def test_html_escapes_and_lists_peaks(self, tiny):
        """The trace widget names every kind's peak and escapes the prompt."""
        trace = trace_fact(
            tiny, "The <b>Eiffel Tower</b> is in", "Eiffel", samples=2, progress=False
        )
        html = trace_widget(trace).html(bundle=False)
        assert "&lt;b&gt;" in html and "<b>Eiffel" not in html
        peaks = html[html.index('<table class="peaks">') :]
        assert peaks[: peaks.index("</table>")].count("<tr><td>") == 3

    def test_plot_saves_png_and_svg(self, lens, tmp_path):
        """plot_logit_lens draws one line per target (two with before) and saves both formats."""
        fig = plot_logit_lens(lens, before=lens)
        assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 4
        lens.plot(path=tmp_path / "lens.svg")
        lens.plot(path=tmp_path / "lens.png")
        assert "<svg" in (tmp_path / "lens.svg").read_text()
        assert (tmp_path / "lens.png").read_bytes()[:4] == b"\x89PNG"
