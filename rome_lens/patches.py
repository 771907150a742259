"""Reversible weight patches: apply an edit, undo it bit for bit, save it, load it.

Every editing method in rome_lens (ROME's rank-one update, the fine-tuning
baseline, MEMIT) ends in the same object: a :class:`WeightEdit`, a set of
additive changes ``ΔW`` to named parameters such as ``blocks.5.mlp.W_out``.
Computing an edit never touches the model; only :meth:`WeightEdit.apply` does,
and it returns an :class:`AppliedEdit` handle whose :meth:`~AppliedEdit.revert`
copies the original weights back, so undoing is exact, not a subtraction.

* ``apply`` checks that the model is the one the edit was computed on (its
  :func:`~rome_lens.fingerprint.model_fingerprint` up to the first edited
  layer), computes every new weight before writing any, and refuses
  non-finite results: a failed apply leaves the model as it was.
* Edits stack. Revert them in reverse order; reverting one whose weights were
  changed since by a later edit raises instead of silently undoing both.
* :func:`edited` applies edits for the duration of a ``with`` block and always
  reverts them, exception or not.
* ``save``/``load`` write safetensors with JSON metadata (and a checksum).

>>> import rome_lens, torch
>>> from rome_lens.patches import WeightPatch, edited
>>> model = rome_lens.tiny_model()
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
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from rome_lens.cache import load_tensors, save_tensors
from rome_lens.fingerprint import model_fingerprint

__all__ = ["AppliedEdit", "WeightEdit", "WeightPatch", "edited"]

_FORMAT = 1
E = TypeVar("E", bound="WeightEdit")


class WeightEdit:
    """Additive changes to named weights, computed on one model (see the module docstring)."""

    kind: ClassVar[str] = "weight_edit"
    _registry: ClassVar[dict[str, type[WeightEdit]]] = {}
    fingerprint: str  # model_fingerprint(model, upto_layer=base_layer) of the unedited model
    base_layer: int  # first edited layer: the fingerprint covers what feeds its MLP key

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        WeightEdit._registry[cls.kind] = cls

    def deltas(self) -> dict[str, Tensor]:
        """``{parameter name: ΔW}`` for every parameter the edit changes."""
        raise NotImplementedError

    def to_dataframe(self) -> pd.DataFrame:
        """One row per edited parameter: its name and the norm of its change."""
        rows = [
            {"parameter": name, "delta_norm": delta.norm().item(), "delta_rank": _rank(delta)}
            for name, delta in self.deltas().items()
        ]
        return pd.DataFrame(rows)

    def check_model(self, model: HookedTransformer) -> None:
        """Raise ``ValueError`` unless ``model`` is the one this edit was computed on."""
        found = model_fingerprint(model, upto_layer=self.base_layer)
        if found != self.fingerprint:
            raise ValueError(
                f"this edit was computed on another model (fingerprint {self.fingerprint} "
                f"up to layer {self.base_layer}; this model's is {found})"
            )

    def apply(self, model: HookedTransformer) -> AppliedEdit:
        """Add every ΔW to the model's weights; the handle's ``revert()`` undoes it exactly."""
        self.check_model(model)
        params = dict(model.named_parameters())
        updates: dict[str, Tensor] = {}
        for name, delta in self.deltas().items():
            if name not in params:
                raise ValueError(f"the model has no parameter {name!r} to edit")
            param = params[name]
            if tuple(delta.shape) != tuple(param.shape):
                raise ValueError(
                    f"ΔW for {name} has shape {tuple(delta.shape)}, the weight {tuple(param.shape)}"
                )
            new = (param.detach().double() + delta.to(param.device, torch.float64)).to(param.dtype)
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

    # ------------------------------------------------------------------ saving

    def _to_saved(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON-able fields that :meth:`_from_saved` rebuilds the edit from."""
        raise NotImplementedError

    @classmethod
    def _from_saved(cls: type[E], tensors: dict[str, Tensor], meta: dict[str, Any]) -> E:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the edit to ``path`` (safetensors) and ``path.json`` (metadata, checksum)."""
        tensors, meta = self._to_saved()
        meta = {**meta, "kind": self.kind, "format": _FORMAT}
        meta |= {"fingerprint": self.fingerprint, "base_layer": self.base_layer}
        save_tensors(Path(path), tensors, meta)
        return Path(path)

    @classmethod
    def load(
        cls: type[E], path: str | os.PathLike[str], model: HookedTransformer | None = None
    ) -> E:
        """Read an edit written by :meth:`save`; with ``model``, check it was made on it."""
        tensors, meta = load_tensors(Path(path))
        kind = meta.get("kind")
        target = WeightEdit._registry.get(str(kind))
        if target is None or meta.get("format") != _FORMAT:
            raise ValueError(f"{path} holds no rome_lens edit (kind {kind!r})")
        if not issubclass(target, cls):
            raise ValueError(f"{path} holds a {target.__name__}, not a {cls.__name__}")
        edit = target._from_saved(tensors, meta)
        edit.fingerprint, edit.base_layer = str(meta["fingerprint"]), int(str(meta["base_layer"]))
        if model is not None:
            edit.check_model(model)
        return edit


@dataclass
class WeightPatch(WeightEdit):
    """A dense edit: any ΔW for any parameters (the fine-tuning baseline returns one)."""

    kind: ClassVar[str] = "weight_patch"
    delta: dict[str, Tensor]  # parameter name -> ΔW, same shape as the weight
    fingerprint: str
    base_layer: int
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able notes (method, losses...)

    @classmethod
    def for_model(
        cls, model: HookedTransformer, delta: dict[str, Tensor], **info: Any
    ) -> WeightPatch:
        """A patch of ``model``, fingerprinted up to the first edited layer."""
        layers = [int(name.split(".")[1]) for name in delta if name.startswith("blocks.")]
        base = min(layers, default=0)
        return cls(delta, model_fingerprint(model, upto_layer=base), base, dict(info))

    def deltas(self) -> dict[str, Tensor]:
        return dict(self.delta)

    def _to_saved(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return dict(self.delta), {"info": self.info}

    @classmethod
    def _from_saved(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> WeightPatch:
        return cls(dict(tensors), "", 0, dict(meta.get("info", {})))


@dataclass
class AppliedEdit:
    """An edit applied to a model; :meth:`revert` restores the original weights exactly."""

    model: HookedTransformer
    edit: WeightEdit
    originals: dict[str, Tensor]  # the weights before the edit
    digests: dict[str, str]  # of the weights right after it, to catch out-of-order reverts
    reverted: bool = False

    def revert(self) -> None:
        """Put the original weights back, bit for bit."""
        if self.reverted:
            raise RuntimeError("this edit has already been reverted")
        params = dict(self.model.named_parameters())
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
def edited(
    model: HookedTransformer, edits: WeightEdit | Sequence[WeightEdit]
) -> Iterator[list[AppliedEdit]]:
    """Apply ``edits`` in order for the ``with`` block, then revert them in reverse order."""
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


def _digest(tensor: Tensor) -> str:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()


def _rank(delta: Tensor) -> int:
    return int(torch.linalg.matrix_rank(delta.double())) if delta.ndim == 2 else 1
