"""rome_lens: find where a TransformerLens model stores a fact, and rewrite it.

Find it with causal tracing (:func:`trace_fact`), rewrite it with ROME
(:func:`rome_edit`), thousands at once with MEMIT (:func:`memit_edit`) or
AlphaEdit (:func:`alphaedit_edit`), batch after batch with any editor
(:class:`SequentialEditor`, :func:`get_editor`, :func:`register_editor`), check it
with CounterFact (:func:`evaluate_edits`), watch it layer by layer with the
logit lens (:func:`logit_lens`), look inside with LLM-Microscope's metrics
(:func:`token_nonlinearity`, :func:`contextualization`, ...), ask which
training texts drive an answer (:func:`influence`), undo an edit exactly
(:func:`edited`, ``edit.apply(model).revert()``), and see every result in a
notebook or an offline page (:mod:`rome_lens.viz`).

The package is built in rooms, each importing only those below it::

    core → stats → tracing | editing | analysis | influence → evaluation → viz → cli

The names below load their room on first use, so ``import rome_lens`` (and the
``rome-lens`` command's ``--help``) costs no torch import.

>>> import warnings
>>> import rome_lens
>>> model = rome_lens.tiny_model()
>>> with warnings.catch_warnings(record=True):  # a random model knows no fact
...     trace = rome_lens.trace_fact(model, "The Eiffel Tower is located in the city of",
...                                  "The Eiffel Tower", samples=2, progress=False)
>>> tuple(trace.scores.shape)  # (kind, token, layer)
(3, 10, 3)
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_ROOMS = (
    "analysis",
    "cli",
    "core",
    "editing",
    "evaluation",
    "influence",
    "stats",
    "tracing",
    "viz",
)
_EXPORTS = {
    "analysis": [
        "LogitLens",
        "contextualization",
        "intermediate_predictions",
        "layer_linearity",
        "logit_lens",
        "representation_geometry",
        "token_nonlinearity",
    ],
    "core": ["Cost", "DEFAULT_MODEL", "estimate_cost", "load_model", "tiny_model"],
    "editing": [
        "AlphaEditHyperParams",
        "AppliedEdit",
        "EditMissWarning",
        "EditRequest",
        "Editor",
        "FTHyperParams",
        "MEMITHyperParams",
        "MultiLayerEdit",
        "ROMEHyperParams",
        "RankOneEdit",
        "SequentialEditor",
        "WeightEdit",
        "WeightPatch",
        "alphaedit_edit",
        "edited",
        "editors",
        "ft_edit",
        "get_editor",
        "memit_edit",
        "register_editor",
        "rome_edit",
    ],
    "evaluation": [
        "Evaluation",
        "evaluate_edits",
        "load_counterfact",
        "load_counterfact_sample",
        "summarize",
        "without_conflicts",
    ],
    "influence": ["InfluenceFactors", "InfluenceResult", "ScoreSettings", "fit_influence_factors"],
    "stats": ["KeyStats", "key_second_moment"],
    "tracing": [
        "AverageEffects",
        "CausalTrace",
        "SeveredTrace",
        "UnreliableTraceWarning",
        "average_causal_effects",
        "embedding_noise_scale",
        "trace_fact",
        "trace_severed",
    ],
}
_ROOM_OF = {name: room for room, names in _EXPORTS.items() for name in names}

__all__ = [
    "AlphaEditHyperParams",
    "AppliedEdit",
    "AverageEffects",
    "CausalTrace",
    "Cost",
    "DEFAULT_MODEL",
    "EditMissWarning",
    "EditRequest",
    "Editor",
    "Evaluation",
    "FTHyperParams",
    "InfluenceFactors",
    "InfluenceResult",
    "KeyStats",
    "LogitLens",
    "MEMITHyperParams",
    "MultiLayerEdit",
    "ROMEHyperParams",
    "RankOneEdit",
    "ScoreSettings",
    "SequentialEditor",
    "SeveredTrace",
    "UnreliableTraceWarning",
    "WeightEdit",
    "WeightPatch",
    "alphaedit_edit",
    "average_causal_effects",
    "contextualization",
    "edited",
    "editors",
    "embedding_noise_scale",
    "estimate_cost",
    "evaluate_edits",
    "fit_influence_factors",
    "ft_edit",
    "get_editor",
    "influence",
    "intermediate_predictions",
    "key_second_moment",
    "layer_linearity",
    "load_counterfact",
    "load_counterfact_sample",
    "load_model",
    "logit_lens",
    "memit_edit",
    "register_editor",
    "representation_geometry",
    "rome_edit",
    "summarize",
    "tiny_model",
    "token_nonlinearity",
    "trace_fact",
    "trace_severed",
    "viz",
    "without_conflicts",
]


# Names renamed in 0.3 to TransformerLens's (American) spelling: they still resolve, with a
# DeprecationWarning, until 0.4.
_RENAMED = {"contextualisation": "contextualization"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"rome_lens.{name} is now rome_lens.{new}", DeprecationWarning, stacklevel=2)
        return __getattr__(new)
    if name in _ROOM_OF:
        return getattr(importlib.import_module(f"rome_lens.{_ROOM_OF[name]}"), name)
    if name in _ROOMS:
        return importlib.import_module(f"rome_lens.{name}")
    raise AttributeError(f"module 'rome_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_ROOMS, "__version__"])


if TYPE_CHECKING:
    from rome_lens import (
        influence,  # the room, callable as rome_lens.influence(...)
        viz,
    )
    from rome_lens.analysis import (
        LogitLens,
        contextualization,
        intermediate_predictions,
        layer_linearity,
        logit_lens,
        representation_geometry,
        token_nonlinearity,
    )
    from rome_lens.core import DEFAULT_MODEL, Cost, estimate_cost, load_model, tiny_model
    from rome_lens.editing import (
        AlphaEditHyperParams,
        AppliedEdit,
        EditMissWarning,
        Editor,
        EditRequest,
        FTHyperParams,
        MEMITHyperParams,
        MultiLayerEdit,
        RankOneEdit,
        ROMEHyperParams,
        SequentialEditor,
        WeightEdit,
        WeightPatch,
        alphaedit_edit,
        edited,
        editors,
        ft_edit,
        get_editor,
        memit_edit,
        register_editor,
        rome_edit,
    )
    from rome_lens.evaluation import (
        Evaluation,
        evaluate_edits,
        load_counterfact,
        load_counterfact_sample,
        summarize,
        without_conflicts,
    )
    from rome_lens.influence import (
        InfluenceFactors,
        InfluenceResult,
        ScoreSettings,
        fit_influence_factors,
    )
    from rome_lens.stats import KeyStats, key_second_moment
    from rome_lens.tracing import (
        AverageEffects,
        CausalTrace,
        SeveredTrace,
        UnreliableTraceWarning,
        average_causal_effects,
        embedding_noise_scale,
        trace_fact,
        trace_severed,
    )
