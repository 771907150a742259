"""Run an editor over CounterFact cases and score every case before and after.

:func:`evaluate_edits` edits each case with ROME or FT+L (reverting each edit
before the next) or writes every case in one MEMIT batch, and returns an
:class:`~rome_lens.evaluation.results.Evaluation`. :func:`sequential_edits`
applies ROME edits one after another, each computed on the model as the
earlier ones left it, and tracks how the scores decay.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.evaluation import evaluate_edits, load_counterfact_sample
>>> cases = load_counterfact_sample(limit=2)
>>> result = evaluate_edits(tiny_model(), cases, "none", fluency=False, progress=False)
>>> result.summary()[["method", "cases"]].to_dict("records")
[{'method': 'none', 'cases': 2}]
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.distributed import Split, gather_bytes, is_main, shard
from rome_lens.editing import (
    EditMissWarning,
    EditRequest,
    FTHyperParams,
    MEMITHyperParams,
    ROMEHyperParams,
    WeightEdit,
    edited,
    ft_edit,
    memit_edit,
    rome_edit,
)
from rome_lens.editing.requests import check_hparams
from rome_lens.evaluation.counterfact import CounterFactCase
from rome_lens.evaluation.metrics import case_scores, generation_entropy
from rome_lens.evaluation.results import Evaluation, SequentialCurve, records
from rome_lens.stats import KeyStats

__all__ = ["Method", "evaluate_edits", "sequential_edits"]

Method = Literal["rome", "ft", "memit", "none"]
_HPARAMS = {"rome": ROMEHyperParams, "ft": FTHyperParams, "memit": MEMITHyperParams}


def evaluate_edits(
    model: Model,
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
    distributed: bool | None = None,
) -> Evaluation:
    """Edit each case, scoring it before and after.

    ``"rome"`` and ``"ft"`` edit one case at a time, reverting each edit before
    the next; ``"memit"`` writes every case in one
    :func:`~rome_lens.editing.memit_edit` batch (into ``layers``) and scores all
    of them with the whole batch applied. With ``"none"`` nothing is edited
    and ``post_*`` equals ``pre_*``.

    Args:
        model: the model to edit (left as it was).
        cases: CounterFact cases.
        method: ``"rome"``, ``"ft"``, ``"memit"`` or ``"none"``.
        layer: the layer ROME or FT+L edits (``None``: the model's default).
        layers: the layers MEMIT edits (``None``: the model's default).
        hparams: the editor's settings, of the type the method takes
            (``ROMEHyperParams``, ``FTHyperParams`` or ``MEMITHyperParams``).
        stats: key statistics: one ``KeyStats`` for ROME, ``{layer: KeyStats}`` for MEMIT.
        fluency: generation entropy is the slowest part: ``True`` measures it on
            every case, ``n`` on the first ``n`` (``nan`` elsewhere), ``False`` on none.
        generation_tokens: tokens generated per prompt for the fluency measure.
        seed: seeds the generations.
        progress: show a progress bar.
        distributed: for ``"rome"``, ``"ft"`` and ``"none"``, split the cases over the
            ranks of the process group and gather the rows (``None``: when one is
            initialised; see :mod:`rome_lens.core.distributed`). Generations are
            sampled per batch, so a split run draws other samples for the fluency.

    Returns:
        One row per case: ``pre_*`` and ``post_*`` for every metric, the edit's
        wall-clock ``edit_seconds`` (for MEMIT, the batch's time over the number
        of cases), whether the edit ``took`` on its prompt, and the ``method``.
    """
    if not cases:
        raise ValueError("no cases to evaluate")
    if method not in ("rome", "ft", "memit", "none"):
        raise ValueError(f"method must be 'rome', 'ft', 'memit' or 'none', got {method!r}")
    if hparams is not None and method in _HPARAMS:
        check_hparams(hparams, _HPARAMS[method])
    if method == "memit":
        return _evaluate_batch(
            model, cases, layers, hparams, stats, fluency, generation_tokens, seed, progress
        )
    if isinstance(stats, dict):
        raise ValueError(f"statistics per layer are for method='memit'; {method!r} takes one")
    editor = _editor(method, layer, hparams, stats)
    n_fluent = len(cases) if fluency is True else int(fluency)
    split = Split.of(distributed)
    mine = shard(range(len(cases)), split)
    local = [cases[i] for i in mine]
    pre = _scores(model, local, sum(i < n_fluent for i in mine), generation_tokens, seed)
    rows = []
    bar = tqdm(local, desc=f"evaluating {method}", disable=not (progress and is_main(split)))
    for j, (i, case) in enumerate(zip(mine, bar, strict=True)):
        post, seconds, took = pre.iloc[[j]].reset_index(drop=True), 0.0, math.nan
        if editor is not None:
            started = time.perf_counter()
            edit = editor(model, case.request)
            seconds, took = time.perf_counter() - started, edit.took
            with edited(model, edit):
                post = _scores(model, [case], int(i < n_fluent), generation_tokens, seed)
        rows.append(_row(case, method, seconds, took, pre.iloc[j], post.iloc[0]))
    found = records(pd.DataFrame(rows))
    if not split.active:
        return Evaluation(found)
    gathered = gather_bytes([Evaluation([row]).to_bytes() for row in found], split)
    return Evaluation([Evaluation.from_bytes(b).rows[0] for b in gathered])


def sequential_edits(
    model: Model,
    cases: Sequence[CounterFactCase],
    *,
    checkpoints: Sequence[int] = (1, 10, 25, 50, 100),
    first: int = 10,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    stats: KeyStats | None = None,
    progress: bool = True,
) -> SequentialCurve:
    """Apply ROME edits one after another, each computed on the edited model, and track decay.

    Args:
        model: the model (left as it was: every edit is reverted, in reverse order).
        cases: the cases to write, in order.
        checkpoints: after how many edits to score.
        first: ``first_ES`` is the efficacy over the first this many edits.
        layer: the layer to edit (``None``: the model's default).
        hparams: ROME's settings.
        stats: key statistics of that layer.
        progress: show a progress bar.

    Returns:
        One row per checkpoint: ES, PS and NS (percent) over the cases edited so
        far, the unedited NS of the same cases, whether every weight and score
        is still finite, and the last edit's time.
    """
    if not cases:
        raise ValueError("no cases to edit")
    if hparams is not None:
        check_hparams(hparams, ROMEHyperParams)
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
    return SequentialCurve(records(pd.DataFrame(rows)), method="rome")


def _editor(
    method: Method,
    layer: int | None,
    hparams: Any,
    stats: KeyStats | None,
) -> Callable[[Model, EditRequest], WeightEdit] | None:
    """Edit one request quietly: misses are counted in the scores, not warned one by one."""
    if method == "none":
        return None

    def edit(model: Model, request: EditRequest) -> WeightEdit:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EditMissWarning)
            if method == "rome":
                return rome_edit(
                    model, request, layer=layer, hparams=hparams, stats=stats, progress=False
                )
            return ft_edit(model, request, layer=layer, hparams=hparams, progress=False)

    return edit


def _evaluate_batch(
    model: Model,
    cases: Sequence[CounterFactCase],
    layers: Sequence[int] | None,
    hparams: Any,
    stats: KeyStats | dict[int, KeyStats] | None,
    fluency: bool | int,
    generation_tokens: int,
    seed: int,
    progress: bool,
) -> Evaluation:
    """MEMIT: one edit for all cases, then every case scored with it applied."""
    if isinstance(stats, KeyStats):
        stats = {stats.layer: stats}
    n_fluent = len(cases) if fluency is True else int(fluency)
    pre = _scores(model, cases, n_fluent, generation_tokens, seed)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EditMissWarning)
        edit = memit_edit(
            model,
            [case.request for case in cases],
            layers=layers,
            hparams=hparams,
            stats=stats,
            progress=progress,
        )
    seconds = (time.perf_counter() - started) / len(cases)
    with edited(model, edit):
        post = _scores(model, cases, n_fluent, generation_tokens, seed)
    rows = [
        _row(case, "memit", seconds, outcome.took, pre.iloc[i], post.iloc[i])
        for i, (case, outcome) in enumerate(zip(cases, edit.outcomes, strict=True))
    ]
    return Evaluation(records(pd.DataFrame(rows)))


def _scores(
    model: Model,
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
            model, cases[:n_fluent], max_new_tokens=generation_tokens, seed=seed
        )
    return scores


def _row(
    case: CounterFactCase,
    method: str,
    seconds: float,
    took: float | bool,
    pre: pd.Series,
    post: pd.Series,
) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": case.case_id, "method": method, "edit_seconds": seconds}
    row["took"] = took
    for column in pre.index.drop("case_id"):
        row[f"pre_{column}"] = pre[column]
        row[f"post_{column}"] = post.get(column, math.nan)  # entropy is measured on a few
    return row
