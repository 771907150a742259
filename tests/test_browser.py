"""The demo report in a real browser: legible, compact, offline, with no console errors."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from rome_lens.cli import main
from rome_lens.core.models import DEFAULT_MODEL, PREPEND_BOS
from tests.browser import chromium_path, visit

pytestmark = pytest.mark.slow
OUTPUT = Path(os.environ.get("ROME_LENS_TEST_OUTPUT", Path(__file__).parents[1] / "test-output"))
WIDTH = 1400


@pytest.fixture(scope="module")
def demo_folder(smol, tmp_path_factory) -> Path:
    """`rome-lens demo` run once: trace, edit and logit lens of the Eiffel Tower."""
    if chromium_path() is None:
        pytest.skip("Chromium is not installed (`apt-get install chromium` failed or was not run)")
    pytest.importorskip("playwright", reason="playwright drives Chromium: pip install playwright")
    folder = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(folder), "--no-progress"]) == 0
    return folder


@pytest.fixture(scope="module")
def seen(demo_folder, smol):
    """What Chromium saw on the demo page at 1400 px, with screenshots in the test output."""
    return visit(
        demo_folder,
        "index.html",
        ["g.trace-heatmap", "g.trace-heatmap rect.cell", "div.circuitsvis", "table.grid"],
        screenshot=OUTPUT / "report.png",
        sections=OUTPUT / "report-sections",
        width=WIDTH,
    )


class TestWhatTheReaderSees:
    def test_the_page_is_short(self, seen):
        """The whole page is under 3,000 px tall at a 1400 px wide window."""
        assert seen.layout["height"] < 3000

    def test_no_tall_empty_containers(self, seen):
        """No container taller than 200 px shows neither text nor graphics."""
        assert seen.layout["empty_tall"] == []

    def test_every_heatmap_has_a_colour_bar_and_every_chart_ticks(self, seen):
        """Heatmaps carry colour bars with tick labels; lens charts are 500+ px with ticks."""
        assert seen.layout["heatmaps"] == 3 and seen.layout["heatmaps_with_colorbar"]
        assert seen.layout["charts"] == 2 and seen.layout["charts_with_ticks"]
        assert min(seen.layout["chart_widths"]) >= 500

    def test_summary_card_names_the_peak_layer(self, seen, demo_folder):
        """The summary card says where the fact is recalled: the MLP peak's token and layer."""
        trace = pd.read_csv(demo_folder / "trace.csv").query("kind == 'mlp'")
        peak = trace.loc[trace["score"].idxmax()]
        summary = seen.layout["summary"]
        assert "Where the fact is recalled" in summary
        assert f"MLP output at '{peak['str_token']}'" in summary
        assert f"peak at layer {peak['layer']}" in summary
        assert "What the edit changed" in summary and "Layer by layer" in summary

    def test_navigation_and_sections(self, seen):
        """A table of contents links the three sections, each of which collapses."""
        assert seen.layout["toc_links"] == 3 and seen.layout["sections"] == 3

    def test_no_text_under_11_px(self, seen):
        """No visible text is smaller than 11 px."""
        assert seen.layout["smallest_font"] >= 11, seen.layout["smallest_text"]


class TestRendering:
    def test_heatmaps_have_one_cell_per_token_and_layer(self, seen, smol):
        """Each kind's heatmap rendered with a cell for every (token, layer)."""
        bos = PREPEND_BOS[DEFAULT_MODEL]  # the demo runs load_model()'s own choice
        tokens = len(smol.to_str_tokens("The Eiffel Tower is located in the city of", bos))
        assert seen.counts["g.trace-heatmap"] == 3
        assert seen.counts["g.trace-heatmap rect.cell"] == 3 * tokens * smol.cfg.n_layers

    def test_one_circuitsvis_widget_per_section_that_uses_it(self, seen):
        """One token strip with a layer slider for the trace and one for the lens, both drawn."""
        assert seen.counts["div.circuitsvis"] == 2
        assert seen.empty_circuitsvis == 0
        assert seen.counts["table.grid"] == 1

    def test_sliders_show_another_layer(self, seen):
        """Moving each layer slider to its first frame relabels it and redraws the strip."""
        assert seen.slider_labels == ["layer 0", "layer 0"]

    def test_no_console_errors(self, seen):
        """The page logs no errors (scripts, missing files)."""
        assert seen.console_errors == []

    def test_nothing_left_the_machine(self, seen):
        """Every request went to the local server; the page fetched nothing else."""
        assert seen.external_requests() == []
        assert seen.requests == [seen.url]

    def test_screenshots_saved(self, seen):
        """A screenshot of the whole page and of each section are in the test output."""
        assert (OUTPUT / "report.png").read_bytes()[:4] == b"\x89PNG"
        assert len(list((OUTPUT / "report-sections").glob("section-*.png"))) == 3


@pytest.fixture(scope="module")
def microscope_page(tmp_path_factory):
    """`rome-lens microscope` on the tiny model (saved as a folder), and what Chromium saw."""
    if chromium_path() is None:
        pytest.skip("Chromium is not installed (`apt-get install chromium` failed or was not run)")
    pytest.importorskip("playwright", reason="playwright drives Chromium: pip install playwright")
    import rome_lens
    from rome_lens.core.models import save_model

    folder = tmp_path_factory.mktemp("microscope")
    model_path = save_model(rome_lens.tiny_model(), folder / "model")
    text = "The Eiffel Tower is located in the city of Paris. The Louvre is a museum in Paris."
    args = ["microscope", text, "--model-path", str(model_path), "--reference-tokens", "300"]
    args += ["--context-steps", "3", "--no-progress", "--out", str(folder / "page")]
    assert main(args) == 0
    return visit(
        folder / "page",
        "index.html",
        ["div.circuitsvis", "svg.heatmaps"],
        screenshot=OUTPUT / "microscope.png",
        width=WIDTH,
    )


class TestMicroscopePage:
    def test_every_widget_renders_offline_without_errors(self, microscope_page):
        """Heatmaps with colour bars, charts with ticks, three token strips; no errors, no
        outside requests, nothing tall and empty, no text under 11 px."""
        layout = microscope_page.layout
        assert layout["heatmaps"] == 3 and layout["heatmaps_with_colorbar"]
        assert layout["charts"] == 4 and layout["charts_with_ticks"]
        assert microscope_page.counts["div.circuitsvis"] == 3
        assert microscope_page.empty_circuitsvis == 0
        assert layout["empty_tall"] == [] and layout["smallest_font"] >= 11
        assert microscope_page.console_errors == []
        assert microscope_page.external_requests() == []

    def test_summary_card_has_a_sentence_per_metric(self, microscope_page):
        summary = microscope_page.layout["summary"]
        for heading in ("Token nonlinearity.", "Intermediate predictions.", "Contextualization.",
                        "Layer linearity.", "Geometry."):  # fmt: skip
            assert heading in summary


@pytest.fixture(scope="module")
def influence_page(tmp_path_factory):
    """`rome-lens influence` on the tiny model (saved as a folder), and what Chromium saw."""
    if chromium_path() is None:
        pytest.skip("Chromium is not installed (`apt-get install chromium` failed or was not run)")
    pytest.importorskip("playwright", reason="playwright drives Chromium: pip install playwright")
    import rome_lens
    from rome_lens.core.models import save_model

    folder = tmp_path_factory.mktemp("influence")
    model_path = save_model(rome_lens.tiny_model(), folder / "model")
    corpus = folder / "texts.txt"
    corpus.write_text(
        "The Eiffel Tower is located in the city of Paris.\n\nThe Louvre is in Paris.\n\n"
        "Rome is the capital of Italy.\n\nCats sleep most of the day.\n\nBerlin is in Germany."
    )
    args = ["influence", "The Eiffel Tower is located in the city of", "--completion", " Paris"]
    args += ["--corpus", str(corpus), "--model-path", str(model_path), "--fit-tokens", "200"]
    args += ["--top-k", "4", "--no-progress", "--out", str(folder / "page")]
    assert main(args) == 0
    return visit(
        folder / "page",
        "index.html",
        ["div.circuitsvis", "svg.heatmaps"],
        screenshot=OUTPUT / "influence.png",
        width=WIDTH,
    )


class TestInfluencePage:
    def test_every_widget_renders_offline_without_errors(self, influence_page):
        """The layer heatmap with its colour bar, the score distribution's figure, the coloured
        texts; no errors, no outside requests, nothing tall and empty, no text under 11 px."""
        layout = influence_page.layout
        assert layout["heatmaps"] == 1 and layout["heatmaps_with_colorbar"]
        assert layout["figures"] >= 1
        assert influence_page.counts["div.circuitsvis"] == 1
        assert influence_page.empty_circuitsvis == 0
        assert layout["empty_tall"] == [] and layout["smallest_font"] >= 11
        assert influence_page.console_errors == []
        assert influence_page.external_requests() == []

    def test_summary_names_the_top_text(self, influence_page):
        assert "Eiffel" in influence_page.layout["summary"]
