"""CounterFact's metrics: efficacy, generalisation, specificity, fluency, and their summary.

For every case, before and after an edit, with ROME's per-token mean NLL of the
whole target (``p = exp(-nll)``):

* **efficacy**: on the edit prompt, score = P(new) > P(true), magnitude =
  P(new) − P(true);
* **paraphrase**: the same on rewordings of the prompt (generalisation);
* **neighborhood**: on prompts about *other* subjects with the same true
  answer, score = P(true) > P(new), magnitude = P(true) − P(new) (specificity);
* **generation entropy**: ROME's fluency, the weighted bigram/trigram entropy
  of seeded generations (top-5 sampling) from the case's generation prompts;
* **generation success** (:func:`generation_scores`): whether greedy decoding,
  a few tokens past the answer's length, *writes* the new answer after the
  edit prompt and its paraphrases, and the true answer after the neighbours'
  prompts. Teacher-forced scores only compare two probabilities; "The Mirage
  of Model Editing" (arXiv 2502.11177) found edits that win that comparison
  and still do not say the new answer.

Scores are averaged over cases and reported in percent; the overall score S
is the harmonic mean of ES, PS and NS (:func:`summarize`).

>>> from rome_lens.evaluation.metrics import n_gram_entropy
>>> round(n_gram_entropy("the cat sat on the mat and the dog sat on the rug"), 3)
3.269
>>> n_gram_entropy("la la la la la la")  # repetition, the failure mode it catches
0.0
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from rome_lens.core.backend import Model
from rome_lens.core.generation import greedy_continuations, sample_text
from rome_lens.core.predict import target_nll
from rome_lens.core.tokens import target_token_ids
from rome_lens.evaluation.counterfact import CounterFactCase

__all__ = [
    "GENERATION_EXTRA_TOKENS",
    "METRICS",
    "case_scores",
    "generation_entropy",
    "generation_scores",
    "n_gram_entropy",
    "overall_score",
    "summarize",
]

METRICS = ("efficacy", "paraphrase", "neighborhood")
GENERATION_EXTRA_TOKENS = 3  # tokens decoded past the answer's own length


def case_scores(
    model: Model, cases: Sequence[CounterFactCase], *, batch_size: int = 64
) -> pd.DataFrame:
    """Efficacy, paraphrase and neighbourhood scores and magnitudes of each case, as is.

    Args:
        model: the model, edited or not.
        cases: the cases to score.
        batch_size: sequences per forward pass.

    Returns:
        One row per case: ``case_id`` and ``{metric}_score``/``{metric}_magnitude``.
    """
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
        for metric in METRICS:
            pair = probs[case_spans[metric]].view(-1, 2)  # columns: P(new), P(true)
            gap = pair[:, 0] - pair[:, 1]
            if metric == "neighborhood":
                gap = -gap
            row[f"{metric}_score"] = (gap > 0).double().mean().item() if len(gap) else math.nan
            row[f"{metric}_magnitude"] = gap.mean().item() if len(gap) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def generation_scores(
    model: Model,
    cases: Sequence[CounterFactCase],
    *,
    extra_tokens: int = GENERATION_EXTRA_TOKENS,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Whether greedy decoding writes each case's answer: the new one, and the true one nearby.

    Every prompt is continued greedily for the answer's length in tokens plus
    ``extra_tokens`` (room for "the city of Rome"), and the answer counts as
    written when its text appears in the continuation as a whole word.

    Args:
        model: the model, edited or not.
        cases: the cases to score.
        extra_tokens: tokens decoded past the answer's own length.
        batch_size: prompts per forward pass.

    Returns:
        One row per case: ``case_id``, ``generation_efficacy`` (the edit prompt
        writes the new answer, 0 or 1), ``generation_paraphrase`` (the share of
        paraphrases that write it) and ``generation_neighborhood`` (the share of
        neighbourhood prompts that still write their true answer).
    """
    if extra_tokens < 0:
        raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens}")
    prompts: list[str] = []
    answers: list[str] = []
    spans: list[dict[str, slice]] = []
    for case in cases:
        request, case_spans = case.request, {}
        groups = {
            "efficacy": ([request.text], request.target_new),
            "paraphrase": (case.paraphrase_prompts, request.target_new),
            "neighborhood": (case.neighborhood_prompts, case.neighborhood_answer),
        }
        for metric, (metric_prompts, answer) in groups.items():
            start = len(prompts)
            prompts += metric_prompts
            answers += [answer] * len(metric_prompts)
            case_spans[metric] = slice(start, len(prompts))
        spans.append(case_spans)
    budgets = [
        len(target_token_ids(model, p, a)) + extra_tokens
        for p, a in zip(prompts, answers, strict=True)
    ]
    texts = greedy_continuations(model, prompts, budgets, batch_size=batch_size)
    wrote = np.array([_writes(t, a) for t, a in zip(texts, answers, strict=True)], dtype=float)
    rows = []
    for case, case_spans in zip(cases, spans, strict=True):
        row: dict[str, Any] = {"case_id": case.case_id}
        for metric in METRICS:
            hits = wrote[case_spans[metric]]
            row[f"generation_{metric}"] = float(hits.mean()) if len(hits) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _writes(text: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``text`` as whole words (not inside a longer word)."""
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", text) is not None


def n_gram_entropy(text: str) -> float:
    """ROME's fluency: (2/3 · H(bigrams) + 4/3 · H(trigrams)) / 2, in bits, over words.

    Args:
        text: the text (lower-cased, split into words and punctuation).

    Returns:
        The entropy in bits (0 for text without two words).
    """
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
    model: Model,
    cases: Sequence[CounterFactCase],
    *,
    max_new_tokens: int = 100,
    seed: int = 0,
) -> list[float]:
    """Mean n-gram entropy of each case's generations (``nan`` for cases without prompts).

    Args:
        model: the model, edited or not.
        cases: the cases whose generation prompts are sampled from.
        max_new_tokens: tokens generated per prompt.
        seed: seeds the sampling.

    Returns:
        One entropy per case, in bits.
    """
    prompts = [p for case in cases for p in case.generation_prompts]
    texts = iter(sample_text(model, prompts, max_new_tokens, seed=seed, top_k=5))
    return [
        float(np.mean([n_gram_entropy(next(texts)) for _ in case.generation_prompts]))
        if case.generation_prompts
        else math.nan
        for case in cases
    ]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: ES, PS, NS (percent), S, magnitudes, generation success
    (``gen_ES``, ``gen_PS``, ``gen_NS``, where measured), entropy and edit time.

    Args:
        results: the per-case table of an evaluation (``pre_*``/``post_*`` columns,
            ``method``, ``edit_seconds``).

    Returns:
        The summary, one row per method.
    """
    summary = []
    for method, group in results.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "cases": len(group)}
        for stage in ("pre", "post"):
            for metric, short in zip(METRICS, ("ES", "PS", "NS"), strict=True):
                row[f"{stage}_{short}"] = 100 * group[f"{stage}_{metric}_score"].mean()
                row[f"{stage}_{short[0]}M"] = 100 * group[f"{stage}_{metric}_magnitude"].mean()
            for metric, short in zip(METRICS, ("ES", "PS", "NS"), strict=True):
                if f"{stage}_generation_{metric}" in group:  # generation success, percent
                    row[f"{stage}_gen_{short}"] = 100 * group[f"{stage}_generation_{metric}"].mean()
            if f"{stage}_entropy" in group:
                row[f"{stage}_entropy"] = group[f"{stage}_entropy"].mean()
        row["S"] = overall_score([row["post_ES"], row["post_PS"], row["post_NS"]])
        row["median_edit_seconds"] = group["edit_seconds"].median()
        summary.append(row)
    return pd.DataFrame(summary)


def overall_score(values: Sequence[float]) -> float:
    """S: the harmonic mean of ES, PS and NS (0 if any is 0).

    Args:
        values: ES, PS and NS, in percent.

    Returns:
        Their harmonic mean.
    """
    if any(v <= 0 or math.isnan(v) for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)
