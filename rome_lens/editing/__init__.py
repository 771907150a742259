"""Editing: write facts into ``blocks.{L}.mlp.W_out``, check they took, undo them exactly.

This room holds the editors (ROME's rank-one update, MEMIT's multi-layer batch
update, AlphaEdit's null-space update and the editor that writes batch after
batch, the FT+L fine-tuning baseline), what they share (requests and
settings, contexts, keys and the optimised values, the per-model defaults),
and the reversible weight patches every editor returns. It imports
:mod:`rome_lens.core` and :mod:`rome_lens.stats` (key statistics), nothing above.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import EditRequest, ROMEHyperParams, edited, rome_edit
>>> model = tiny_model()
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> with warnings.catch_warnings(record=True):
...     edit = rome_edit(model, request, layer=1, progress=False,
...                      hparams=ROMEHyperParams(mom2_adjustment=False, context_lengths=()))
>>> edit.requests == [request], list(edit.deltas())
(True, ['blocks.1.mlp.W_out'])
>>> with edited(model, edit):  # the weights come back bit for bit on exit
...     pass
"""

from rome_lens.editing.alphaedit import (
    AlphaEditHyperParams,
    alphaedit_edit,
    null_space_projector,
    null_space_update,
)
from rome_lens.editing.defaults import (
    DEFAULT_ALPHAEDIT_LAYERS,
    DEFAULT_LAYERS,
    DEFAULT_MEMIT_LAYERS,
    DEFAULT_MOM2_UPDATE_WEIGHTS,
    default_alphaedit_layers,
    default_layer,
    default_memit_layers,
    default_mom2_update_weight,
)
from rome_lens.editing.finetune import FTHyperParams, ft_edit
from rome_lens.editing.memit import MEMITHyperParams, MultiLayerEdit, memit_edit
from rome_lens.editing.memory import clear_context_templates, context_templates
from rome_lens.editing.outcomes import EditMissWarning, measure_outcomes
from rome_lens.editing.patches import AppliedEdit, EditOutcome, WeightEdit, WeightPatch, edited
from rome_lens.editing.requests import EditHyperParams, EditRequest
from rome_lens.editing.rome import RankOneEdit, ROMEHyperParams, rome_edit
from rome_lens.editing.sequential import SequentialEditor

__all__ = [
    "DEFAULT_ALPHAEDIT_LAYERS",
    "DEFAULT_LAYERS",
    "DEFAULT_MEMIT_LAYERS",
    "DEFAULT_MOM2_UPDATE_WEIGHTS",
    "AlphaEditHyperParams",
    "AppliedEdit",
    "EditHyperParams",
    "EditMissWarning",
    "EditOutcome",
    "EditRequest",
    "FTHyperParams",
    "MEMITHyperParams",
    "MultiLayerEdit",
    "ROMEHyperParams",
    "RankOneEdit",
    "SequentialEditor",
    "WeightEdit",
    "WeightPatch",
    "alphaedit_edit",
    "clear_context_templates",
    "context_templates",
    "default_alphaedit_layers",
    "default_layer",
    "default_memit_layers",
    "default_mom2_update_weight",
    "edited",
    "ft_edit",
    "measure_outcomes",
    "memit_edit",
    "null_space_projector",
    "null_space_update",
    "rome_edit",
]
