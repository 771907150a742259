"""The core: loading models, running them, reading text, hooks, caches and results.

Everything else in rome_lens is built on these pieces, and this room imports
nothing else of rome_lens. It holds:

* :mod:`~rome_lens.core.models`: the offline default model and ``tiny_model()``;
* :mod:`~rome_lens.core.tokens`: prompts, subject token ranges, target tokens;
* :mod:`~rome_lens.core.hooks`: every hook rome_lens attaches, and ``attached``;
* :mod:`~rome_lens.core.runtime`: weight layout, frozen weights, padding,
  capturing activations, running to a layer, unembedding chosen rows;
* :mod:`~rome_lens.core.corpus`: documents or model samples, chunked and batched;
* :mod:`~rome_lens.core.generation` and :mod:`~rome_lens.core.predict`:
  seeded sampling and batched next-token predictions;
* :mod:`~rome_lens.core.cache`, :mod:`~rome_lens.core.fingerprint` and
  :mod:`~rome_lens.core.results`: the checked on-disk cache, model
  fingerprints, and the interface every result shares;
* :mod:`~rome_lens.core.cost`: what the heavy pieces of rome_lens cost (FLOPs,
  memory, disk) on a model of any size, from its shape alone.

>>> from rome_lens.core import predict_next, tiny_model
>>> model = tiny_model()
>>> preds = predict_next(model, ["The Eiffel Tower is in"], targets=["Paris"])
>>> preds.target_prob.shape
torch.Size([1])
"""

from rome_lens.core.cache import CacheError, cache_dir
from rome_lens.core.corpus import Corpus
from rome_lens.core.cost import Cost, ModelShape, estimate_cost
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.models import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    load_model,
    load_model_path,
    save_model,
    tiny_model,
)
from rome_lens.core.predict import NextTokenPredictions, known_facts, predict_next, target_nll
from rome_lens.core.results import Result

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_NAME",
    "CacheError",
    "Corpus",
    "Cost",
    "ModelShape",
    "NextTokenPredictions",
    "Result",
    "cache_dir",
    "estimate_cost",
    "known_facts",
    "load_model",
    "load_model_path",
    "model_fingerprint",
    "predict_next",
    "save_model",
    "target_nll",
    "tiny_model",
]
