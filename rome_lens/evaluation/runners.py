"""Run an editor over CounterFact cases and score every case before and after.

:func:`evaluate_edits` takes any registered editor
(:mod:`rome_lens.editing.registry`) by name, or an editor object. One that
writes one request per edit (ROME, FT+L) edits each case in turn, reverting
each edit before the next; one that writes batches (MEMIT, AlphaEdit) writes
every case in one edit. It returns an
:class:`~rome_lens.evaluation.results.Evaluation`. :func:`sequential_edits`
writes ROME edits one after another with
:class:`~rome_lens.editing.SequentialEditor`, each computed on the model as the
earlier ones left it, and tracks how the scores decay.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import FTHyperParams
>>> from rome_lens.evaluation import evaluate_edits, load_counterfact_sample
>>> cases = load_counterfact_sample(limit=2)
>>> result = evaluate_edits(tiny_model(), cases, "none", fluency=False, progress=False)
>>> result.summary()[["method", "cases"]].to_dict("records")
[{'method': 'none', 'cases': 2}]
>>> result = evaluate_edits(tiny_model(), cases, "ft", layer=1, hparams=FTHyperParams(steps=2),
...                         fluency=False, progress=False)
>>> result.to_dataframe()["method"].tolist()
['ft', 'ft']
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.distributed import Split, gather_bytes, is_main, shard
from rome_lens.editing import (
    EditMissWarning,
    Editor,
    EditorSettings,
    EditorState,
    EditRequest,
    ROMEHyperParams,
    SequentialEditor,
    WeightEdit,
    default_layer,
    edited,
    editor_settings,
    editors,
    get_editor,
)
from rome_lens.evaluation.counterfact import CounterFactCase
from rome_lens.evaluation.metrics import case_scores, generation_entropy, generation_scores
from rome_lens.evaluation.results import Evaluation, SequentialCurve, records
from rome_lens.stats import KeyStats

__all__ = ["Method", "evaluate_edits", "sequential_edits"]

Method = Literal["rome", "ft", "memit", "alphaedit", "none"]
"""The built-in editors' names and ``"none"``; any registered name, or an editor, serves too."""


def evaluate_edits(
    model: Model,
    cases: Sequence[CounterFactCase],
    method: str | Editor = "rome",
    *,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    hparams: EditorSettings | None = None,
    stats: KeyStats | Mapping[int, KeyStats] | None = None,
    fluency: bool | int = True,
    generation_tokens: int = 100,
    generation: bool = True,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> Evaluation:
    """Edit each case, scoring it before and after.

    An editor that writes one request per edit (``"rome"``, ``"ft"``) edits one
    case at a time, reverting each edit before the next; one that writes batches
    (``"memit"``, ``"alphaedit"``) writes every case in one edit and scores all of
    them with the whole batch applied. With ``"none"`` nothing is edited and
    ``post_*`` equals ``pre_*``. The editor's key statistics are read once, before
    the first edit.

    Args:
        model: the model to edit (left as it was).
        cases: CounterFact cases.
        method: a registered editor's name (``"rome"``, ``"ft"``, ``"memit"``,
            ``"alphaedit"``, or one of your own), an editor, or ``"none"``.
        layer: the one layer to edit (``None``: ``layers``, or the editor's default).
        layers: the layers to edit (``None``: the editor's default).
        hparams: the editor's settings, of exactly its ``settings_type``
            (``ROMEHyperParams``, ``FTHyperParams``, ...; ``None``: its defaults).
        stats: key statistics, ``{layer: KeyStats}``, or one ``KeyStats`` (for the one
            layer edited, or for its own layer).
        fluency: generation entropy is the slowest part: ``True`` measures it on
            every case, ``n`` on the first ``n`` (``nan`` elsewhere), ``False`` on none.
        generation_tokens: tokens generated per prompt for the fluency measure.
        generation: also score generation success (:func:`generation_scores`):
            whether greedy decoding writes the new answer after the edit prompt
            and its paraphrases, and the true answer after the neighbours'.
        seed: seeds the generations.
        progress: show a progress bar.
        distributed: for an editor of one request per edit and ``"none"``, split the
            cases over the ranks of the process group and gather the rows (``None``:
            when one is initialised; see :mod:`rome_lens.core.distributed`).
            Generations are sampled per batch, so a split run draws other samples
            for the fluency.

    Returns:
        One row per case: ``pre_*`` and ``post_*`` for every metric, the edit's
        wall-clock ``edit_seconds`` (for a batch, the batch's time over the number
        of cases), whether the edit ``took`` on its prompt, and the ``method``.
    """
    if not cases:
        raise ValueError("no cases to evaluate")
    scoring = _Scoring(
        len(cases) if fluency is True else int(fluency), generation_tokens, generation, seed,
        progress,
    )  # fmt: skip
    if isinstance(method, str) and method == "none":
        return _evaluate_each(model, cases, None, scoring, Split.of(distributed))
    editor = _editor(method)
    settings = editor_settings(editor, hparams)
    chosen = _chosen_layers(layer, layers)
    by_layer = _per_layer(stats, chosen or editor.default_layers(model))
    state = editor.start(model, settings, layers=chosen, stats=by_layer, progress=progress)
    run = _Run(editor, settings, state)
    if editor.batched:
        return _evaluate_batch(model, cases, run, scoring)
    return _evaluate_each(model, cases, run, scoring, Split.of(distributed))


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

    The edits are written by :class:`~rome_lens.editing.SequentialEditor` with
    ``"rome"``, one case per batch.

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
        far, the unedited NS of the same cases, generation success (``gen_ES``,
        ``gen_PS``, ``gen_NS``), whether every weight and score is still finite,
        and the last edit's time.
    """
    if not cases:
        raise ValueError("no cases to edit")
    chosen = [default_layer(model) if layer is None else layer]
    editor = SequentialEditor(
        model, "rome", layers=chosen, hparams=hparams, stats=_per_layer(stats, chosen),
        progress=False,
    )  # fmt: skip
    baseline = case_scores(model, cases)
    rows = []
    try:
        for n, case in enumerate(tqdm(cases, desc="sequential edits", disable=not progress), 1):
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EditMissWarning)
                editor.edit([case.request])
            seconds = time.perf_counter() - started
            if n in checkpoints or n == len(cases):
                scores = _checkpoint(model, cases[:n], baseline, first)
                rows.append(scores | {"last_edit_seconds": seconds})
    finally:
        editor.revert_all()
    return SequentialCurve(records(pd.DataFrame(rows)), method="rome")


def _checkpoint(
    model: Model, cases: Sequence[CounterFactCase], baseline: pd.DataFrame, first: int
) -> dict[str, Any]:
    """The scores of the cases edited so far, on the model as the edits left it."""
    now = case_scores(model, cases)
    weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    scored = now.drop(columns="case_id").to_numpy()
    written = generation_scores(model, cases)
    return {
        "edits": len(cases),
        "first_ES": 100 * now["efficacy_score"][:first].mean(),
        "ES": 100 * now["efficacy_score"].mean(),
        "PS": 100 * now["paraphrase_score"].mean(),
        "NS": 100 * now["neighborhood_score"].mean(),
        "NS_unedited": 100 * baseline["neighborhood_score"][: len(cases)].mean(),
        "gen_ES": 100 * written["generation_efficacy"].mean(),
        "gen_PS": 100 * written["generation_paraphrase"].mean(),
        "gen_NS": 100 * written["generation_neighborhood"].mean(),
        "finite": weights_finite and bool(np.isfinite(scored).all()),
    }


def _editor(method: str | Editor) -> Editor:
    """The registered editor ``method`` names; the message of an unknown name lists "none"."""
    if isinstance(method, str) and method not in editors():
        names = sorted([*editors(), "none"])
        raise ValueError(f"method must be one of {names}, got {method!r}")
    return get_editor(method)


def _chosen_layers(layer: int | None, layers: Sequence[int] | None) -> list[int] | None:
    """The layers asked for: ``[layer]``, ``layers``, or ``None`` for the editor's default."""
    if layer is not None and layers is not None:
        raise ValueError(f"give layer or layers, not both (got {layer} and {list(layers)})")
    return [layer] if layer is not None else None if layers is None else list(layers)


def _per_layer(
    stats: KeyStats | Mapping[int, KeyStats] | None, layers: list[int]
) -> Mapping[int, KeyStats] | None:
    """Statistics by layer: a lone ``KeyStats`` is for the one layer edited (checked there),
    or for its own layer when several are."""
    if not isinstance(stats, KeyStats):
        return stats
    return {layers[0] if len(layers) == 1 else stats.layer: stats}


@dataclass(frozen=True)
class _Scoring:
    """How cases are scored: fluency on the first ``n_fluent``, generations seeded."""

    n_fluent: int
    generation_tokens: int
    generation: bool  # score generation success too
    seed: int
    progress: bool

    def scores(self, model: Model, cases: Sequence[CounterFactCase], n_fluent: int) -> pd.DataFrame:
        """:func:`case_scores`, generation success if asked, and the generation entropy of
        the first ``n_fluent`` cases."""
        scores = _scores(model, cases, n_fluent, self.generation_tokens, self.seed)
        if not self.generation:
            return scores
        return scores.merge(generation_scores(model, cases), on="case_id", sort=False)


@dataclass(frozen=True)
class _Run:
    """An editor, its settings and its state: one quiet edit per call."""

    editor: Editor
    settings: Any
    state: EditorState

    def __call__(self, model: Model, requests: list[EditRequest], progress: bool) -> WeightEdit:
        """Edit quietly: misses are counted in the scores, not warned one by one."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EditMissWarning)
            return self.editor.edit(
                model, requests, self.settings, state=self.state, progress=progress
            )


def _evaluate_each(
    model: Model,
    cases: Sequence[CounterFactCase],
    run: _Run | None,
    scoring: _Scoring,
    split: Split,
) -> Evaluation:
    """One edit per case (or none), reverted before the next; the cases split over ranks."""
    name = "none" if run is None else run.editor.name
    mine = shard(range(len(cases)), split)
    local = [cases[i] for i in mine]
    pre = scoring.scores(model, local, sum(i < scoring.n_fluent for i in mine))
    rows = []
    bar = tqdm(local, desc=f"evaluating {name}", disable=not (scoring.progress and is_main(split)))
    for j, (i, case) in enumerate(zip(mine, bar, strict=True)):
        post, seconds, took = pre.iloc[[j]].reset_index(drop=True), 0.0, math.nan
        if run is not None:
            started = time.perf_counter()
            edit = run(model, [case.request], False)
            seconds, took = time.perf_counter() - started, edit.took
            with edited(model, edit):
                post = scoring.scores(model, [case], int(i < scoring.n_fluent))
        rows.append(_row(case, name, seconds, took, pre.iloc[j], post.iloc[0]))
    found = records(pd.DataFrame(rows))
    if not split.active:
        return Evaluation(found)
    gathered = gather_bytes([Evaluation([row]).to_bytes() for row in found], split)
    return Evaluation([Evaluation.from_bytes(b).rows[0] for b in gathered])


def _evaluate_batch(
    model: Model, cases: Sequence[CounterFactCase], run: _Run, scoring: _Scoring
) -> Evaluation:
    """One edit for all cases, then every case scored with it applied."""
    pre = scoring.scores(model, cases, scoring.n_fluent)
    started = time.perf_counter()
    edit = run(model, [case.request for case in cases], scoring.progress)
    seconds = (time.perf_counter() - started) / len(cases)
    with edited(model, edit):
        post = scoring.scores(model, cases, scoring.n_fluent)
    rows = [
        _row(case, run.editor.name, seconds, outcome.took, pre.iloc[i], post.iloc[i])
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
