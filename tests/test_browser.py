"""The demo report in a real browser: headless Chromium, offline, no console errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rome_lens.cli import main
from tests.browser import chromium_path, visit

pytestmark = pytest.mark.slow
OUTPUT = Path(os.environ.get("ROME_LENS_TEST_OUTPUT", Path(__file__).parents[1] / "test-output"))


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
    """What Chromium saw on the demo page (and a screenshot in the test output)."""
    return visit(
        demo_folder,
        "index.html",
        ["svg.trace-heatmap", "svg.trace-heatmap rect.cell", "div.circuitsvis", "table.grid"],
        screenshot=OUTPUT / "report.png",
    )


class TestDemoReport:
    def test_heatmaps_have_one_cell_per_token_and_layer(self, seen, smol, demo_folder):
        """Each kind's heatmap rendered with a cell for every (token, layer)."""
        tokens = len(smol.to_str_tokens("The Eiffel Tower is located in the city of"))
        assert seen.counts["svg.trace-heatmap"] == 3
        assert seen.counts["svg.trace-heatmap rect.cell"] == 3 * tokens * smol.cfg.n_layers

    def test_circuitsvis_widgets_rendered(self, seen, smol):
        """Every circuitsvis root (3 trace strips, one per lens layer) has content."""
        assert seen.counts["div.circuitsvis"] == 3 + smol.cfg.n_layers
        assert seen.empty_circuitsvis == 0
        assert seen.counts["table.grid"] == 1

    def test_no_console_errors(self, seen):
        """The page logs no errors (scripts, missing files)."""
        assert seen.console_errors == []

    def test_nothing_left_the_machine(self, seen):
        """Every request went to the local server; the page fetched nothing else."""
        assert seen.external_requests() == []
        assert seen.requests == [seen.url]

    def test_screenshot_saved(self, seen):
        """A screenshot of the rendered page is in the test output."""
        assert (OUTPUT / "report.png").read_bytes()[:4] == b"\x89PNG"
