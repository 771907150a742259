"""Figures, the HTML page and the command line."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from rome_lens import average_causal_effects, trace_fact, trace_severed
from rome_lens.cli import main
from rome_lens.report import trace_page

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


class TestFigures:
    def test_trace_heatmaps_are_saved(self, tiny, tmp_path):
        """plot() draws one heatmap per kind and writes a PNG."""
        trace = trace_fact(tiny, PROMPT, SUBJECT, kinds=("mlp", "attn"), samples=2, progress=False)
        fig = trace.plot(tmp_path / "trace.png")
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 4  # two heatmaps, two colour bars
        assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_severed_and_average_plots(self, tiny, tmp_path):
        """The severed bars and the average lines save as SVG too."""
        severed = trace_severed(tiny, PROMPT, SUBJECT, samples=2, progress=False)
        severed.plot(tmp_path / "severed.svg")
        facts = [{"prompt": PROMPT, "subject": SUBJECT}, {"prompt": PROMPT, "subject": "Tower"}]
        average = average_causal_effects(tiny, facts, kinds=("mlp",), samples=2, progress=False)
        average.plot(tmp_path / "average.svg")
        assert (tmp_path / "severed.svg").read_text().lstrip().startswith("<?xml")
        assert "<svg" in (tmp_path / "average.svg").read_text()

    def test_html_page_escapes_and_lists_peaks(self, tiny):
        """The page names every kind's peak and escapes the prompt."""
        trace = trace_fact(
            tiny, "The <b>Eiffel Tower</b> is in", "Eiffel", samples=2, progress=False
        )
        page = trace_page(trace, image="t.png")
        assert "&lt;b&gt;" in page and "<b>Eiffel" not in page
        assert page.count("<tr><td>") == 3


@pytest.mark.slow
class TestCommandLine:
    def test_trace_writes_its_files(self, smol, tmp_path, capsys):
        """`rome-lens trace` prints the peaks and writes PNG, CSV and HTML."""
        code = main(
            [
                "trace",
                PROMPT,
                "--subject",
                SUBJECT,
                "--kinds",
                "mlp",
                "--samples",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0
        assert "peak   mlp: token 3 'iffel'" in out
        assert {p.name for p in tmp_path.iterdir()} == {"trace.png", "trace.csv", "index.html"}

    def test_bad_subject_is_one_line_and_status_2(self, smol, tmp_path, capsys):
        """A subject missing from the prompt exits 2 with a one-line message."""
        code = main(["trace", PROMPT, "--subject", "Louvre", "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("rome-lens: error: subject 'Louvre' is not in the prompt")
        assert "\n" not in err
