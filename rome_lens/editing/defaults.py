"""Per-model defaults of the editors: which layers to edit, and MEMIT's λ.

The values for GPT-2 and GPT-J are the papers'; those for the default model
(SmolLM2-135M-Instruct) were chosen by causal tracing and by the benchmarks in
``bench/`` (see ``docs/editing.md`` and ``docs/mass_editing.md``). A model
missing from a table gets a rule of thumb: ROME edits the layer a third of the
way in, and MEMIT that layer and up to four before it.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing.defaults import (
...     default_alphaedit_layers, default_layer, default_memit_layers)
>>> model = tiny_model()  # 3 layers, not in the tables
>>> default_layer(model), default_memit_layers(model), default_alphaedit_layers(model)
(1, [0, 1], [0, 1])
"""

from __future__ import annotations

from rome_lens.core.backend import Model
from rome_lens.core.models import DEFAULT_MODEL_NAME

__all__ = [
    "DEFAULT_ALPHAEDIT_LAYERS",
    "DEFAULT_LAYERS",
    "DEFAULT_MEMIT_LAYERS",
    "DEFAULT_MOM2_UPDATE_WEIGHTS",
    "FALLBACK_MOM2_UPDATE_WEIGHT",
    "default_alphaedit_layers",
    "default_layer",
    "default_memit_layers",
    "default_mom2_update_weight",
]

# Layers ROME edits by default, by model_name.
DEFAULT_LAYERS: dict[str, int] = {
    "gpt2-medium": 8,
    "gpt2-large": 12,
    "gpt2-xl": 17,
    "gpt-j-6B": 5,
    "gpt-neox-20b": 15,
    DEFAULT_MODEL_NAME: 2,
}
# Layers MEMIT edits by default, by model_name.
DEFAULT_MEMIT_LAYERS: dict[str, list[int]] = {
    "gpt2-xl": [13, 14, 15, 16, 17],
    "gpt-j-6B": [3, 4, 5, 6, 7, 8],
    DEFAULT_MODEL_NAME: [1, 2, 3, 4],
}
# Layers AlphaEdit edits by default, by model_name (a model missing here: MEMIT's).
DEFAULT_ALPHAEDIT_LAYERS: dict[str, list[int]] = {
    DEFAULT_MODEL_NAME: [1, 2, 3, 4, 5, 6, 7, 8],
}
# MEMIT's λ (mom2_update_weight), by model_name.
DEFAULT_MOM2_UPDATE_WEIGHTS: dict[str, float] = {
    "gpt2-xl": 20_000.0,
    "gpt-j-6B": 15_000.0,
    DEFAULT_MODEL_NAME: 1_000.0,
}
FALLBACK_MOM2_UPDATE_WEIGHT = 15_000.0  # λ for models missing from the table


def default_layer(model: Model) -> int:
    """The layer ROME edits in ``model``: :data:`DEFAULT_LAYERS`, else a third of the way in.

    Args:
        model: any TransformerLens model.

    Returns:
        The layer.
    """
    name = model.cfg.model_name
    if name in DEFAULT_LAYERS and DEFAULT_LAYERS[name] < model.cfg.n_layers:
        return DEFAULT_LAYERS[name]
    return round(model.cfg.n_layers / 3)


def default_memit_layers(model: Model) -> list[int]:
    """:data:`DEFAULT_MEMIT_LAYERS`, else ROME's default layer and the (up to) four before it.

    Args:
        model: any TransformerLens model.

    Returns:
        The layers, ascending.
    """
    last = default_layer(model)
    fallback = list(range(max(0, last - 4), last + 1))
    return _listed(DEFAULT_MEMIT_LAYERS, model) or fallback


def default_alphaedit_layers(model: Model) -> list[int]:
    """AlphaEdit's layers: :data:`DEFAULT_ALPHAEDIT_LAYERS`, else MEMIT's.

    Args:
        model: any TransformerLens model.

    Returns:
        The layers, ascending (see :func:`default_memit_layers` for a model not listed).
    """
    return _listed(DEFAULT_ALPHAEDIT_LAYERS, model) or default_memit_layers(model)


def _listed(table: dict[str, list[int]], model: Model) -> list[int] | None:
    """``model``'s layers in ``table``, if listed and all within the model."""
    layers = table.get(model.cfg.model_name)
    return list(layers) if layers is not None and layers[-1] < model.cfg.n_layers else None


def default_mom2_update_weight(model: Model) -> float:
    """MEMIT's λ for ``model``: :data:`DEFAULT_MOM2_UPDATE_WEIGHTS`, else 15,000.

    Args:
        model: any TransformerLens model.

    Returns:
        λ.
    """
    return DEFAULT_MOM2_UPDATE_WEIGHTS.get(model.cfg.model_name, FALLBACK_MOM2_UPDATE_WEIGHT)
