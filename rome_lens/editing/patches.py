"""Reversible weight patches: apply an edit, undo it bit for bit, save it, load it.

Every editing method in rome_lens (ROME's rank-one update, the fine-tuning
baseline, MEMIT) ends in the same object: a :class:`WeightEdit`, a set of
additive changes ``ΔW`` to named parameters such as ``blocks.5.mlp.W_out``,
with the requests it writes (``edit.requests``) and whether each took
(``edit.outcomes``). Computing an edit never touches the model; only
:meth:`WeightEdit.apply` does, and it returns an :class:`AppliedEdit` handle
whose :meth:`~AppliedEdit.revert` copies the original weights back, so undoing
is exact, not a subtraction.

* ``apply`` checks that the model is the one the edit was computed on (its
  :func:`~rome_lens.core.fingerprint.model_fingerprint` up to the first edited
  layer), computes every new weight before writing any, and refuses
  non-finite results: a failed apply leaves the model as it was.
* Edits stack. Revert them in reverse order; reverting one whose weights were
  changed since by a later edit raises instead of silently undoing both.
* :func:`edited` applies edits for the duration of a ``with`` block and always
  reverts them, exception or not.
* ``save``/``load`` write safetensors with JSON metadata (and a checksum).

>>> import torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing.patches import WeightPatch, edited
>>> model = tiny_model()
>>> before = model.blocks[1].mlp.W_out.clone()
>>> patch = WeightPatch.for_model(model, {"blocks.1.mlp.W_out": torch.ones(256, 64)})
>>> with edited(model, patch):
...     bool((model.blocks[1].mlp.W_out == before + 1).all())
True
>>> torch.equal(model.blocks[1].mlp.W_out, before)
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from rome_lens.core.backend import Model, weight
from rome_lens.core.fingerprint import check_fingerprint, model_fingerprint
from rome_lens.core.precision import accumulator_dtype, dtype_name, model_dtype
from rome_lens.core.results import Result, register_type
from rome_lens.editing.requests import EditRequest

__all__ = ["AppliedEdit", "EditOutcome", "WeightEdit", "WeightPatch", "edited", "weights_as"]


@register_type("edit_outcome")
@dataclass(frozen=True)
class EditOutcome:
    """How one request reads after its edit: did the new answer take?"""

    prompt: str
    """The request's prompt, subject filled in."""
    target_new: str
    """The new answer."""
    p_new: float
    """exp(−mean NLL) of target_new after the edit."""
    p_new_before: float
    """The same before the edit."""
    rank_new: int
    """Tokens more probable than target_new's first token after the edit (0: top-1)"""
    p_true: float | None = None
    """exp(−mean NLL) of target_true after the edit, if known."""

    @property
    def took(self) -> bool:
        """The new answer is top-1, or at least more probable than the true one."""
        return self.rank_new == 0 or (self.p_true is not None and self.p_new > self.p_true)


class WeightEdit(Result):
    """Additive changes to named weights, computed on one model (see the module docstring)."""

    kind = "weight_edit"
    fingerprint: str
    """model_fingerprint(model, upto_layer=base_layer) of the unedited model."""
    base_layer: int
    """First edited layer: the fingerprint covers what feeds its MLP key."""
    requests: list[EditRequest]
    """The facts the edit writes (empty for a bare patch)"""
    outcomes: list[EditOutcome]
    """One per request, measured when the edit was computed."""

    def deltas(self) -> dict[str, Tensor]:
        """``{parameter name: ΔW}`` for every parameter the edit changes."""
        raise NotImplementedError

    @property
    def took(self) -> bool:
        """Whether every request took (see :class:`EditOutcome`); ``True`` when none was checked."""
        return all(outcome.took for outcome in self.outcomes)

    @property
    def misses(self) -> list[EditOutcome]:
        """The outcomes of the requests that did not take."""
        return [outcome for outcome in self.outcomes if not outcome.took]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per request: the request, and after the edit P(new), P(true), rank and took."""
        rows = []
        for i, request in enumerate(self.requests):
            row: dict[str, Any] = asdict(request)
            if i < len(self.outcomes):
                outcome = self.outcomes[i]
                row |= {
                    "p_new_before": outcome.p_new_before,
                    "p_new": outcome.p_new,
                    "p_true": outcome.p_true,
                    "rank_new": outcome.rank_new,
                    "took": outcome.took,
                }
            rows.append(row)
        return pd.DataFrame(rows)

    def parameter_dataframe(self) -> pd.DataFrame:
        """One row per edited parameter: its name, the norm and rank of its change, and the
        dtypes it was computed in and is written back in."""
        written = getattr(self, "weight_dtype", "")
        rows = [
            {
                "parameter": name,
                "delta_norm": delta.norm().item(),
                "delta_rank": _rank(delta),
                "delta_dtype": dtype_name(delta.dtype),
                "weight_dtype": written,
            }
            for name, delta in self.deltas().items()
        ]
        return pd.DataFrame(rows)

    def check_model(self, model: Model) -> None:
        """Raise ``ValueError`` unless ``model`` is the one this edit was computed on."""
        found = model_fingerprint(model, upto_layer=self.base_layer)
        check_fingerprint(found, self.fingerprint, f"this edit (up to layer {self.base_layer})")

    def apply(self, model: Model) -> AppliedEdit:
        """Add every ΔW to the model's weights; the handle's ``revert()`` undoes it exactly.

        Args:
            model: the model the edit was computed on (or that model, edited at later layers).

        Returns:
            A handle whose ``revert()`` restores the weights bit for bit (also a context manager).

        Raises:
            ValueError: another model, a missing parameter, a shape mismatch, or a
                non-finite result; the model is then left as it was.
        """
        self.check_model(model)
        params: dict[str, Tensor] = {}
        updates: dict[str, Tensor] = {}
        for name, delta in self.deltas().items():
            try:
                param = params[name] = weight(model, name)
            except ValueError as err:
                raise ValueError(f"the model has no parameter {name!r} to edit") from err
            if tuple(delta.shape) != tuple(param.shape):
                raise ValueError(
                    f"ΔW for {name} has shape {tuple(delta.shape)}, the weight {tuple(param.shape)}"
                )
            new = _added(param.detach(), delta)
            if not torch.isfinite(new).all():
                raise ValueError(f"applying this edit would make {name} non-finite")
            updates[name] = new
        originals = {name: params[name].detach().clone() for name in updates}
        try:
            with torch.no_grad():
                for name, new in updates.items():
                    params[name].copy_(new)
        except BaseException:
            with torch.no_grad():
                for name, old in originals.items():
                    params[name].copy_(old)
            raise
        digests = {name: _digest(params[name]) for name in updates}
        return AppliedEdit(model, self, originals, digests)

    def __repr__(self) -> str:
        requests = self.requests
        shown = f"{requests[0].text!r} → {requests[0].target_new!r}" if requests else "no request"
        if len(requests) > 1:
            shown += f" and {len(requests) - 1} more"
        norm = sum(d.double().norm() ** 2 for d in self.deltas().values()) ** 0.5
        status = "unchecked" if not self.outcomes else ("took" if self.took else "missed")
        if self.outcomes and len(self.outcomes) > 1:
            status = f"{len(self.outcomes) - len(self.misses)}/{len(self.outcomes)} took"
        weights = ", ".join(self.deltas())
        return f"{type(self).__name__}({weights}: {shown}, ‖ΔW‖={float(norm):.3g}, {status})"


@dataclass(repr=False)
class WeightPatch(WeightEdit):
    """A dense edit: any ΔW for any parameters (the fine-tuning baseline returns one)."""

    kind = "weight_patch"
    delta: dict[str, Tensor]
    """Parameter name -> ΔW, same shape as the weight."""
    fingerprint: str
    """model_fingerprint(model, upto_layer=base_layer)"""
    base_layer: int
    """The first edited layer."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able notes (method, losses...)"""
    requests: list[EditRequest] = field(default_factory=list)
    """The facts it writes."""
    outcomes: list[EditOutcome] = field(default_factory=list)
    """One per request."""
    weight_dtype: str = ""
    """The dtype of the weights it was computed on and is written back in ("bfloat16"...);
    ΔW itself is held in float64."""

    @classmethod
    def for_model(
        cls,
        model: Model,
        delta: dict[str, Tensor],
        *,
        requests: Sequence[EditRequest] = (),
        **info: Any,
    ) -> WeightPatch:
        """A patch of ``model``, fingerprinted up to the first edited layer.

        Args:
            model: the model the patch is for.
            delta: ``{parameter name: ΔW}``.
            requests: the facts the patch writes, if any.
            **info: JSON-able notes kept with the patch.

        Returns:
            The patch.
        """
        layers = [int(name.split(".")[1]) for name in delta if name.startswith("blocks.")]
        base = min(layers, default=0)
        fingerprint = model_fingerprint(model, upto_layer=base)
        dtype = dtype_name(model_dtype(model))
        return cls(delta, fingerprint, base, dict(info), list(requests), weight_dtype=dtype)

    def deltas(self) -> dict[str, Tensor]:
        return dict(self.delta)


@dataclass
class AppliedEdit:
    """An edit applied to a model; :meth:`revert` restores the original weights exactly."""

    model: Model
    """The edited model."""
    edit: WeightEdit
    """What was applied."""
    originals: dict[str, Tensor]
    """The weights before the edit."""
    digests: dict[str, str]
    """Of the weights right after it, to catch out-of-order reverts."""
    reverted: bool = False
    """Whether revert() has run."""

    def revert(self) -> None:
        """Put the original weights back, bit for bit."""
        if self.reverted:
            raise RuntimeError("this edit has already been reverted")
        params = {name: weight(self.model, name) for name in self.digests}
        for name, digest in self.digests.items():
            if _digest(params[name]) != digest:
                raise RuntimeError(
                    f"{name} has changed since this edit was applied: "
                    "revert the edits applied after it first (in reverse order)"
                )
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)
        self.reverted = True

    def __enter__(self) -> AppliedEdit:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.reverted:
            self.revert()


@contextmanager
def edited(model: Model, edits: WeightEdit | Sequence[WeightEdit]) -> Iterator[list[AppliedEdit]]:
    """Apply ``edits`` in order for the ``with`` block, then revert them in reverse order.

    Args:
        model: the model to edit.
        edits: one edit or several, applied in order.

    Yields:
        The handles of the applied edits.
    """
    edits = [edits] if isinstance(edits, WeightEdit) else list(edits)
    handles: list[AppliedEdit] = []
    try:
        for edit in edits:
            handles.append(edit.apply(model))
        yield handles
    finally:
        for handle in reversed(handles):
            if not handle.reverted:
                handle.revert()


@contextmanager
def weights_as(model: Model, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Give the named parameters these values for the ``with`` block, then put the model's
    own back, bit for bit, exception or not.

    Editing in a row with weights rewinding computes each batch's targets on the
    weights the run started from: this swaps them in without a subtraction.

    Args:
        model: the model.
        weights: ``{parameter name: value}``, each the parameter's shape.

    Yields:
        Nothing: inside the block the model holds ``weights``.

    Raises:
        ValueError: a missing parameter or a shape mismatch (nothing is then written).
    """
    params = {name: weight(model, name) for name in weights}
    for name, value in weights.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{name} has shape {tuple(params[name].shape)}, the value {tuple(value.shape)}"
            )
    own = {name: param.detach().clone() for name, param in params.items()}
    try:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)


def _added(param: Tensor, delta: Tensor) -> Tensor:
    """``param + ΔW`` summed in the device's accumulator precision (float64 where it is fast),
    then rounded once to the weight's dtype: a bfloat16 weight gains the nearest bfloat16."""
    wide = torch.promote_types(accumulator_dtype(param.device), param.dtype)
    return (param.to(wide) + delta.to(param.device, wide)).to(param.dtype)


def _digest(tensor: Tensor) -> str:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()


def _rank(delta: Tensor) -> int:
    return int(torch.linalg.matrix_rank(delta.double())) if delta.ndim == 2 else 1
