"""The logit lens, the widgets, the offline pages and saved models."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import rome_lens
from rome_lens import EditRequest, ROMEHyperParams, rome_edit, trace_fact
from rome_lens.lens import logit_lens
from rome_lens.models import load_model_path, save_model
from rome_lens.plots import plot_logit_lens
from rome_lens.viz import (
    Widget,
    edit_widget,
    evaluation_widget,
    logit_lens_widget,
    page,
    report,
    trace_widget,
)
from tests.conftest import hooks_left

PROMPT = "The Eiffel Tower is located in"
SUBJECT = "The Eiffel Tower"
BUNDLE_MARK = "var CircuitsVis="


@pytest.fixture(scope="module")
def trace(tiny):
    return trace_fact(tiny, PROMPT, SUBJECT, samples=2, progress=False)


@pytest.fixture(scope="module")
def lens(tiny):
    return logit_lens(tiny, PROMPT, targets=["Paris", "Rome"], k=5)


@pytest.fixture(scope="module")
def edit(tiny):
    """A quick edit (C = I, no context prefixes) of the tiny model."""
    hparams = ROMEHyperParams(mom2_adjustment=False, context_lengths=())
    request = EditRequest("{} is located in", SUBJECT, "Rome")
    return rome_edit(tiny, request, hparams=hparams, progress=False)


class TestLogitLens:
    def test_last_layer_is_the_models_prediction(self, tiny, lens):
        """The last layer's lens equals the model's own log-probabilities."""
        log_probs = tiny(tiny.to_tokens(PROMPT))[0].log_softmax(-1)
        top = log_probs.topk(5)
        assert torch.equal(lens.top_ids[-1], top.indices)
        torch.testing.assert_close(lens.top_log_probs[-1], top.values)

    def test_each_layer_reads_its_residual_stream(self, tiny, lens):
        """Layer l's lens is ln_final + unembed of blocks.{l}.hook_resid_post."""
        _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
        for layer in range(tiny.cfg.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_post"]
            expected = tiny.unembed(tiny.ln_final(resid))[0].log_softmax(-1)
            torch.testing.assert_close(lens.top_log_probs[layer], expected.topk(5).values)

    def test_ranks_match_a_brute_force_count(self, tiny, lens):
        """Target ranks and next-token ranks count the tokens scored strictly higher."""
        _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
        tokens = tiny.to_tokens(PROMPT)[0]
        for layer in range(tiny.cfg.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_post"]
            log_probs = tiny.unembed(tiny.ln_final(resid))[0].log_softmax(-1)
            for t, token in enumerate(lens.target_ids):
                rank = int((log_probs[-1] > log_probs[-1, token]).sum())
                assert int(lens.target_ranks[layer, t]) == rank
            pos = 2
            following = int(tokens[pos + 1])
            assert int(lens.next_ranks[layer, pos]) == int(
                (log_probs[pos] > log_probs[pos, following]).sum()
            )

    def test_default_target_is_the_top_prediction(self, tiny):
        """Without targets the lens follows the model's top-1 token, which ends at rank 0."""
        lens = logit_lens(tiny, PROMPT)
        assert lens.target_ids == [int(lens.top_ids[-1, -1, 0])]
        assert int(lens.target_ranks[-1, 0]) == 0

    def test_dataframe_has_a_row_per_layer_and_target(self, tiny, lens):
        """to_dataframe: layers × targets rows; probabilities match the tensors."""
        df = lens.to_dataframe()
        assert len(df) == tiny.cfg.n_layers * 2
        assert df.loc[3, "prob"] == pytest.approx(float(lens.target_log_probs[1, 1].exp()))
        assert len(lens.top_dataframe()) == tiny.cfg.n_layers * len(lens.str_tokens) * 5

    def test_bad_input(self, tiny):
        """A bad k, a bare string of targets, and an empty target are named."""
        with pytest.raises(ValueError, match="k must be between 1 and d_vocab"):
            logit_lens(tiny, PROMPT, k=0)
        with pytest.raises(ValueError, match="got the string 'Paris'"):
            logit_lens(tiny, PROMPT, targets="Paris")
        with pytest.raises(ValueError, match="target must be a non-empty string"):
            logit_lens(tiny, PROMPT, targets=[" "])
        assert hooks_left(tiny) == 0


class TestWidgets:
    def test_trace_heatmap_has_a_cell_per_token_and_layer(self, tiny, trace):
        """Each kind's SVG holds one cell per (token, layer) carrying that score."""
        html = trace_widget(trace).html()
        cells = re.findall(r'data-token="(\d+)" data-layer="(\d+)" data-score="([^"]+)"', html)
        assert len(cells) == len(trace.kinds) * len(trace.str_tokens) * tiny.cfg.n_layers
        token, layer, score = cells[-1]
        expected = float(trace.scores[-1, int(token), int(layer)])
        assert float(score) == pytest.approx(expected, rel=1e-5)

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
        assert html.count('data-component="ColoredTokensMulti"') == len(trace.kinds)

    def test_page_inlines_the_bundle_once(self, trace, lens, tmp_path):
        """A page of several circuitsvis widgets holds the bundle exactly once."""
        path = report(tmp_path / "r", trace, logit_lens_widget(lens, layers=[0, 2]))
        text = path.read_text()
        assert path.suffix == ".html"
        assert text.count(BUNDLE_MARK) == 1
        assert text.count('class="circuitsvis"') == len(trace.kinds) + 2
        assert "<script src=" not in text

    def test_lens_widget_lists_every_layer_and_target(self, tiny, lens):
        """The lens widget's table has a row per layer; each TokenLogProbs ends on the target."""
        widget = logit_lens_widget(lens, layers=[1])
        html = widget.html(bundle=False)
        assert html.count('class="grid"') == 1
        assert html.count("TokenLogProbs") >= 1
        assert html.count("<tr><td>") == tiny.cfg.n_layers  # the target table
        assert widget.to_dataframe().equals(lens.to_dataframe())

    def test_lens_widget_rejects_missing_layers(self, lens):
        """A layer the lens does not have is named."""
        with pytest.raises(ValueError, match=r"layers \[7\] are out of range"):
            logit_lens_widget(lens, layers=[0, 7])

    def test_edit_widget_compares_and_reverts(self, tiny, edit):
        """Before/after rows come from the unedited and edited model; the weights are restored."""
        original = tiny.blocks[edit.layer].mlp.W_out.clone()
        widget = edit_widget(edit, tiny, {"edit": PROMPT, "neighbour": "The Louvre is in"}, k=3)
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
        table = edit_widget(edit, tiny, k=2).to_dataframe()
        assert table["prompt"].unique().tolist() == [PROMPT]
        with pytest.raises(ValueError, match="at least one prompt"):
            edit_widget(edit, tiny, [])

    def test_evaluation_widget_summarises(self, tiny):
        """The evaluation widget shows the summary of an evaluate_edits table."""
        results = pd.DataFrame(
            {
                "method": ["rome", "rome"],
                "edit_seconds": [1.0, 2.0],
                **{
                    f"{stage}_{m}_{kind}": [1.0, 0.0]
                    for stage in ("pre", "post")
                    for m in ("efficacy", "paraphrase", "neighborhood")
                    for kind in ("score", "magnitude")
                },
            }
        )
        html = evaluation_widget(results).html()
        assert "Summary" in html and html.count("<table") == 2
        assert "50.0" in html  # ES of 1 and 0, in percent

    def test_report_rejects_unknown_items(self, tmp_path):
        """report() names what it cannot show."""
        with pytest.raises(TypeError, match="got <class 'int'>"):
            report(tmp_path / "r.html", 3)

    def test_plain_widget_page(self):
        """A widget without circuitsvis parts needs no bundle."""
        assert BUNDLE_MARK not in page([Widget("x", "<p>hi</p>")])


class TestLensPlot:
    def test_plot_saves_png_and_svg(self, lens, tmp_path):
        """plot_logit_lens draws one line per target (two with before) and saves both formats."""
        fig = plot_logit_lens(lens, before=lens)
        assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 4
        lens.plot(tmp_path / "lens.svg")
        lens.plot(tmp_path / "lens.png")
        assert "<svg" in (tmp_path / "lens.svg").read_text()
        assert (tmp_path / "lens.png").read_bytes()[:4] == b"\x89PNG"


class TestSavedModels:
    def test_round_trip(self, tiny, tmp_path):
        """save_model then load_model_path gives the same logits and tokenizer."""
        save_model(tiny, tmp_path / "m")
        loaded = load_model_path(tmp_path / "m")
        tokens = tiny.to_tokens(PROMPT)
        assert torch.equal(loaded(tokens), tiny(tokens))
        assert loaded.to_str_tokens(PROMPT) == tiny.to_str_tokens(PROMPT)

    def test_bad_paths(self, tmp_path):
        """A missing path, a folder without a model, and a corrupt model are named."""
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model_path(tmp_path / "missing")
        with pytest.raises(ValueError, match="must be a .gguf file or a folder"):
            load_model_path(tmp_path)
        save_model(rome_lens.tiny_model(), tmp_path / "m")
        weights = tmp_path / "m" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
        with pytest.raises(ValueError, match="is not a readable saved model"):
            load_model_path(tmp_path / "m")
