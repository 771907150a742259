"""Influence functions: which training texts drive an answer (Grosse et al. 2023, EK-FAC).

For a prompt and completion, rank a collection of texts by how much training
on each would raise ``p(completion | prompt)``, with the MLP weights'
curvature approximated by EK-FAC. The room is itself callable:
``rome_lens.influence(model, factors, prompt, completion, corpus)`` is
:func:`~rome_lens.influence.scores.influence`. This room holds the weights and the hook
points that carry their inputs and gradients (:mod:`~rome_lens.influence.weights`),
the fitted factors (:mod:`~rome_lens.influence.factors`, built on
:func:`rome_lens.stats.moments.accumulate_moments`), the scores and their
splits by layer and token (:mod:`~rome_lens.influence.scores`, on the machinery every
scan shares, :mod:`~rome_lens.influence.scan`), how they are
scored (:class:`~rome_lens.influence.settings.ScoreSettings`), and a BM25
prefilter (:mod:`~rome_lens.influence.prefilter`), fine-tuning on a corpus
you know, to check the scores against the texts that really taught a fact
(:mod:`~rome_lens.influence.training`), and attribution recipes that find
those texts (:mod:`~rome_lens.influence.attribution`). It imports
:mod:`rome_lens.core` and :mod:`rome_lens.stats`, nothing above.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence import fit_influence_factors, influence
>>> model = tiny_model()
>>> texts = ["The Eiffel Tower is in Paris.", "Berlin is in Germany.", "Cats sleep a lot."]
>>> factors = fit_influence_factors(model, texts * 4, layers=[2], n_tokens=100,
...                                 cache_dir=tempfile.mkdtemp(), progress=False)
>>> result = influence(model, factors, "The Eiffel Tower is in", "Paris", texts, top_k=3,
...                    progress=False)
>>> len(result.text_ids), result.strategy
(3, 'ekfac')
"""

import sys
import types

from rome_lens.influence.attribution import (
    RECIPES,
    AttributionSettings,
    attribution_scores,
)
from rome_lens.influence.factors import (
    STRATEGIES,
    InfluenceFactors,
    Strategy,
    fit_influence_factors,
)
from rome_lens.influence.index import (
    EigenQueries,
    GradientIndex,
    IndexSettings,
    build_gradient_index,
)
from rome_lens.influence.prefilter import bm25_top
from rome_lens.influence.scores import (
    InfluenceResult,
    TextScores,
    influence,
    influence_many,
    preconditioned_gradients,
    query_gradients,
    score_texts,
)
from rome_lens.influence.settings import ScoreSettings
from rome_lens.influence.training import FineTuneConfig, FineTuned, fine_tune
from rome_lens.influence.weights import MLPWeight, mlp_weights


class _CallableRoom(types.ModuleType):
    """This module, callable as its main function (``rome_lens.influence(...)``): the
    function itself, so that its warnings point at the caller's line."""

    __call__ = staticmethod(influence)


sys.modules[__name__].__class__ = _CallableRoom

__all__ = [
    "RECIPES",
    "STRATEGIES",
    "AttributionSettings",
    "EigenQueries",
    "FineTuneConfig",
    "FineTuned",
    "GradientIndex",
    "InfluenceFactors",
    "IndexSettings",
    "InfluenceResult",
    "MLPWeight",
    "ScoreSettings",
    "Strategy",
    "TextScores",
    "attribution_scores",
    "bm25_top",
    "build_gradient_index",
    "fine_tune",
    "fit_influence_factors",
    "influence",
    "influence_many",
    "mlp_weights",
    "preconditioned_gradients",
    "query_gradients",
    "score_texts",
]
