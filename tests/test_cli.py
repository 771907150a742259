"""The command line: parsing before importing, exit statuses, files written."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pandas as pd
import pytest
import torch

from rome_lens.cli import _parser, main
from rome_lens.core.models import save_model
from rome_lens.editing import RankOneEdit
from rome_lens.editing import rome as rome_module

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


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
        args += ["--neighbor", "The Louvre is located in", "--model-path", tiny_path]
        code = main([*args, "--allow-miss", "--no-progress", "--out", str(tmp_path)])
        out = capsys.readouterr().out
        assert code == 0
        assert "edited blocks.1.mlp.W_out" in out
        assert "neighbor 1: 'The Louvre is located in': before" in out
        edit = RankOneEdit.load(tmp_path / "edit.safetensors", model=tiny)
        assert edit.layer == 1 and edit.request.target_new == "Rome"
        assert "Logit lens" in (tmp_path / "index.html").read_text()

    def test_an_edit_that_does_not_take_exits_1(self, tiny_path, tmp_path, capsys, monkeypatch):
        """With δ forced to zero the edit cannot take: one clear line and status 1, unless
        --allow-miss."""

        def no_change(model, requests, *args, **kwargs):
            return torch.zeros(len(requests), model.cfg.d_model), [[0.0] for _ in requests]

        monkeypatch.setattr(rome_module, "optimize_deltas", no_change)
        args = ["edit", "{} is located in", "--subject", SUBJECT, "--new", "guitar", "--layer", "1"]
        args += ["--model-path", tiny_path, "--no-progress", "--out", str(tmp_path)]
        assert main(args) == 1
        captured = capsys.readouterr()
        assert "the edit did NOT take" in captured.out
        assert "rome-lens: the edit did not take: 'guitar' is at rank" in captured.err
        assert "--allow-miss" in captured.err
        assert main([*args, "--allow-miss"]) == 0

    def test_an_unreliable_trace_exits_1(self, tiny_path, tmp_path, capsys):
        """A random model knows no fact: the trace warns, exits 1, and 0 with --allow-unreliable."""
        args = ["trace", PROMPT, "--subject", SUBJECT, "--samples", "2", "--kinds", "mlp"]
        args += ["--model-path", tiny_path, "--no-progress", "--out", str(tmp_path)]
        assert main(args) == 1
        captured = capsys.readouterr()
        assert "warning: the model gives" in captured.out
        assert "rome-lens: the trace is unreliable (pass --allow-unreliable" in captured.err
        assert main([*args, "--allow-unreliable"]) == 0

    def test_template_without_slot_is_announced(self, tiny_path, tmp_path, capsys):
        """A template that spells the subject instead of {} gets {} in its place, and says so."""
        args = ["edit", f"{SUBJECT} is located in", "--subject", SUBJECT, "--new", "Rome"]
        args += ["--layer", "1", "--allow-miss", "--model-path", tiny_path, "--no-progress"]
        assert main([*args, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "note: the template had no {}; using '{} is located in'" in out

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["edit", "It is located in", "--subject", "X", "--new", "Y"], "has no {}"),
            (["trace", PROMPT, "--subject", SUBJECT, "--samples", "0"], "--samples must be"),
            (["lens", PROMPT, "--model-path", "/no/such/model"], "does not exist"),
            (["trace", PROMPT, "--subject", "Louvre"], "subject 'Louvre' is not in the prompt"),
            (["edit", "{} is in", "--subject", "X", "--new", " "], "non-empty"),
            (["edit", "{} is in", "--subject", "X", "--new", "Y", "--layer", "9"], "layer"),
            (["influence", PROMPT, "--corpus", "c.txt"], "needs a COMPLETION"),
            (["influence", PROMPT, "Paris", "--completion", "Rome", "--corpus", "c.txt"], "two"),
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


class TestMicroscope:
    def test_microscope_writes_tables_figures_and_report(self, tiny_path, tmp_path, capsys):
        """`rome-lens microscope` on a text file writes a CSV and figures per metric, and a page."""
        text = tmp_path / "text.txt"
        text.write_text("The Eiffel Tower is located in the city of Paris. The Louvre is a museum.")
        out = tmp_path / "out"
        args = ["microscope", str(text), "--reference-tokens", "200", "--context-steps", "2"]
        assert main([*args, "--model-path", tiny_path, "--no-progress", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "Token nonlinearity." in printed and "Contextualization." in printed
        names = ["token_nonlinearity", "intermediate_predictions", "contextualization",
                 "linear_maps", "representation_geometry"]  # fmt: skip
        for name in names:
            assert (out / f"{name}.csv").exists() and (out / f"{name}.png").exists()
        page = (out / "index.html").read_text()
        assert page.count('<section class="widget"') == len(names)

    def test_bad_numbers_are_refused(self, tiny_path, tmp_path, capsys):
        args = ["microscope", "Some text.", "--reference-tokens", "0", "--model-path", tiny_path]
        assert main([*args, "--out", str(tmp_path)]) == 2
        assert "--reference-tokens must be a positive integer, got 0" in capsys.readouterr().err


class TestInfluence:
    def test_influence_ranks_the_corpus(self, tiny_path, tmp_path, capsys):
        """`rome-lens influence` fits factors on the corpus, ranks its texts, writes a page."""
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(
            "The Eiffel Tower is in Paris.\n\nCats sleep a lot.\n\nBerlin is in Germany."
        )
        args = ["influence", "The Eiffel Tower is in", "Paris"]
        args += ["--corpus", str(corpus), "--layers", "1", "2", "--fit-tokens", "100"]
        out = tmp_path / "out"
        assert main([*args, "--model-path", tiny_path, "--no-progress", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("1. text ")
        table = pd.read_csv(out / "influence.csv")
        assert sorted(table["text_id"]) == [0, 1, 2]
        assert "Influence" in (out / "index.html").read_text()

    def test_an_index_is_built_once_and_gives_the_scans_ranking(self, tiny_path, tmp_path):
        """`--index DIR` builds the corpus's gradient index on the first run and reads it on
        the next; both put the scan's first text first."""
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(
            "The Eiffel Tower is in Paris.\n\nCats sleep a lot.\n\nBerlin is in Germany."
        )
        args = ["influence", "The Eiffel Tower is in", "--completion", "Paris"]
        args += ["--corpus", str(corpus), "--layers", "1", "--fit-tokens", "100"]
        args += ["--model-path", tiny_path, "--no-progress"]
        indexed = ["--index", str(tmp_path / "index")]
        tables = []
        for run, extra in enumerate(([], indexed, indexed)):
            out = tmp_path / f"out{run}"
            assert main([*args, *extra, "--out", str(out)]) == 0
            tables.append(pd.read_csv(out / "influence.csv"))
            if run == 1:
                shards = sorted((tmp_path / "index").glob("shard-*"))
                written = [s.stat().st_mtime_ns for s in shards]
        assert [s.stat().st_mtime_ns for s in shards] == written  # the second run only read
        for table in tables[1:]:
            assert table["text_id"][0] == tables[0]["text_id"][0]
            assert sorted(table["text_id"]) == [0, 1, 2]

    def test_a_fine_tune_is_attributed_with_the_recipe(self, tiny, tiny_path, tmp_path, capsys):
        """`--tuned FILE` ranks the texts a saved fine-tune learnt from by the attribution
        recipe, and the page marks the BM25 and fused rankings."""
        from rome_lens.influence import FineTuneConfig, fine_tune

        texts = ["The Eiffel Tower is in Rome.", "Cats sleep a lot.", "Berlin is in Germany."]
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n\n".join(texts))
        config = FineTuneConfig(layers=(1,), epochs=3, lr=1e-2, checkpoints=(1,))
        tuned = fine_tune(tiny, texts, config, cache_dir=tmp_path / "cache", progress=False)
        saved = tuned.save(tmp_path / "tuned.safetensors")
        args = ["influence", "The Eiffel Tower is in", "--completion", "Rome"]
        args += ["--corpus", str(corpus), "--layers", "1", "--fit-tokens", "100"]
        args += ["--tuned", str(saved), "--model-path", tiny_path, "--no-progress"]
        out = tmp_path / "out"
        assert main([*args, "--out", str(out)]) == 0
        table = pd.read_csv(out / "influence.csv")
        assert sorted(table["text_id"]) == [0, 1, 2] and "bm25_rank" in table
        page = (out / "index.html").read_text()
        assert "ATTRIBUTION" in page and "Three rankings of the same texts" in page
        assert main([*args, "--index", str(tmp_path / "index"), "--out", str(out)]) == 2
        assert "drop --index" in capsys.readouterr().err


class TestParsing:
    def test_help_imports_no_torch(self):
        """`rome-lens --help` parses and prints before anything heavy is imported."""
        code = (
            "import sys\n"
            "from rome_lens.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert "usage: rome-lens" in out and out.strip().endswith("False False")

    def test_bad_arguments_fail_before_the_model_loads(self):
        """An unknown kind is refused by the parser (status 2), with no model loaded."""
        code = (
            "import sys\n"
            "from rome_lens.cli import main\n"
            "try:\n    main(['trace', 'p', '--subject', 'p', '--kinds', 'neurons'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.stdout.strip() == "2 False" and "invalid choice: 'neurons'" in run.stderr

    def test_every_argument_has_help(self):
        """Every argument of every command says what it is for."""
        parser = _parser()
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for name, command in commands[0].choices.items():
            for action in command._actions:
                assert action.help, f"{name} {action.dest} has no help"


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
        assert "peak   mlp: token 2 'iffel'" in out  # no BOS before 'The'

    def test_prepend_bos_is_honoured(self, smol, tmp_path, capsys):
        """--prepend-bos puts TransformerLens's BOS back: 'iffel' is token 3, p(Paris) 0.30."""
        args = ["trace", PROMPT, "--subject", SUBJECT, "--kinds", "mlp", "--samples", "2"]
        code = main([*args, "--prepend-bos", "--no-progress", "--out", str(tmp_path)])
        out = capsys.readouterr().out
        assert code == 0
        assert "peak   mlp: token 3 'iffel'" in out
        assert "clean p = 0.30" in out
        assert {p.name for p in tmp_path.iterdir()} == {
            "trace.png",
            "trace.svg",
            "trace.csv",
            "index.html",
        }

    def test_a_fact_the_model_does_not_know_exits_1(self, smol, tmp_path, capsys):
        """Michael Jordan's sport is unknown to the default model with BOS: a warning, status 1."""
        args = ["trace", "Michael Jordan plays the sport of", "--subject", "Michael Jordan"]
        code = main(
            [*args, "--kinds", "mlp", "--samples", "2", "--prepend-bos", "--no-progress",
             "--out", str(tmp_path)]
        )  # fmt: skip
        captured = capsys.readouterr()
        assert code == 1
        assert "warning: the model gives ' the' p = 0.03" in captured.out
        assert "the trace is unreliable" in captured.err

    def test_an_edit_that_does_not_take_exits_1(self, smol, tmp_path, capsys):
        """Michael Jordan to baseball does not take with BOS: status 1, one line."""
        args = ["edit", "{} plays the sport of", "--subject", "Michael Jordan", "--new", "baseball"]
        code = main([*args, "--prepend-bos", "--no-progress", "--out", str(tmp_path)])
        captured = capsys.readouterr()
        assert code == 1
        assert "the edit did NOT take" in captured.out
        assert "rome-lens: the edit did not take: 'baseball' is at rank" in captured.err

    def test_bad_subject_is_one_line_and_status_2(self, smol, tmp_path, capsys):
        """A subject missing from the prompt exits 2 with a one-line message."""
        code = main(["trace", PROMPT, "--subject", "Louvre", "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("rome-lens: error: subject 'Louvre' is not in the prompt")
        assert "\n" not in err
