"""Per-model defaults of the editors: which layers to edit, and MEMIT's λ.

The layer tables and their rules live in :mod:`rome_lens.core.layers`, which
the cost model reads too; they are re-exported here.

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
from rome_lens.core.layers import (
    DEFAULT_ALPHAEDIT_LAYERS,
    DEFAULT_LAYERS,
    DEFAULT_MEMIT_LAYERS,
    default_layers_for,
)
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
    return default_layers_for("rome", model.cfg.model_name, model.cfg.n_layers)[0]


def default_memit_layers(model: Model) -> list[int]:
    """:data:`DEFAULT_MEMIT_LAYERS`, else ROME's default layer and the (up to) four before it.

    Args:
        model: any TransformerLens model.

    Returns:
        The layers, ascending.
    """
    return default_layers_for("memit", model.cfg.model_name, model.cfg.n_layers)


def default_alphaedit_layers(model: Model) -> list[int]:
    """AlphaEdit's layers: :data:`DEFAULT_ALPHAEDIT_LAYERS`, else MEMIT's.

    Args:
        model: any TransformerLens model.

    Returns:
        The layers, ascending (see :func:`default_memit_layers` for a model not listed).
    """
    return default_layers_for("alphaedit", model.cfg.model_name, model.cfg.n_layers)


def default_mom2_update_weight(model: Model) -> float:
    """MEMIT's λ for ``model``: :data:`DEFAULT_MOM2_UPDATE_WEIGHTS`, else 15,000.

    Args:
        model: any TransformerLens model.

    Returns:
        λ.
    """
    return DEFAULT_MOM2_UPDATE_WEIGHTS.get(model.cfg.model_name, FALLBACK_MOM2_UPDATE_WEIGHT)
