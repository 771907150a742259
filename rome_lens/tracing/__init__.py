"""Causal tracing: where does a model recall a fact? (ROME, arXiv 2202.05262)

Noise the subject's embeddings, restore one clean state at a time, and see
where the answer comes back. This room holds the results
(:mod:`rome_lens.tracing.results`) and the fast, exact engine that computes
them (:mod:`rome_lens.tracing.engine`). It imports only :mod:`rome_lens.core`.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.tracing import trace_fact
>>> model = tiny_model()
>>> with warnings.catch_warnings(record=True) as caught:  # a random model knows no fact
...     warnings.simplefilter("always")
...     trace = trace_fact(model, "The Eiffel Tower is located in the city of",
...                        "The Eiffel Tower", samples=2, progress=False)
>>> tuple(trace.scores.shape)  # (kind, token, layer)
(3, 10, 3)
>>> caught[0].category.__name__
'UnreliableTraceWarning'
"""

from rome_lens.tracing.engine import (
    KINDS,
    average_causal_effects,
    embedding_noise_scale,
    trace_fact,
    trace_severed,
    window_layers,
)
from rome_lens.tracing.results import (
    TOKEN_GROUPS,
    AverageEffects,
    CausalTrace,
    SeveredTrace,
    TracePeak,
    UnreliableTraceWarning,
)

__all__ = [
    "KINDS",
    "TOKEN_GROUPS",
    "AverageEffects",
    "CausalTrace",
    "SeveredTrace",
    "TracePeak",
    "UnreliableTraceWarning",
    "average_causal_effects",
    "embedding_noise_scale",
    "trace_fact",
    "trace_severed",
    "window_layers",
]
