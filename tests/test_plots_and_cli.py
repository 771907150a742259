"""Figures, the HTML page and the command line (on a saved tiny model and the default one)."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

from rome_lens import RankOneEdit, average_causal_effects, trace_fact, trace_severed
from rome_lens.cli import main
from rome_lens.models import save_model
from rome_lens.viz import trace_widget

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

    def test_html_escapes_and_lists_peaks(self, tiny):
        """The trace widget names every kind's peak and escapes the prompt."""
        trace = trace_fact(
            tiny, "The <b>Eiffel Tower</b> is in", "Eiffel", samples=2, progress=False
        )
        html = trace_widget(trace).html(bundle=False)
        assert "&lt;b&gt;" in html and "<b>Eiffel" not in html
        peaks = html[html.index('<table class="peaks">') :]
        assert peaks[: peaks.index("</table>")].count("<tr><td>") == 3


@pytest.fixture(scope="module")
def tiny_path(tiny, tmp_path_factory):
    """The tiny model saved as a folder, for --model-path."""
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(tiny, folder)
    return str(folder)


class TestCommandLineOnAnyModel:
    def test_lens_prints_targets_and_writes_report(self, tiny_path, tmp_path, capsys):
        """`rome-lens lens --model-path` reads the saved model and writes CSV, figures, HTML."""
        args = ["lens", PROMPT, "--targets", "Paris", "Rome", "--model-path", tiny_path]
        code = main([*args, "--out", str(tmp_path)])
        out = capsys.readouterr().out
        assert code == 0
        assert "'Paris': p = " in out and "'Rome': p = " in out
        assert {p.name for p in tmp_path.iterdir()} == {
            "lens.csv",
            "lens.png",
            "lens.svg",
            "index.html",
        }
        assert len(pd.read_csv(tmp_path / "lens.csv")) == 2 * 3

    def test_edit_saves_a_loadable_edit(self, tiny, tiny_path, tmp_path, capsys):
        """`rome-lens edit` prints before/after for each prompt and saves the edit."""
        args = ["edit", "{} is located in", "--subject", SUBJECT, "--new", "Rome", "--layer", "1"]
        args += ["--neighbour", "The Louvre is located in", "--model-path", tiny_path]
        code = main([*args, "--no-progress", "--out", str(tmp_path)])
        out = capsys.readouterr().out
        assert code == 0
        assert "edited blocks.1.mlp.W_out" in out
        assert "neighbour 1: 'The Louvre is located in': before" in out
        edit = RankOneEdit.load(tmp_path / "edit.safetensors", model=tiny)
        assert edit.layer == 1 and edit.request.target_new == "Rome"
        assert "Logit lens" in (tmp_path / "index.html").read_text()

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["lens", PROMPT, "--model-path", "/no/such/model"], "does not exist"),
            (["trace", PROMPT, "--subject", "Louvre"], "subject 'Louvre' is not in the prompt"),
            (["edit", "{} is in", "--subject", "X", "--new", " "], "non-empty"),
            (["edit", "{} is in", "--subject", "X", "--new", "Y", "--layer", "9"], "layer"),
        ],
    )
    def test_bad_input_is_one_line_and_status_2(self, tiny_path, tmp_path, capsys, args, message):
        """Bad input exits 2 with one line naming the problem."""
        if "--model-path" not in args:
            args = [*args, "--model-path", tiny_path]
        code = main([*args, "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("rome-lens: error: ") and message in err
        assert "\n" not in err


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
        assert {p.name for p in tmp_path.iterdir()} == {
            "trace.png",
            "trace.svg",
            "trace.csv",
            "index.html",
        }

    def test_bad_subject_is_one_line_and_status_2(self, smol, tmp_path, capsys):
        """A subject missing from the prompt exits 2 with a one-line message."""
        code = main(["trace", PROMPT, "--subject", "Louvre", "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("rome-lens: error: subject 'Louvre' is not in the prompt")
        assert "\n" not in err
