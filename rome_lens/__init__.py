"""rome_lens: find where a TransformerLens model stores a fact, and rewrite it.

>>> import rome_lens
>>> model = rome_lens.tiny_model()
>>> trace = rome_lens.trace_fact(model, "The Eiffel Tower is located in the city of",
...                              "The Eiffel Tower", samples=2, progress=False)
>>> tuple(trace.scores.shape)  # (kind, token, layer)
(3, 10, 3)
"""

from rome_lens.models import DEFAULT_MODEL, load_model, tiny_model
from rome_lens.tracing import (
    AverageEffects,
    CausalTrace,
    SeveredTrace,
    average_causal_effects,
    embedding_noise_scale,
    trace_fact,
    trace_severed,
)

__all__ = [
    "DEFAULT_MODEL",
    "AverageEffects",
    "CausalTrace",
    "SeveredTrace",
    "average_causal_effects",
    "embedding_noise_scale",
    "load_model",
    "tiny_model",
    "trace_fact",
    "trace_severed",
]

__version__ = "0.1.0"
