"""Editing in a row: batch after batch written into the model, each undoable exactly.

A :class:`SequentialEditor` holds a model and writes each batch of facts you
give it, with any registered editor (:mod:`rome_lens.editing.registry`, or an
:class:`~rome_lens.editing.editors.Editor` object), on the model as the earlier
batches left it:

* ``"alphaedit"`` (default): each batch's update lies in the null space of the
  unedited model's keys and respects the keys of every earlier batch, whose
  Σ KᵀK the editor's state keeps per layer (:mod:`rome_lens.editing.alphaedit`);
* ``"memit"``: MEMIT, batch by batch;
* ``"rome"``, ``"ft"`` and any editor that writes one request per edit: one
  request at a time.

The editor's state (:class:`~rome_lens.editing.editors.EditorState`) is made
once, from the unedited model: its key statistics C (and AlphaEdit's
projectors) serve every batch, as in the papers, and each applied edit makes
the next state (``state.after(edit)``). :meth:`~SequentialEditor.revert_last`
undoes the last batch and goes back to the state before it;
:meth:`~SequentialEditor.revert_all` undoes every batch, bit for bit (the
weights are copied back, not subtracted).

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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from rome_lens.core.backend import Model, weight
from rome_lens.editing.editors import Editor, EditorState, editor_settings
from rome_lens.editing.patches import AppliedEdit, WeightEdit
from rome_lens.editing.registry import get_editor
from rome_lens.editing.requests import EditorSettings, EditRequest
from rome_lens.stats.keys import KeyStats

__all__ = ["Method", "SequentialEditor"]

Method = Literal["alphaedit", "memit", "rome", "ft"]
"""The built-in editors' names; any registered name, or an editor, is accepted too."""


class SequentialEditor:
    """Writes batch after batch of facts into one model, in place, and undoes them exactly.

    Args:
        model: the model to edit (changed in place by :meth:`edit`).
        method: a registered editor's name (``"alphaedit"``, ``"memit"``, ``"rome"``,
            ``"ft"``, or one of your own), or an editor.
        layers: the MLP layers (``None``: the editor's default for the model).
        hparams: the editor's settings (``None``: its defaults).
        stats: key statistics of the unedited model per layer (``None``: loaded or
            computed, cached, before the first edit).
        mom2_n_tokens: tokens of key statistics when they are computed (``None``: the
            settings' value).
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cache.
        progress: show progress bars.
        preserve: key statistics per layer whose keys every batch preserves, e.g. of the
            prompts of facts the model should keep (``key_second_moment(model, layer,
            corpus=prompts)``): each of their keys joins the state's Σ KᵀK as if an
            earlier edit had written it (AlphaEdit reads it; MEMIT with ``history=True``).
        held_out: key statistics per layer on which :meth:`layer_dataframe` measures how
            much each update changes the layer's output (``None``: the state's own C).
    """

    def __init__(
        self,
        model: Model,
        method: str | Editor = "alphaedit",
        *,
        layers: Sequence[int] | None = None,
        hparams: EditorSettings | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        mom2_n_tokens: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        progress: bool = True,
        preserve: Mapping[int, KeyStats] | None = None,
        held_out: Mapping[int, KeyStats] | None = None,
    ) -> None:
        self.editor = get_editor(method)
        """The editor that computes each edit."""
        settings = editor_settings(self.editor, hparams)
        if mom2_n_tokens is not None:
            settings = _with_n_tokens(settings, mom2_n_tokens)
        self.model = model
        self.hparams = settings
        """The editor's settings."""
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.progress = progress
        self.state = self.editor.start(
            model,
            settings,
            layers=layers,
            stats=stats,
            cache_dir=cache_dir,
            use_cache=use_cache,
            progress=progress,
        )
        """What the next batch is edited from (its statistics are the unedited model's)."""
        if preserve:
            self.state = preserving(self.state, model, preserve)
        self.held_out = dict(held_out) if held_out is not None else dict(self.state.stats)
        """Key statistics per layer that :meth:`layer_dataframe` measures output change on."""
        self.batches: list[list[AppliedEdit]] = []
        """Each batch's applied edits, in order (one per request for a one-request editor)."""
        self._earlier: list[EditorState] = []  # the state before each batch, to revert to
        self._norms: list[list[dict[str, Any]]] = []  # per batch, one row per weight written
        self._starting: dict[str, Tensor] = {}  # each weight before its first edit

    @property
    def method(self) -> str:
        """The editor's name."""
        return self.editor.name

    @property
    def layers(self) -> list[int]:
        """The MLP layers edited."""
        return list(self.state.layers)

    @property
    def stats(self) -> dict[int, KeyStats]:
        """The unedited model's key statistics, per layer."""
        return dict(self.state.stats)

    @property
    def projectors(self) -> dict[int, Tensor]:
        """AlphaEdit's null-space projectors per layer (empty for other editors)."""
        return dict(getattr(self.state, "projectors", {}))

    @property
    def preserved(self) -> dict[int, Tensor]:
        """Per layer, Σ KᵀK over the keys of every batch applied, plus any ``preserve``
        given (AlphaEdit's ``cache_c``; MEMIT keeps it too and reads it with
        ``history=True``; empty for one-request editors). Setting it changes what the
        next batch preserves."""
        return dict(getattr(self.state, "preserved", {}))

    @preserved.setter
    def preserved(self, value: Mapping[int, Tensor]) -> None:
        if not hasattr(self.state, "preserved"):
            raise AttributeError(f"{self.method} keeps no preserved keys")
        self.state = dataclasses.replace(self.state, preserved=dict(value))  # type: ignore[call-arg]

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

        A batch that fails (bad input, an interrupt) leaves the model, and the
        state, as the earlier batches left them.

        Args:
            requests: the facts of this batch.

        Returns:
            The batch's edits: one for a batched editor (AlphaEdit, MEMIT), one per
            request for the others (ROME, FT+L).
        """
        requests = list(requests)
        if not requests:
            raise ValueError("a batch needs at least one EditRequest, got none")
        chunks = [requests] if self.editor.batched else [[request] for request in requests]
        applied: list[AppliedEdit] = []
        state = self.state
        rows: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                edit = self.editor.edit(
                    self.model,
                    chunk,
                    self.hparams,
                    state=state.carried_to(self.model),
                    cache_dir=self.cache_dir,
                    use_cache=self.use_cache,
                    progress=self.progress,
                )
                handle = edit.apply(self.model)
                applied.append(handle)
                rows += self._norm_rows(handle)
                state = state.after(edit)
        except BaseException:
            for handle in reversed(applied):
                handle.revert()
            raise
        self.batches.append(applied)
        self._earlier.append(self.state)
        self._norms.append(rows)
        self.state = state
        return [handle.edit for handle in applied]

    def _norm_rows(self, handle: AppliedEdit) -> list[dict[str, Any]]:
        """Per weight one applied edit wrote: its ΔW's size, and how far the weight has
        moved from where the run started (see :meth:`layer_dataframe`)."""
        rows = []
        for name, before in handle.originals.items():
            start = self._starting.setdefault(name, before)
            after = weight(self.model, name).detach().double()
            before_, start_ = before.double(), start.to(after.device, torch.float64)
            change = after - before_
            layer = int(name.split(".")[1])
            rows.append({
                "batch": len(self.batches),
                "layer": layer,
                "parameter": name,
                "delta_norm": float(change.norm()),
                "relative_delta": float(change.norm() / before_.norm()),
                "drift": float((after - start_).norm() / start_.norm()),
                "output_change": _output_change(change, before_, self.held_out.get(layer)),
            })  # fmt: skip
        return rows

    def revert_last(self) -> list[WeightEdit]:
        """Undo the last batch, bit for bit, and go back to the state before it.

        Returns:
            The batch's edits.
        """
        if not self.batches:
            raise ValueError("no batch to revert: nothing has been edited")
        batch = self.batches.pop()
        for handle in reversed(batch):
            handle.revert()
        self.state = self._earlier.pop()
        self._norms.pop()
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

    def layer_dataframe(self) -> pd.DataFrame:
        """One row per batch and weight it wrote, to see where a collapse starts.

        Columns: ``batch``, ``layer``, ``parameter``; ``delta_norm`` ‖ΔW‖ (summed over
        the batch's edits of that weight for a one-request editor, row by row);
        ``relative_delta`` ‖ΔW‖ / ‖W‖ with W before the edit; ``drift``
        ‖W − W₀‖ / ‖W₀‖, W₀ the weight before the run's first edit; ``output_change``
        ‖ΔW K₀‖ / ‖W K₀‖ over the held-out keys K₀ (``held_out``), from their second
        moment: sqrt(tr(ΔWᵀ C₀ ΔW) / tr(Wᵀ C₀ W)); NaN for a layer without one.
        """
        return pd.DataFrame([row for batch in self._norms for row in batch])


def preserving(state: EditorState, model: Model, preserve: Mapping[int, KeyStats]) -> EditorState:
    """``state`` with the keys of ``preserve`` added to its Σ KᵀK (count × C per layer).

    Args:
        state: an editor's state with ``preserved`` keys.
        model: the model the statistics must belong to.
        preserve: key statistics per layer, each of a layer the state edits.

    Returns:
        The new state.

    Raises:
        AttributeError: the editor keeps no preserved keys.
        ValueError: a layer the state does not edit, or statistics of another model.
    """
    if not hasattr(state, "preserved"):
        raise AttributeError(f"{type(state).__name__} keeps no preserved keys to add to")
    preserved = dict(state.preserved)
    for layer, stats in preserve.items():
        if layer not in state.layers:
            raise ValueError(f"preserve has layer {layer}, not one of {list(state.layers)}")
        stats.check(model, layer)
        added = stats.n_tokens * stats.moment.double()
        preserved[layer] = preserved[layer] + added if layer in preserved else added
    return dataclasses.replace(state, preserved=preserved)  # type: ignore[call-arg]


def _output_change(change: Tensor, before: Tensor, held_out: KeyStats | None) -> float:
    """sqrt(tr(ΔWᵀ C₀ ΔW) / tr(Wᵀ C₀ W)): ‖ΔW k‖ against ‖W k‖ over keys k with moment C₀."""
    if held_out is None:
        return float("nan")
    moment = held_out.moment.to(change.device, torch.float64)
    num = (change * (moment @ change)).sum()
    den = (before * (moment @ before)).sum()
    return float((num / den).sqrt())


def _with_n_tokens(settings: Any, n_tokens: int) -> Any:
    """``settings`` with ``mom2_n_tokens`` replaced, for an editor that reads statistics."""
    if not any(f.name == "mom2_n_tokens" for f in dataclasses.fields(settings)):
        raise ValueError(
            f"mom2_n_tokens was given, but {type(settings).__name__} has no statistics"
        )
    return dataclasses.replace(settings, mom2_n_tokens=n_tokens)
