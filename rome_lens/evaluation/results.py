"""The results of an evaluation: every case's scores, and a curve of sequential edits.

Both are :class:`~rome_lens.core.results.Result` s holding plain table rows:
``to_dataframe()`` gives the table, :meth:`Evaluation.summary` the CounterFact
summary (ES, PS, NS in percent, S), and ``save``/``load`` keep them as JSON
beside an empty tensor file.

>>> from rome_lens.evaluation.results import Evaluation
>>> rows = [{"case_id": 0, "method": "rome", "edit_seconds": 1.0}
...         | {f"{s}_{m}_{k}": 1.0 for s in ("pre", "post")
...            for m in ("efficacy", "paraphrase", "neighborhood") for k in ("score", "magnitude")}]
>>> Evaluation(rows).summary()[["method", "post_ES", "S"]].to_dict("records")
[{'method': 'rome', 'post_ES': 100.0, 'S': 100.0}]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rome_lens.core.results import Result
from rome_lens.evaluation.metrics import summarize

__all__ = ["Evaluation", "SequentialCurve", "records"]


@dataclass
class Evaluation(Result):
    """Every case's CounterFact scores before and after its edit (one row per case and method)."""

    kind = "evaluation"
    rows: list[dict[str, Any]]
    """case_id, method, edit_seconds, pre_* and post_* metrics."""

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (case, method)."""
        return pd.DataFrame(self.rows)

    def summary(self) -> pd.DataFrame:
        """One row per method: ES, PS, NS (percent), S, magnitudes, entropy, median edit time."""
        return summarize(self.to_dataframe())

    @classmethod
    def concat(cls, evaluations: Sequence[Evaluation]) -> Evaluation:
        """One evaluation holding the rows of several (e.g. ``"none"`` and ``"rome"``)."""
        return cls([row for evaluation in evaluations for row in evaluation.rows])


@dataclass
class SequentialCurve(Result):
    """Scores after each checkpoint of edits applied one after another."""

    kind = "sequential_curve"
    rows: list[dict[str, Any]]
    """One per checkpoint: edits so far, ES, PS, NS, ..."""
    method: str = "rome"
    """The editor."""

    def to_dataframe(self) -> pd.DataFrame:
        """One row per checkpoint."""
        return pd.DataFrame(self.rows)


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows as plain Python values (JSON-able: numpy scalars unwrapped).

    Args:
        table: any table.

    Returns:
        One dict per row.
    """
    return [
        {str(k): v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
        for row in table.to_dict("records")
    ]
