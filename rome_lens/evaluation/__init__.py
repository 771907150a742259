"""Evaluation: does an edit take, generalise and stay local? (CounterFact)

This room holds the CounterFact loaders and a 300-case sample shipped with the
package, the metrics (efficacy, paraphrase, neighbourhood, generation success,
fluency, the summary S), the runners that edit case after case, and their results. It
imports :mod:`rome_lens.core`, :mod:`rome_lens.stats` and :mod:`rome_lens.editing`.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.evaluation import case_scores, load_counterfact_sample
>>> scores = case_scores(tiny_model(), load_counterfact_sample(limit=3))
>>> scores.columns.tolist()[:3]
['case_id', 'efficacy_score', 'efficacy_magnitude']
"""

from rome_lens.evaluation.counterfact import (
    CounterFactCase,
    load_counterfact,
    load_counterfact_sample,
    without_conflicts,
)
from rome_lens.evaluation.metrics import (
    case_scores,
    generation_entropy,
    generation_scores,
    n_gram_entropy,
    overall_score,
    summarize,
)
from rome_lens.evaluation.results import Evaluation, SequentialCurve
from rome_lens.evaluation.runners import evaluate_edits, sequential_edits

__all__ = [
    "CounterFactCase",
    "Evaluation",
    "SequentialCurve",
    "case_scores",
    "evaluate_edits",
    "generation_entropy",
    "generation_scores",
    "load_counterfact",
    "load_counterfact_sample",
    "n_gram_entropy",
    "overall_score",
    "sequential_edits",
    "summarize",
    "without_conflicts",
]
