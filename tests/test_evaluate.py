"""CounterFact evaluation: loaders, metrics against hand computations, runners."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rome_lens.core.generation import greedy_continuations
from rome_lens.core.predict import target_nll
from rome_lens.core.tokens import prompt_tokens
from rome_lens.editing import (
    EditRequest,
    MEMITHyperParams,
    ROMEHyperParams,
    edited,
    memit_edit,
    rome_edit,
)
from rome_lens.evaluation import (
    CounterFactCase,
    Evaluation,
    case_scores,
    evaluate_edits,
    generation_scores,
    load_counterfact,
    load_counterfact_sample,
    n_gram_entropy,
    sequential_edits,
    summarize,
    without_conflicts,
)
from rome_lens.evaluation.counterfact import SAMPLE_FILE

ROME_RECORD = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "{} is located in the city of",
        "relation_id": "P131",
        "target_new": {"str": "Rome", "id": "Q220"},
        "target_true": {"str": "Paris", "id": "Q90"},
        "subject": "The Eiffel Tower",
    },
    "paraphrase_prompts": ["Tourists visit The Eiffel Tower in", "The Eiffel Tower stands in"],
    "neighborhood_prompts": ["The Louvre is in the city of", "Notre Dame is in"],
    "attribute_prompts": ["The Colosseum is in"],
    "generation_prompts": ["The Eiffel Tower is", "Where is The Eiffel Tower?"],
}
FAST = ROMEHyperParams(context_lengths=((3, 2),), v_steps=3, mom2_adjustment=False)


@pytest.fixture
def rome_file(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([ROME_RECORD, {**ROME_RECORD, "case_id": 1}]))
    return path


class TestLoaders:
    def test_rome_format(self, rome_file):
        """ROME's counterfact.json fields map onto a case."""
        (case, _) = load_counterfact(rome_file)
        assert case.request == EditRequest(
            "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"
        )
        assert case.paraphrase_prompts == ROME_RECORD["paraphrase_prompts"]
        assert case.neighborhood_prompts == ROME_RECORD["neighborhood_prompts"]
        assert case.neighborhood_answer == "Paris"
        assert case.generation_prompts == ROME_RECORD["generation_prompts"]

    def test_easyedit_format(self):
        """EasyEdit's format (the shipped sample) loads: {} for the subject, one neighbour."""
        cases = load_counterfact_sample(limit=5)
        path = Path(__file__).parents[1] / "rome_lens" / "evaluation" / "data" / SAMPLE_FILE
        raw = json.loads(path.read_text())[:5]
        assert [c.case_id for c in cases] == [r["case_id"] for r in raw]
        for case, record in zip(cases, raw, strict=True):
            assert case.request.text == record["prompt"]
            assert case.request.target_true == record["ground_truth"]
            assert case.neighborhood_prompts == [record["locality_prompt"]]
            assert case.neighborhood_answer == record["locality_ground_truth"]

    def test_limit(self, rome_file):
        assert len(load_counterfact(rome_file, limit=1)) == 1

    def test_bad_files(self, tmp_path):
        """Unreadable JSON and records without fields raise errors naming the problem."""
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        with pytest.raises(ValueError, match="cannot read CounterFact"):
            load_counterfact(bad)
        bad.write_text(json.dumps([{"case_id": 3, "prompt": "x"}]))
        with pytest.raises(ValueError, match="case 3 .* lacks field"):
            load_counterfact(bad)

    def test_sample_has_three_hundred_cases(self):
        """The shipped sample holds 300 cases in file order, and a limit reads the first ones."""
        path = Path(__file__).parents[1] / "rome_lens" / "evaluation" / "data" / SAMPLE_FILE
        ids = [record["case_id"] for record in json.loads(path.read_text())]
        assert [c.case_id for c in load_counterfact_sample()] == ids and len(ids) == 300
        assert [c.case_id for c in load_counterfact_sample(limit=3)] == ids[:3]

    def test_subject_missing_from_prompt(self, tmp_path):
        """A case whose prompt does not spell its subject is named in the error."""
        case = {
            "case_id": 7,
            "prompt": "The tower is in",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
            "ground_truth": "Paris",
            "rephrase_prompt": "x",
            "locality_prompt": "y",
            "locality_ground_truth": "Paris",
        }
        path = tmp_path / "cf.json"
        path.write_text(json.dumps([case]))
        with pytest.raises(ValueError, match="'The Eiffel Tower' is not in prompt"):
            load_counterfact(path)

    def test_without_conflicts_keeps_the_first_target(self, rome_file):
        """A later case rewriting the same subject and prompt to another target is dropped."""
        first, same = load_counterfact(rome_file)
        other = dataclasses.replace(
            first, case_id=2, request=dataclasses.replace(first.request, target_new="Berlin")
        )
        kept = without_conflicts([first, other, same])
        assert [c.case_id for c in kept] == [0, 1]


class TestMetrics:
    def test_scores_follow_target_probabilities(self, tiny, rome_file):
        """Each score compares the whole targets' exp(-mean NLL) as ROME defines them."""
        (case, _) = load_counterfact(rome_file)
        row = case_scores(tiny, [case]).iloc[0]
        req = case.request

        def p(prompt: str, target: str) -> float:
            return math.exp(-target_nll(tiny, [prompt], [target]).item())

        gap = p(req.text, "Rome") - p(req.text, "Paris")
        assert row["efficacy_score"] == float(gap > 0)
        assert row["efficacy_magnitude"] == pytest.approx(gap, abs=1e-6)
        gaps = [p(q, "Paris") - p(q, "Rome") for q in case.neighborhood_prompts]
        assert row["neighborhood_score"] == np.mean([g > 0 for g in gaps])
        assert row["neighborhood_magnitude"] == pytest.approx(np.mean(gaps), abs=1e-6)

    def test_n_gram_entropy_by_hand(self):
        """(2/3·H2 + 4/3·H3)/2 in bits: four distinct bigrams and three distinct trigrams."""
        h2, h3 = math.log2(4), math.log2(3)
        assert n_gram_entropy("a b c d e") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
        assert n_gram_entropy("word") == 0.0

    def test_summary_is_percent_and_harmonic(self):
        """ES/PS/NS are percentages and S their harmonic mean."""
        df = pd.DataFrame(
            {
                "method": ["rome", "rome"],
                "edit_seconds": [1.0, 3.0],
                **{
                    f"{stage}_{m}_{kind}": [1.0, v]
                    for stage in ("pre", "post")
                    for m, v in (("efficacy", 1.0), ("paraphrase", 0.0), ("neighborhood", 0.5))
                    for kind in ("score", "magnitude")
                },
            }
        )
        row = summarize(df).iloc[0]
        assert (row["post_ES"], row["post_PS"], row["post_NS"]) == (100, 50, 75)
        assert row["S"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 75))
        assert row["median_edit_seconds"] == 2.0


def greedy_by_hand(model, prompt: str, n: int) -> list[int]:
    """The reference: one prompt alone, the whole sequence rerun, the arg-max appended n times."""
    tokens = prompt_tokens(model, prompt)[0].tolist()
    new = []
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([tokens + new]), return_type="logits")
        new.append(int(logits[0, -1].argmax()))
    return new


class TestGenerationSuccess:
    def test_greedy_decoding_matches_one_prompt_at_a_time(self, tiny):
        """Prompts of other lengths and budgets, batched and padded, write what each would alone."""
        prompts = ["The Eiffel Tower is located in", "Paris is", "A cat sat on the mat and"]
        budgets = [4, 2, 0]
        texts = greedy_continuations(tiny, prompts, budgets, batch_size=2)
        for prompt, n, text in zip(prompts, budgets, texts, strict=True):
            alone = torch.tensor(greedy_by_hand(tiny, prompt, n), dtype=torch.long)
            assert text == tiny.to_string(alone)

    def test_a_case_scores_what_greedy_decoding_writes(self, tiny, rome_file):
        """An answer the model writes scores 1, one it does not 0 (neighbours: the true one)."""
        (case, _) = load_counterfact(rome_file)
        written = greedy_continuations(tiny, [case.request.text], 3)[0]
        word = written.split()[0].strip(".,;:!?")
        assert word, f"the tiny model wrote no word: {written!r}"
        wrote = dataclasses.replace(
            case,
            request=dataclasses.replace(case.request, target_new=word),
            paraphrase_prompts=[case.request.text, "zzz qqq"],
            neighborhood_prompts=[case.request.text],
            neighborhood_answer="Atlantis",
        )
        row = generation_scores(tiny, [wrote], extra_tokens=2).iloc[0]
        assert row["generation_efficacy"] == 1.0
        assert row["generation_paraphrase"] in (0.5, 1.0)  # the nonsense prompt may write it too
        assert row["generation_neighborhood"] == 0.0

    def test_an_answer_must_be_a_whole_word(self):
        """'Rome' is written in 'the city of Rome.', not in 'Romeo'."""
        from rome_lens.evaluation.metrics import _writes

        assert _writes(" the city of Rome.", " Rome")
        assert not _writes(" Romeo and Juliet", "Rome")
        assert _writes(" New York City", "New York")

    def test_runners_report_it_and_can_skip_it(self, tiny, rome_file):
        """evaluate_edits scores generation success pre and post (summary: gen_ES), or skips it."""
        cases = load_counterfact(rome_file)
        result = evaluate_edits(tiny, cases, "none", fluency=False, progress=False)
        df = result.to_dataframe()
        expected = generation_scores(tiny, cases)
        for metric in ("efficacy", "paraphrase", "neighborhood"):
            column = f"generation_{metric}"
            assert df[f"pre_{column}"].tolist() == expected[column].tolist()
        assert "post_gen_ES" in result.summary()
        bare = evaluate_edits(tiny, cases, "none", fluency=False, generation=False, progress=False)
        assert not any("generation" in c for c in bare.to_dataframe().columns)

    def test_bad_extra_tokens(self, tiny, rome_file):
        """A negative number of extra tokens is refused, naming it."""
        with pytest.raises(ValueError, match="extra_tokens must be >= 0, got -1"):
            generation_scores(tiny, load_counterfact(rome_file), extra_tokens=-1)


class TestRunners:
    def test_none_changes_nothing(self, tiny, rome_file):
        """method='none' reports post = pre; fluency=1 measures entropy on the first case only."""
        result = evaluate_edits(
            tiny,
            load_counterfact(rome_file),
            "none",
            fluency=1,
            generation_tokens=5,
            progress=False,
        )
        df = result.to_dataframe()
        for metric in ("efficacy_score", "paraphrase_magnitude", "neighborhood_score"):
            assert (df[f"pre_{metric}"] == df[f"post_{metric}"]).all()
        assert not math.isnan(df["pre_entropy"][0]) and math.isnan(df["pre_entropy"][1])

    def test_rome_scores_are_those_of_each_edit(self, tiny, rome_file):
        """Each case's post scores are case_scores with that case's ROME edit applied."""
        before = {n: p.clone() for n, p in tiny.named_parameters()}
        cases = load_counterfact(rome_file)
        df = evaluate_edits(
            tiny, cases, "rome", layer=1, hparams=FAST, fluency=False, progress=False
        ).to_dataframe()
        assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())
        for i, case in enumerate(cases):
            edit = rome_edit(tiny, case.request, layer=1, hparams=FAST, progress=False)
            with edited(tiny, edit):
                expected = case_scores(tiny, [case]).iloc[0]
            for column in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_score"):
                assert df[f"post_{column}"][i] == pytest.approx(expected[column], abs=1e-6)
            assert bool(df["took"][i]) == edit.took
            assert df["edit_seconds"][i] > 0

    def test_memit_scores_the_whole_batch(self, tiny, rome_file, tmp_path, monkeypatch):
        """MEMIT writes every case in one batch and scores each with the batch applied."""
        monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path))
        before = {n: p.clone() for n, p in tiny.named_parameters()}
        cases = load_counterfact(rome_file)
        hparams = MEMITHyperParams(context_lengths=(), v_steps=4, mom2_n_tokens=500)
        df = evaluate_edits(
            tiny,
            cases,
            "memit",
            layers=[0, 1],
            hparams=hparams,
            fluency=1,
            generation_tokens=5,
            progress=False,
        ).to_dataframe()
        assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())
        edit = memit_edit(
            tiny, [c.request for c in cases], layers=[0, 1], hparams=hparams, progress=False
        )
        with edited(tiny, edit):
            expected = case_scores(tiny, cases)
        assert (df["method"] == "memit").all() and len(df) == 2
        assert df["post_efficacy_magnitude"].tolist() == pytest.approx(
            expected["efficacy_magnitude"].tolist(), abs=1e-6
        )
        assert df["edit_seconds"].nunique() == 1 and df["edit_seconds"][0] > 0
        assert not math.isnan(df["post_entropy"][0]) and math.isnan(df["post_entropy"][1])

    def test_wrong_hyperparameters_and_method(self, tiny, rome_file):
        """A method's settings of another type raise TypeError; an unknown method ValueError."""
        cases = load_counterfact(rome_file)
        with pytest.raises(TypeError, match="hparams must be FTHyperParams, got ROMEHyperParams"):
            evaluate_edits(tiny, cases, "ft", hparams=FAST, progress=False)
        with pytest.raises(ValueError, match="method must be"):
            evaluate_edits(tiny, cases, "memo", progress=False)  # type: ignore[arg-type]

    def test_sequential_edits_curve_and_revert(self, tiny, rome_file):
        """The curve at each checkpoint is case_scores with the edits so far; all are reverted."""
        before = {n: p.clone() for n, p in tiny.named_parameters()}
        cases: list[CounterFactCase] = load_counterfact(rome_file)
        curve = sequential_edits(
            tiny, cases, checkpoints=(1, 2), layer=1, hparams=FAST, progress=False
        ).to_dataframe()
        assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())
        assert list(curve["edits"]) == [1, 2] and curve["finite"].all()
        first = rome_edit(tiny, cases[0].request, layer=1, hparams=FAST, progress=False)
        with edited(tiny, first):
            second = rome_edit(tiny, cases[1].request, layer=1, hparams=FAST, progress=False)
            with edited(tiny, second):
                expected = case_scores(tiny, cases)
        assert curve["ES"].iloc[-1] == pytest.approx(100 * expected["efficacy_score"].mean())
        assert curve["NS"].iloc[-1] == pytest.approx(100 * expected["neighborhood_score"].mean())


class TestEvaluationResult:
    def test_summary_and_round_trip(self, tiny, rome_file, tmp_path):
        """An evaluation summarises like summarize() and saves and loads its rows."""
        result = evaluate_edits(
            tiny, load_counterfact(rome_file), "none", fluency=False, progress=False
        )
        assert result.summary().equals(summarize(result.to_dataframe()))
        loaded = Evaluation.load(result.save(tmp_path / "eval.st"))
        assert loaded.to_dataframe().equals(result.to_dataframe())
        both = Evaluation.concat([result, loaded])
        assert len(both.rows) == 2 * len(result.rows)
