"""Editing in a row: batch after batch written into the model, each undoable exactly.

A :class:`SequentialEditor` holds a model and writes each batch of facts you
give it, with the editor you chose, on the model as the earlier batches left
it:

* ``"alphaedit"`` (default): each batch's update lies in the null space of the
  unedited model's keys and respects the keys of every earlier batch, whose
  Σ KᵀK the editor keeps per layer (:mod:`rome_lens.editing.alphaedit`);
* ``"memit"``: MEMIT, batch by batch;
* ``"rome"``: ROME, one request at a time.

The key statistics C (and AlphaEdit's projectors) come from the unedited model
and serve every batch, as in the papers. :meth:`~SequentialEditor.revert_last`
undoes the last batch and :meth:`~SequentialEditor.revert_all` every batch,
bit for bit (the weights are copied back, not subtracted).

>>> import tempfile, torch, warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import AlphaEditHyperParams, EditRequest, SequentialEditor
>>> model = tiny_model()
>>> before = model.blocks[1].mlp.W_out.clone()
>>> editor = SequentialEditor(model, layers=[0, 1], cache_dir=tempfile.mkdtemp(),
...                           hparams=AlphaEditHyperParams(context_lengths=(), v_steps=2),
...                           mom2_n_tokens=500, progress=False)
>>> with warnings.catch_warnings(record=True):  # a random model may not take them
...     _ = editor.edit([EditRequest("{} is in", "The Eiffel Tower", "Rome")])
...     _ = editor.edit([EditRequest("{} is in", "The Louvre", "Berlin")])
>>> len(editor), sorted(editor.preserved)
(2, [0, 1])
>>> editor.revert_all()
>>> torch.equal(model.blocks[1].mlp.W_out, before)
True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal

import pandas as pd
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.editing.alphaedit import AlphaEditHyperParams, alphaedit_edit, null_space_projector
from rome_lens.editing.defaults import (
    default_alphaedit_layers,
    default_layer,
    default_memit_layers,
)
from rome_lens.editing.memit import MEMITHyperParams, MultiLayerEdit, check_layers, memit_edit
from rome_lens.editing.patches import AppliedEdit, WeightEdit
from rome_lens.editing.requests import EditHyperParams, EditRequest, check_hparams
from rome_lens.editing.rome import ROMEHyperParams, rome_edit
from rome_lens.stats.keys import KeyStats, checked_stats

__all__ = ["Method", "SequentialEditor"]

Method = Literal["alphaedit", "memit", "rome"]
_HPARAMS: dict[str, type[EditHyperParams]] = {
    "alphaedit": AlphaEditHyperParams,
    "memit": MEMITHyperParams,
    "rome": ROMEHyperParams,
}


class SequentialEditor:
    """Writes batch after batch of facts into one model, in place, and undoes them exactly.

    Args:
        model: the model to edit (changed in place by :meth:`edit`).
        method: ``"alphaedit"``, ``"memit"`` or ``"rome"``.
        layers: the MLP layers (``None``: the method's default for the model).
        hparams: the method's settings (``None``: its defaults).
        stats: key statistics of the unedited model per layer (``None``: loaded or
            computed, cached, before the first edit).
        mom2_n_tokens: tokens of key statistics when they are computed (``None``: the
            settings' value).
        cache_dir: the rome_lens cache folder.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: Model,
        method: Method = "alphaedit",
        *,
        layers: Sequence[int] | None = None,
        hparams: EditHyperParams | None = None,
        stats: dict[int, KeyStats] | None = None,
        mom2_n_tokens: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        if method not in _HPARAMS:
            raise ValueError(f"method must be one of {sorted(_HPARAMS)}, got {method!r}")
        hparams = _HPARAMS[method]() if hparams is None else hparams
        check_hparams(hparams, _HPARAMS[method])
        if mom2_n_tokens is not None:
            hparams = dataclasses.replace(hparams, mom2_n_tokens=mom2_n_tokens)
        if layers is None:
            defaults = {"memit": default_memit_layers, "alphaedit": default_alphaedit_layers}
            layers = [default_layer(model)] if method == "rome" else defaults[method](model)
        self.model = model
        self.method: Method = method
        self.hparams = hparams
        self.layers = check_layers(model, layers)
        if method == "rome" and len(self.layers) != 1:
            raise ValueError(f"ROME edits one layer, got layers={self.layers}")
        self.cache_dir = cache_dir
        self.progress = progress
        self.stats: dict[int, KeyStats] = {
            layer: checked_stats(model, layer, (stats or {}).get(layer),
                                 n_tokens=hparams.mom2_n_tokens, cache_dir=cache_dir,
                                 progress=progress)
            for layer in self.layers
            if method != "rome" or getattr(hparams, "mom2_adjustment", True)
        }  # fmt: skip
        self.projectors: dict[int, Tensor] = {}
        if isinstance(hparams, AlphaEditHyperParams) and method == "alphaedit":
            self.projectors = {
                layer: null_space_projector(self.stats[layer], hparams.null_space_energy)
                for layer in self.layers
            }
        self.preserved: dict[int, Tensor] = {}
        """Per layer, Σ KᵀK over the keys of every batch applied (AlphaEdit's ``cache_c``)."""
        self.batches: list[list[AppliedEdit]] = []
        """Each batch's applied edits, in order (one per request for ROME)."""

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def edits(self) -> list[WeightEdit]:
        """Every edit applied, in order."""
        return [applied.edit for batch in self.batches for applied in batch]

    @property
    def requests(self) -> list[EditRequest]:
        """Every request written, in order."""
        return [request for edit in self.edits for request in edit.requests]

    def edit(self, requests: Sequence[EditRequest]) -> list[WeightEdit]:
        """Write a batch into the model as it stands, and keep it applied.

        A batch that fails (bad input, an interrupt) leaves the model as the
        earlier batches left it.

        Args:
            requests: the facts of this batch.

        Returns:
            The batch's edits: one for AlphaEdit and MEMIT, one per request for ROME.
        """
        requests = list(requests)
        if not requests:
            raise ValueError("a batch needs at least one EditRequest, got none")
        applied: list[AppliedEdit] = []
        try:
            if self.method == "rome":
                assert isinstance(self.hparams, ROMEHyperParams)
                layer = self.layers[0]
                for request in requests:
                    edit = rome_edit(
                        self.model,
                        request,
                        layer=layer,
                        hparams=self.hparams,
                        stats=self._stats(layer),
                        cache_dir=self.cache_dir,
                        progress=self.progress,
                    )
                    applied.append(edit.apply(self.model))
            else:
                applied.append(self._multi_layer(requests).apply(self.model))
        except BaseException:
            for handle in reversed(applied):
                handle.revert()
            raise
        self.batches.append(applied)
        for layer, outer in self._key_outer(applied).items():
            self.preserved[layer] = (
                self.preserved[layer] + outer if layer in self.preserved else outer
            )
        return [handle.edit for handle in applied]

    def revert_last(self) -> list[WeightEdit]:
        """Undo the last batch, bit for bit.

        Returns:
            The batch's edits.
        """
        if not self.batches:
            raise ValueError("no batch to revert: nothing has been edited")
        batch = self.batches.pop()
        for handle in reversed(batch):
            handle.revert()
        self.preserved = self._key_outer([h for earlier in self.batches for h in earlier])
        return [handle.edit for handle in batch]

    def revert_all(self) -> None:
        """Undo every batch, last first: the weights are the unedited model's, bit for bit."""
        while self.batches:
            self.revert_last()

    def to_dataframe(self) -> pd.DataFrame:
        """One row per request written: its batch, and whether it took when written."""
        rows = []
        for number, batch in enumerate(self.batches):
            for handle in batch:
                for outcome in handle.edit.outcomes:
                    rows.append({"batch": number} | dataclasses.asdict(outcome))
        return pd.DataFrame(rows)

    def _multi_layer(self, requests: list[EditRequest]) -> MultiLayerEdit:
        if self.method == "alphaedit":
            assert isinstance(self.hparams, AlphaEditHyperParams)
            return alphaedit_edit(
                self.model,
                requests,
                layers=self.layers,
                hparams=self.hparams,
                preserved=self.preserved or None,
                projectors=self.projectors,
                cache_dir=self.cache_dir,
                progress=self.progress,
            )
        assert isinstance(self.hparams, MEMITHyperParams)
        stats = {layer: s for layer in self.layers if (s := self._stats(layer)) is not None}
        return memit_edit(
            self.model,
            requests,
            layers=self.layers,
            hparams=self.hparams,
            stats=stats,
            cache_dir=self.cache_dir,
            progress=self.progress,
        )

    def _stats(self, layer: int) -> KeyStats | None:
        """The unedited model's statistics, vouched for as the edited model's."""
        stats = self.stats.get(layer)
        return None if stats is None else stats.carried_to(self.model)

    def _key_outer(self, handles: list[AppliedEdit]) -> dict[int, Tensor]:
        """Σ KᵀK per layer over the keys of ``handles`` (AlphaEdit only; recomputed rather
        than subtracted on revert, so nothing is left over)."""
        totals: dict[int, Tensor] = {}
        if self.method != "alphaedit":
            return totals
        for handle in handles:
            assert isinstance(handle.edit, MultiLayerEdit)
            for layer, keys in handle.edit.keys.items():
                outer = keys.double().T @ keys.double()
                totals[layer] = totals[layer] + outer if layer in totals else outer
        return totals
