"""Which layers the editors edit in a model, from its name and depth alone.

The editors (``rome_lens.editing.defaults``) read these for a loaded model; the
cost model (``rome_lens.core.cost``) reads them for a model known only by its
configuration. The values for GPT-2 and GPT-J are the papers'; those for the
default model (SmolLM2-135M-Instruct) were chosen by causal tracing and by the
benchmarks in ``bench/``. A model missing from a table gets a rule of thumb:
ROME edits the layer a third of the way in, and MEMIT that layer and up to four
before it.

>>> from rome_lens.core.layers import default_layers_for
>>> default_layers_for("rome", "gpt2-xl", 48), default_layers_for("memit", "gpt2-xl", 48)
([17], [13, 14, 15, 16, 17])
>>> default_layers_for("rome", "my-model", 12), default_layers_for("memit", "my-model", 12)
([4], [0, 1, 2, 3, 4])
"""

from __future__ import annotations

from rome_lens.core.models import DEFAULT_MODEL_NAME

__all__ = [
    "DEFAULT_ALPHAEDIT_LAYERS",
    "DEFAULT_LAYERS",
    "DEFAULT_MEMIT_LAYERS",
    "default_layers_for",
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


def default_layers_for(editor: str, model_name: str, n_layers: int) -> list[int]:
    """The layers an editor edits by default in a model of this name and depth.

    ROME's is :data:`DEFAULT_LAYERS`, else the layer a third of the way in;
    MEMIT's are :data:`DEFAULT_MEMIT_LAYERS`, else ROME's and the (up to) four
    before it; AlphaEdit's are :data:`DEFAULT_ALPHAEDIT_LAYERS`, else MEMIT's. A
    listed entry that does not fit the model's depth is passed over.

    Args:
        editor: ``"rome"``, ``"memit"`` or ``"alphaedit"``.
        model_name: the model's ``cfg.model_name``.
        n_layers: its number of blocks.

    Returns:
        The layers, ascending (one for ROME).
    """
    rome = DEFAULT_LAYERS.get(model_name)
    if rome is None or rome >= n_layers:
        rome = round(n_layers / 3)
    if editor == "rome":
        return [rome]
    memit = _listed(DEFAULT_MEMIT_LAYERS, model_name, n_layers)
    memit = memit or list(range(max(0, rome - 4), rome + 1))
    if editor == "memit":
        return memit
    if editor == "alphaedit":
        return _listed(DEFAULT_ALPHAEDIT_LAYERS, model_name, n_layers) or memit
    raise ValueError(f"editor must be 'rome', 'memit' or 'alphaedit', got {editor!r}")


def _listed(table: dict[str, list[int]], model_name: str, n_layers: int) -> list[int] | None:
    """The layers ``table`` lists for the model, if listed and all within it."""
    layers = table.get(model_name)
    return list(layers) if layers is not None and layers[-1] < n_layers else None
