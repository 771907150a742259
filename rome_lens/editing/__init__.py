"""Editing: write facts into ``blocks.{L}.mlp.W_out``, check they took, undo them exactly.

This room holds the editors (ROME's rank-one update, MEMIT's multi-layer batch
update, AlphaEdit's null-space update, the FT+L fine-tuning baseline), each one
implementation of one protocol (:class:`Editor`, in :mod:`~rome_lens.editing.editors`)
found by name in one registry (:func:`get_editor`, :func:`register_editor`);
the editor that writes batch after batch with any of them
(:class:`SequentialEditor`); what they share (requests and one tree of
settings, contexts, keys and the optimised values, MEMIT's and AlphaEdit's
multi-layer pipeline, the per-model defaults); and the reversible weight
patches every editor returns. It imports :mod:`rome_lens.core` and
:mod:`rome_lens.stats` (key statistics), nothing above.

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
>>> from rome_lens.editing import editors
>>> sorted(editors())  # every editor, by the name evaluate_edits and the CLI know it by
['alphaedit', 'ft', 'memit', 'rome']
"""

from rome_lens.editing.alphaedit import (
    AlphaEditEditor,
    AlphaEditHyperParams,
    NullSpaceState,
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
from rome_lens.editing.editors import BaseEditor, Editor, EditorState, editor_settings
from rome_lens.editing.finetune import FTEditor, FTHyperParams, ft_edit
from rome_lens.editing.memit import MEMITEditor, MEMITHyperParams, memit_edit, memit_update
from rome_lens.editing.memory import clear_context_templates, context_templates
from rome_lens.editing.multilayer import (
    LayerSolve,
    MultiLayerEdit,
    MultiLayerEditor,
    MultiLayerHyperParams,
    MultiLayerState,
    anchored_targets,
)
from rome_lens.editing.outcomes import EditMissWarning, measure_outcomes
from rome_lens.editing.patches import (
    AppliedEdit,
    EditOutcome,
    WeightEdit,
    WeightPatch,
    edited,
    weights_as,
)
from rome_lens.editing.registry import editors, get_editor, register_editor, unregister_editor
from rome_lens.editing.requests import EditHyperParams, EditorSettings, EditRequest
from rome_lens.editing.rome import RankOneEdit, ROMEEditor, ROMEHyperParams, rome_edit
from rome_lens.editing.sequential import SequentialEditor

__all__ = [
    "DEFAULT_ALPHAEDIT_LAYERS",
    "DEFAULT_LAYERS",
    "DEFAULT_MEMIT_LAYERS",
    "DEFAULT_MOM2_UPDATE_WEIGHTS",
    "AlphaEditEditor",
    "AlphaEditHyperParams",
    "AppliedEdit",
    "BaseEditor",
    "EditHyperParams",
    "EditMissWarning",
    "EditOutcome",
    "EditRequest",
    "Editor",
    "EditorSettings",
    "EditorState",
    "FTEditor",
    "FTHyperParams",
    "LayerSolve",
    "MEMITEditor",
    "MEMITHyperParams",
    "MultiLayerEdit",
    "MultiLayerEditor",
    "MultiLayerHyperParams",
    "MultiLayerState",
    "NullSpaceState",
    "ROMEEditor",
    "ROMEHyperParams",
    "RankOneEdit",
    "SequentialEditor",
    "WeightEdit",
    "WeightPatch",
    "alphaedit_edit",
    "anchored_targets",
    "clear_context_templates",
    "context_templates",
    "default_alphaedit_layers",
    "default_layer",
    "default_memit_layers",
    "default_mom2_update_weight",
    "edited",
    "editor_settings",
    "editors",
    "ft_edit",
    "get_editor",
    "measure_outcomes",
    "memit_edit",
    "memit_update",
    "null_space_projector",
    "null_space_update",
    "register_editor",
    "rome_edit",
    "unregister_editor",
    "weights_as",
]
