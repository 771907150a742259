"""rome_lens: find where a TransformerLens model stores a fact, and rewrite it.

Find it with causal tracing (:func:`trace_fact`), rewrite it with ROME
(:func:`rome_edit`) or thousands at once with MEMIT (:func:`memit_edit`), check it
with CounterFact (:func:`evaluate_edits`), watch it layer by layer with the
logit lens (:func:`logit_lens`), undo it exactly (:func:`edited`,
``edit.apply(model).revert()``), and see every result in a notebook or an
offline page (:mod:`rome_lens.viz`).

>>> import rome_lens
>>> model = rome_lens.tiny_model()
>>> trace = rome_lens.trace_fact(model, "The Eiffel Tower is located in the city of",
...                              "The Eiffel Tower", samples=2, progress=False)
>>> tuple(trace.scores.shape)  # (kind, token, layer)
(3, 10, 3)
"""

from rome_lens import viz
from rome_lens.evaluate import evaluate_edits, load_counterfact, summarize, without_conflicts
from rome_lens.finetune import FTHyperParams, ft_edit
from rome_lens.lens import LogitLens, logit_lens
from rome_lens.memit import MEMITHyperParams, MultiLayerEdit, memit_edit
from rome_lens.models import DEFAULT_MODEL, load_model, tiny_model
from rome_lens.patches import AppliedEdit, WeightEdit, WeightPatch, edited
from rome_lens.rome import EditRequest, RankOneEdit, ROMEHyperParams, rome_edit
from rome_lens.stats import KeyStats, key_second_moment
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
    "AppliedEdit",
    "AverageEffects",
    "CausalTrace",
    "EditRequest",
    "FTHyperParams",
    "KeyStats",
    "LogitLens",
    "MEMITHyperParams",
    "MultiLayerEdit",
    "ROMEHyperParams",
    "RankOneEdit",
    "SeveredTrace",
    "WeightEdit",
    "WeightPatch",
    "average_causal_effects",
    "edited",
    "embedding_noise_scale",
    "evaluate_edits",
    "ft_edit",
    "key_second_moment",
    "load_counterfact",
    "load_model",
    "logit_lens",
    "memit_edit",
    "rome_edit",
    "summarize",
    "tiny_model",
    "trace_fact",
    "trace_severed",
    "viz",
    "without_conflicts",
]

__version__ = "0.1.0"
