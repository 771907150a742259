"""Did the edit take? Each request read back on the edited model.

An edit that optimised its value and solved its update can still leave the
model answering as before: the subject's key on the bare prompt may differ
from the context-averaged key the update was solved for, or the optimisation
may stop short. :func:`measure_outcomes` applies the edit for a moment and
reads each request's prompt: the new answer's probability before and after,
the true answer's after (when known), and the rank of the new answer's first
token. An outcome *took* when the new answer is top-1, or at least more
probable than the true one. :func:`warn_misses` warns about the rest, with
:class:`EditMissWarning`; editors never raise for a miss, because misses are
worth studying.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing.outcomes import measure_outcomes
>>> from rome_lens.editing.patches import WeightPatch
>>> from rome_lens.editing.requests import EditRequest
>>> model = tiny_model()
>>> request = EditRequest("{} is in", "The Louvre", "Rome", "Paris")
>>> nothing = WeightPatch.for_model(model, {}, requests=[request])  # changes no weight
>>> (outcome,) = measure_outcomes(model, nothing)
>>> outcome.p_new == outcome.p_new_before
True
"""

from __future__ import annotations

import warnings

import torch

from rome_lens.core.backend import Model
from rome_lens.core.predict import predict_next, target_nll
from rome_lens.editing.patches import EditOutcome, WeightEdit, edited

__all__ = ["EditMissWarning", "measure_outcomes", "warn_misses"]


class EditMissWarning(UserWarning):
    """An edit left its new answer below the old one (see :class:`EditOutcome`)."""


@torch.no_grad()
def measure_outcomes(model: Model, edit: WeightEdit, *, batch_size: int = 64) -> list[EditOutcome]:
    """Each request of ``edit`` read on ``model`` before and with the edit applied.

    Args:
        model: the model the edit was computed on (left as it was).
        edit: any edit with requests.
        batch_size: prompts per forward pass.

    Returns:
        One :class:`EditOutcome` per request, in order.
    """
    requests = edit.requests
    if not requests:
        return []
    prompts = [request.text for request in requests]
    news = [request.target_new for request in requests]
    known = [i for i, request in enumerate(requests) if request.target_true is not None]
    trues = [str(requests[i].target_true) for i in known]

    def probs(targets: list[str], rows: list[int] | None = None) -> list[float]:
        chosen = prompts if rows is None else [prompts[i] for i in rows]
        if not chosen:
            return []
        return torch.exp(-target_nll(model, chosen, targets, batch_size=batch_size)).tolist()

    before = probs(news)
    with edited(model, edit):
        after = probs(news)
        true_after = dict(zip(known, probs(trues, known), strict=True))
        ranks = predict_next(model, prompts, targets=news, batch_size=batch_size).target_rank
    assert ranks is not None
    return [
        EditOutcome(
            prompt=prompts[i],
            target_new=news[i],
            p_new=after[i],
            p_new_before=before[i],
            rank_new=int(ranks[i]),
            p_true=true_after.get(i),
        )
        for i in range(len(requests))
    ]


def warn_misses(edit: WeightEdit) -> None:
    """Warn with :class:`EditMissWarning` about every request of ``edit`` that did not take.

    Args:
        edit: an edit whose outcomes were measured.
    """
    misses = edit.misses
    if not misses:
        return
    shown = "; ".join(
        f"{m.prompt!r} → {m.target_new!r}: p = {m.p_new:.3g} (was {m.p_new_before:.3g}), "
        f"rank {m.rank_new}" + (f", true answer p = {m.p_true:.3g}" if m.p_true is not None else "")
        for m in misses[:3]
    )
    more = f" and {len(misses) - 3} more" if len(misses) > 3 else ""
    warnings.warn(
        f"the edit did not take for {len(misses)} of {len(edit.outcomes)} requests: {shown}{more}",
        EditMissWarning,
        stacklevel=3,
    )
