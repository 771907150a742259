"""CounterFact evaluation: did the edit take, generalise, and stay local?

CounterFact (Meng et al. 2022) pairs each counterfactual edit with prompts that
test it. For every case, before and after the edit, this module measures,
with ROME's per-token mean NLL of the whole target (``p = exp(-nll)``):

* **efficacy**: on the edit prompt, score = P(new) > P(true), magnitude =
  P(new) − P(true);
* **paraphrase**: the same on rewordings of the prompt (generalisation);
* **neighbourhood**: on prompts about *other* subjects with the same true
  answer, score = P(true) > P(new), magnitude = P(true) − P(new) (specificity);
* **generation entropy**: ROME's fluency, the weighted bigram/trigram entropy
  of seeded generations (top-5 sampling) from the case's generation prompts.

Scores are averaged over cases and reported in percent; the overall score S
is the harmonic mean of ES, PS and NS. :func:`evaluate_edits` runs an editing
method over many cases, reverting each edit before the next, and
:func:`summarize` turns its table into one row per method.

Two file formats load with :func:`load_counterfact`: ROME's ``counterfact.json``
(``requested_rewrite``, ``paraphrase_prompts``, ``neighborhood_prompts``,
``generation_prompts``) and EasyEdit's (``prompt``, ``subject``,
``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
``locality_ground_truth``). EasyEdit cases have one paraphrase and one
neighbour; their generation prompts are the edit prompt and the paraphrase.

>>> from rome_lens.evaluate import n_gram_entropy
>>> round(n_gram_entropy("the cat sat on the mat and the dog sat on the rug"), 3)
3.269
>>> n_gram_entropy("la la la la la la")  # repetition, the failure mode it catches
0.0
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rome_lens.finetune import FTHyperParams, ft_edit
from rome_lens.generation import sample_text
from rome_lens.memit import MEMITHyperParams, memit_edit
from rome_lens.patches import WeightEdit, edited
from rome_lens.predict import target_nll
from rome_lens.rome import EditRequest, ROMEHyperParams, rome_edit
from rome_lens.stats import KeyStats

__all__ = [
    "CounterFactCase",
    "case_scores",
    "evaluate_edits",
    "generation_entropy",
    "load_counterfact",
    "n_gram_entropy",
    "overall_score",
    "sequential_edits",
    "summarize",
    "without_conflicts",
]

Method = Literal["rome", "ft", "memit", "none"]
_METRICS = ("efficacy", "paraphrase", "neighborhood")


@dataclass
class CounterFactCase:
    """One CounterFact record: an edit and the prompts that test it."""

    case_id: int
    request: EditRequest  # with target_true set
    paraphrase_prompts: list[str]  # same fact, other words: should follow the edit
    neighborhood_prompts: list[str]  # other subjects: should keep their answer
    neighborhood_answer: str  # the neighbours' (true) answer
    generation_prompts: list[str]  # for the fluency measure


def load_counterfact(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> list[CounterFactCase]:
    """Read ROME's or EasyEdit's CounterFact JSON (the format is detected per record)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read CounterFact cases from {path}: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} should hold a JSON list of cases, got {type(records).__name__}")
    return [_parse_case(record, path) for record in records[:limit]]


def without_conflicts(cases: Sequence[CounterFactCase]) -> list[CounterFactCase]:
    """The cases in order, less each that gives an earlier case's subject and prompt another target.

    CounterFact has many-valued relations ("{} is a twin city of"), so two of
    its cases can rewrite one fact two ways; :func:`~rome_lens.memit.memit_edit`
    refuses such a batch, so draw batches from this.
    """
    targets: dict[tuple[str, str], str] = {}
    kept = []
    for case in cases:
        request = case.request
        target = targets.setdefault((request.prompt, request.subject), request.target_new.strip())
        if target == request.target_new.strip():
            kept.append(case)
    return kept


def _parse_case(record: dict[str, Any], path: Path) -> CounterFactCase:
    try:
        if "requested_rewrite" in record:
            return _rome_case(record)
        return _easyedit_case(record)
    except (KeyError, TypeError) as err:
        case = record.get("case_id", "?") if isinstance(record, dict) else "?"
        raise ValueError(f"case {case} of {path} lacks field {err}") from err


def _rome_case(record: dict[str, Any]) -> CounterFactCase:
    rewrite = record["requested_rewrite"]
    request = EditRequest(
        rewrite["prompt"],
        rewrite["subject"],
        rewrite["target_new"]["str"],
        rewrite["target_true"]["str"],
    )
    return CounterFactCase(
        case_id=int(record["case_id"]),
        request=request,
        paraphrase_prompts=list(record["paraphrase_prompts"]),
        neighborhood_prompts=list(record["neighborhood_prompts"]),
        neighborhood_answer=rewrite["target_true"]["str"],
        generation_prompts=list(record.get("generation_prompts", [])),
    )


def _easyedit_case(record: dict[str, Any]) -> CounterFactCase:
    prompt, subject = record["prompt"], record["subject"]
    if subject not in prompt:
        raise ValueError(
            f"case {record.get('case_id')}: subject {subject!r} is not in prompt {prompt!r}"
        )
    template = prompt.replace(subject, "{}", 1)
    request = EditRequest(template, subject, record["target_new"], record["ground_truth"])
    return CounterFactCase(
        case_id=int(record["case_id"]),
        request=request,
        paraphrase_prompts=[record["rephrase_prompt"]],
        neighborhood_prompts=[record["locality_prompt"]],
        neighborhood_answer=record["locality_ground_truth"],
        generation_prompts=[prompt, record["rephrase_prompt"]],
    )


# --------------------------------------------------------------------------- metrics


def case_scores(
    model: HookedTransformer, cases: Sequence[CounterFactCase], *, batch_size: int = 64
) -> pd.DataFrame:
    """Efficacy, paraphrase and neighbourhood scores and magnitudes of each case, as is."""
    prompts: list[str] = []
    targets: list[str] = []
    spans: list[dict[str, slice]] = []
    for case in cases:
        request, case_spans = case.request, {}
        assert request.target_true is not None
        groups = {
            "efficacy": ([request.text], request.target_true),
            "paraphrase": (case.paraphrase_prompts, request.target_true),
            "neighborhood": (case.neighborhood_prompts, case.neighborhood_answer),
        }
        for metric, (metric_prompts, true) in groups.items():
            start = len(prompts)
            for prompt in metric_prompts:
                prompts += [prompt, prompt]
                targets += [request.target_new, true]
            case_spans[metric] = slice(start, len(prompts))
        spans.append(case_spans)
    probs = torch.exp(-target_nll(model, prompts, targets, batch_size=batch_size))
    rows = []
    for case, case_spans in zip(cases, spans, strict=True):
        row: dict[str, Any] = {"case_id": case.case_id}
        for metric in _METRICS:
            pair = probs[case_spans[metric]].view(-1, 2)  # columns: P(new), P(true)
            gap = pair[:, 0] - pair[:, 1]
            if metric == "neighborhood":
                gap = -gap
            row[f"{metric}_score"] = (gap > 0).double().mean().item() if len(gap) else math.nan
            row[f"{metric}_magnitude"] = gap.mean().item() if len(gap) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def n_gram_entropy(text: str) -> float:
    """ROME's fluency: (2/3 · H(bigrams) + 4/3 · H(trigrams)) / 2, in bits, over words."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    entropies = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
        counts = np.array(list(grams.values()), dtype=float)
        if counts.sum() == 0:
            entropies.append(0.0)
            continue
        freqs = counts / counts.sum()
        entropies.append(weight * float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(entropies))


def generation_entropy(
    model: HookedTransformer,
    cases: Sequence[CounterFactCase],
    *,
    n_tokens: int = 100,
    seed: int = 0,
) -> list[float]:
    """Mean n-gram entropy of each case's generations (``nan`` for cases without prompts)."""
    prompts = [p for case in cases for p in case.generation_prompts]
    texts = iter(sample_text(model, prompts, n_tokens, seed=seed, top_k=5))
    return [
        float(np.mean([n_gram_entropy(next(texts)) for _ in case.generation_prompts]))
        if case.generation_prompts
        else math.nan
        for case in cases
    ]


# --------------------------------------------------------------------------- runners


def _editor(
    method: Method,
    layer: int | None,
    hparams: object,
    stats: KeyStats | None,
) -> Callable[[HookedTransformer, EditRequest], WeightEdit] | None:
    if method == "none":
        return None
    if method == "rome":
        rome_hparams = hparams if isinstance(hparams, ROMEHyperParams) else ROMEHyperParams()
        return lambda model, request: rome_edit(
            model, request, layer=layer, hparams=rome_hparams, stats=stats, progress=False
        )
    if method == "ft":
        ft_hparams = hparams if isinstance(hparams, FTHyperParams) else FTHyperParams()
        return lambda model, request: ft_edit(
            model, request, layer=layer, hparams=ft_hparams, progress=False
        )
    raise ValueError(f"method must be 'rome', 'ft', 'memit' or 'none', got {method!r}")


def evaluate_edits(
    model: HookedTransformer,
    cases: Sequence[CounterFactCase],
    method: Method = "rome",
    *,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    hparams: ROMEHyperParams | FTHyperParams | MEMITHyperParams | None = None,
    stats: KeyStats | dict[int, KeyStats] | None = None,
    fluency: bool | int = True,
    generation_tokens: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Edit each case, scoring it before and after.

    ``"rome"`` and ``"ft"`` edit one case at a time, reverting each edit before
    the next; ``"memit"`` writes every case in one :func:`~rome_lens.memit.memit_edit`
    batch (into ``layers``) and scores all of them with the whole batch applied.
    Returns one row per case: ``pre_*`` and ``post_*`` columns for every
    metric, the edit's wall-clock ``edit_seconds`` (for MEMIT, the batch's time
    over the number of cases) and the ``method``. With ``method="none"``
    nothing is edited and ``post_*`` equals ``pre_*``. Fluency needs
    generation, the slowest part: ``fluency=n`` measures it on the first ``n``
    cases only (``nan`` elsewhere), ``False`` on none.
    """
    if not cases:
        raise ValueError("no cases to evaluate")
    if method == "memit":
        return _evaluate_batch(
            model, cases, layers, hparams, stats, fluency, generation_tokens, seed, progress
        )
    if isinstance(stats, dict):
        raise ValueError(f"statistics per layer are for method='memit'; {method!r} takes one")
    editor = _editor(method, layer, hparams, stats)
    n_fluent = len(cases) if fluency is True else int(fluency)
    pre = _scores(model, cases, n_fluent, generation_tokens, seed)
    rows = []
    for i, case in enumerate(tqdm(cases, desc=f"evaluating {method}", disable=not progress)):
        post, seconds = pre.iloc[[i]].reset_index(drop=True), 0.0
        if editor is not None:
            started = time.perf_counter()
            edit = editor(model, case.request)
            seconds = time.perf_counter() - started
            with edited(model, edit):
                post = _scores(model, [case], int(i < n_fluent), generation_tokens, seed)
        rows.append(_row(case, method, seconds, pre.iloc[i], post.iloc[0]))
    return pd.DataFrame(rows)


def _evaluate_batch(
    model: HookedTransformer,
    cases: Sequence[CounterFactCase],
    layers: Sequence[int] | None,
    hparams: object,
    stats: KeyStats | dict[int, KeyStats] | None,
    fluency: bool | int,
    generation_tokens: int,
    seed: int,
    progress: bool,
) -> pd.DataFrame:
    """MEMIT: one edit for all cases, then every case scored with it applied."""
    memit_hparams = hparams if isinstance(hparams, MEMITHyperParams) else MEMITHyperParams()
    if isinstance(stats, KeyStats):
        stats = {stats.layer: stats}
    n_fluent = len(cases) if fluency is True else int(fluency)
    pre = _scores(model, cases, n_fluent, generation_tokens, seed)
    started = time.perf_counter()
    edit = memit_edit(
        model,
        [case.request for case in cases],
        layers=layers,
        hparams=memit_hparams,
        stats=stats,
        progress=progress,
    )
    seconds = (time.perf_counter() - started) / len(cases)
    with edited(model, edit):
        post = _scores(model, cases, n_fluent, generation_tokens, seed)
    return pd.DataFrame(
        [_row(case, "memit", seconds, pre.iloc[i], post.iloc[i]) for i, case in enumerate(cases)]
    )


def _scores(
    model: HookedTransformer,
    cases: Sequence[CounterFactCase],
    n_fluent: int,
    generation_tokens: int,
    seed: int,
) -> pd.DataFrame:
    """:func:`case_scores`, with the generation entropy of the first ``n_fluent`` cases."""
    scores = case_scores(model, cases)
    if n_fluent:
        scores["entropy"] = math.nan
        scores.loc[: n_fluent - 1, "entropy"] = generation_entropy(
            model, cases[:n_fluent], n_tokens=generation_tokens, seed=seed
        )
    return scores


def _row(
    case: CounterFactCase, method: str, seconds: float, pre: pd.Series, post: pd.Series
) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": case.case_id, "method": method, "edit_seconds": seconds}
    for column in pre.index.drop("case_id"):
        row[f"pre_{column}"] = pre[column]
        row[f"post_{column}"] = post.get(column, math.nan)  # entropy is measured on a few
    return row


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: ES, PS, NS (percent), S, magnitudes, entropy and edit time."""
    summary = []
    for method, group in results.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "cases": len(group)}
        for stage in ("pre", "post"):
            for metric, short in zip(_METRICS, ("ES", "PS", "NS"), strict=True):
                row[f"{stage}_{short}"] = 100 * group[f"{stage}_{metric}_score"].mean()
                row[f"{stage}_{short[0]}M"] = 100 * group[f"{stage}_{metric}_magnitude"].mean()
            if f"{stage}_entropy" in group:
                row[f"{stage}_entropy"] = group[f"{stage}_entropy"].mean()
        row["S"] = overall_score([row["post_ES"], row["post_PS"], row["post_NS"]])
        row["median_edit_seconds"] = group["edit_seconds"].median()
        summary.append(row)
    return pd.DataFrame(summary)


def overall_score(values: Sequence[float]) -> float:
    """S: the harmonic mean of ES, PS and NS (0 if any is 0)."""
    if any(v <= 0 or math.isnan(v) for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def sequential_edits(
    model: HookedTransformer,
    cases: Sequence[CounterFactCase],
    *,
    checkpoints: Sequence[int] = (1, 10, 25, 50, 100),
    first: int = 10,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    stats: KeyStats | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Apply ROME edits one after another, each computed on the edited model, and track decay.

    At each checkpoint ``n`` it records, over the first ``first`` edits, the
    efficacy score and, over the neighbourhood prompts of all ``n`` edited
    cases, the neighbourhood score, both in percent, together with whether
    every weight and every scored probability is still finite. All edits are
    reverted (in reverse order) before returning.
    """
    if not cases:
        raise ValueError("no cases to edit")
    editor = _editor("rome", layer, hparams, stats)
    assert editor is not None
    baseline = case_scores(model, cases)
    handles = []
    rows = []
    try:
        for n, case in enumerate(tqdm(cases, desc="sequential edits", disable=not progress), 1):
            started = time.perf_counter()
            handles.append(editor(model, case.request).apply(model))
            seconds = time.perf_counter() - started
            if n not in checkpoints and n != len(cases):
                continue
            now = case_scores(model, cases[:n])
            weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            scored = now.drop(columns="case_id").to_numpy()
            rows.append(
                {
                    "edits": n,
                    "first_ES": 100 * now["efficacy_score"][:first].mean(),
                    "ES": 100 * now["efficacy_score"].mean(),
                    "PS": 100 * now["paraphrase_score"].mean(),
                    "NS": 100 * now["neighborhood_score"].mean(),
                    "NS_unedited": 100 * baseline["neighborhood_score"][:n].mean(),
                    "finite": weights_finite and bool(np.isfinite(scored).all()),
                    "last_edit_seconds": seconds,
                }
            )
    finally:
        for handle in reversed(handles):
            handle.revert()
    return pd.DataFrame(rows)
