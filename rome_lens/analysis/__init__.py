"""Analysis: why the model answers as it does, read off its residual stream.

This room holds the logit lens (:mod:`~rome_lens.analysis.lens`: what each
layer would predict if the model stopped there) and LLM-Microscope's metrics
(arXiv 2502.15007, 2405.12250): how linear each block is, for the whole corpus
and for each token (:mod:`~rome_lens.analysis.linearity`); what each layer
predicts for every token (:mod:`~rome_lens.analysis.predictions`); the
anisotropy and intrinsic dimension of each depth
(:mod:`~rome_lens.analysis.geometry`); and how much context each token holds
(:mod:`~rome_lens.analysis.context`). Every text and corpus is read
through :class:`rome_lens.core.corpus.Corpus`, every residual stream through
:func:`rome_lens.core.runtime.capture`. It imports only :mod:`rome_lens.core`.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis import intermediate_predictions, logit_lens
>>> model = tiny_model()
>>> lens = logit_lens(model, "The Eiffel Tower is in", targets=["Paris"], progress=False)
>>> lens.n_layers, lens.targets
(3, ['Paris'])
>>> intermediate_predictions(model, "The Eiffel Tower is in", progress=False).losses.shape
torch.Size([3, 5])
"""

from rome_lens.analysis.context import (
    ContextAdapter,
    ContextHyperParams,
    Contextualization,
    contextualization,
    train_context_adapter,
)
from rome_lens.analysis.context import (  # the names before 0.3 (see the CHANGELOG)
    Contextualisation as Contextualisation,
)
from rome_lens.analysis.context import (
    contextualisation as contextualisation,
)
from rome_lens.analysis.geometry import (
    Geometry,
    anisotropy,
    anisotropy_of,
    intrinsic_dimension,
    representation_geometry,
    two_nn_dimension,
)
from rome_lens.analysis.lens import LogitLens, lens_log_probs, logit_lens
from rome_lens.analysis.linearity import (
    LayerLinearity,
    LinearMaps,
    TokenNonlinearity,
    fit_linear_maps,
    layer_linearity,
    linearity_score,
    token_nonlinearity,
)
from rome_lens.analysis.predictions import IntermediatePredictions, intermediate_predictions
from rome_lens.analysis.states import States, residual_states, text_states

__all__ = [
    "ContextAdapter",
    "ContextHyperParams",
    "Contextualization",
    "Geometry",
    "IntermediatePredictions",
    "LayerLinearity",
    "LinearMaps",
    "LogitLens",
    "States",
    "TokenNonlinearity",
    "anisotropy",
    "anisotropy_of",
    "contextualization",
    "fit_linear_maps",
    "intermediate_predictions",
    "intrinsic_dimension",
    "layer_linearity",
    "lens_log_probs",
    "linearity_score",
    "logit_lens",
    "representation_geometry",
    "residual_states",
    "text_states",
    "token_nonlinearity",
    "train_context_adapter",
    "two_nn_dimension",
]
