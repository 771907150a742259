"""AlphaEdit: MEMIT whose updates leave what the model knew alone, edit after edit.

AlphaEdit (Fang et al., ICLR 2025, arXiv 2410.02355) keeps MEMIT's targets
z_i and its layer-by-layer spreading (:mod:`rome_lens.editing.memit`) and
changes the solve. MEMIT trades the new keys against all others through the
key statistics C (``ΔW = (λC + KᵀK)⁻¹ KᵀR``); AlphaEdit instead confines the
update to the **null space** of the preserved keys, the span of C's
eigenvectors whose eigenvalues are small, with the projector ``P``:

    ΔW = (P (KᵀK + K_pᵀK_p) + l2 · I)⁻¹ P Kᵀ R

(keys as rows: ``K`` this batch's, ``K_p`` the earlier batches', ``R`` the
residual share). Any key ``k`` in the preserved space has ``k P = 0``, hence
``k (P M + l2 I) = l2 k`` and ``k ΔW = k P KᵀR / l2 = 0``: its output is
exactly unchanged, whatever the batch. ``K_pᵀK_p``, the running sum of
earlier edits' keys (AlphaEdit's ``cache_c``), keeps each batch from undoing
the ones before. Both live in the editor's state, a :class:`NullSpaceState`:
``start`` builds the projectors from the unedited model's statistics, and
``state.after(edit)`` adds the edit's keys, which is how
:class:`~rome_lens.editing.sequential.SequentialEditor` carries them from batch
to batch. Everything but the solve is the pipeline AlphaEdit shares with MEMIT
(:mod:`rome_lens.editing.multilayer`).

The threshold is set by energy: the null space is spanned by C's smallest
eigenvectors whose eigenvalues add up to at most ``null_space_energy`` of C's
trace, the directions the unedited model's keys use least. (AlphaEdit's 2e-2
is an absolute eigenvalue, on GPT-2 XL's and Llama's scale; on the default
model's keys it would keep 75–90% of every layer's directions, on others
none.) ``docs/mass_editing.md`` gives the measurements behind the default.

>>> import tempfile, warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import AlphaEditHyperParams, EditRequest, alphaedit_edit
>>> from rome_lens.stats import key_second_moment
>>> model = tiny_model()
>>> folder = tempfile.mkdtemp()
>>> stats = {layer: key_second_moment(model, layer, n_tokens=500, cache_dir=folder,
...                                   progress=False) for layer in (0, 1)}
>>> hparams = AlphaEditHyperParams(context_lengths=(), v_steps=3)
>>> with warnings.catch_warnings(record=True):  # a random model may not take it
...     edit = alphaedit_edit(model, [EditRequest("{} is located in", "The Eiffel Tower", "Rome")],
...                           layers=[0, 1], hparams=hparams, stats=stats, cache_dir=folder,
...                           progress=False)
>>> edit.method, sorted(edit.deltas())
('alphaedit', ['blocks.0.mlp.W_out', 'blocks.1.mlp.W_out'])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.editing.defaults import default_alphaedit_layers
from rome_lens.editing.editors import RunOptions
from rome_lens.editing.multilayer import (
    LayerSolve,
    MultiLayerEdit,
    MultiLayerEditor,
    MultiLayerHyperParams,
    MultiLayerState,
)
from rome_lens.editing.registry import register_editor
from rome_lens.editing.requests import EditRequest
from rome_lens.stats.keys import KeyStats

__all__ = [
    "ALPHAEDIT",
    "AlphaEditEditor",
    "AlphaEditHyperParams",
    "NullSpaceState",
    "alphaedit_edit",
    "null_space_projector",
    "null_space_update",
]


@dataclass(frozen=True)
class AlphaEditHyperParams(MultiLayerHyperParams):
    """Settings of :func:`alphaedit_edit`: the multi-layer settings
    (:class:`~rome_lens.editing.multilayer.MultiLayerHyperParams`) and those of its solve."""

    null_space_energy: float = 0.3
    """The null space: C's smallest eigenvectors holding at most this share of its trace
    (chosen by ``bench/bench_sequential.py``; see docs/mass_editing.md)."""
    l2: float = 10.0
    """Weight of ‖ΔW‖² in the solve (AlphaEdit's L2, whose value it is; chosen with the
    default model's layers 1–8 by the sequential runs in docs/mass_editing.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.null_space_energy < 1:
            raise ValueError(f"null_space_energy must be in (0, 1), got {self.null_space_energy!r}")
        if not self.l2 > 0:
            raise ValueError(f"l2 must be positive, got {self.l2!r}")


@dataclass(frozen=True)
class NullSpaceState(MultiLayerState):
    """AlphaEdit's state: the multi-layer state (Σ KᵀK over the keys of the edits applied
    so far, and what the options keep) and each layer's null-space projector."""

    projectors: Mapping[int, Tensor] = field(default_factory=dict)
    """Layer -> P, from the unedited model's key statistics."""


def null_space_projector(stats: KeyStats, energy: float) -> Float[Tensor, "d_mlp d_mlp"]:
    """``P = U Uᵀ`` over C's smallest eigenvectors, as many as hold at most ``energy`` of
    its trace.

    Args:
        stats: the layer's key statistics C.
        energy: the share of C's trace the null space may hold.

    Returns:
        The projector, float64.
    """
    values, vectors = torch.linalg.eigh(stats.moment.double())  # ascending
    share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
    small = vectors[:, share <= energy]
    return small @ small.T


class AlphaEditEditor(MultiLayerEditor):
    """AlphaEdit as an :class:`~rome_lens.editing.editors.Editor`: the multi-layer pipeline
    with the null-space solve, and a :class:`NullSpaceState` carried from edit to edit."""

    name = "alphaedit"
    label = "AlphaEdit"
    settings_type = AlphaEditHyperParams
    layers_by_default = staticmethod(default_alphaedit_layers)

    def state_from(
        self,
        model: Model,
        settings: MultiLayerHyperParams,
        layers: list[int],
        stats: dict[int, KeyStats],
        started: float,
    ) -> NullSpaceState:
        """The multi-layer state and each layer's null-space projector; nothing preserved yet."""
        assert isinstance(settings, AlphaEditHyperParams)
        energy = settings.null_space_energy
        projectors = {layer: null_space_projector(stats[layer], energy) for layer in layers}
        base = super().state_from(model, settings, layers, stats, started)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return NullSpaceState(**fields, projectors=projectors)

    def solver(
        self, model: Model, settings: MultiLayerHyperParams, state: MultiLayerState
    ) -> LayerSolve:
        """:func:`null_space_update` per layer, with the state's projectors and preserved keys
        (and its starting weights, with ``anchor``)."""
        assert isinstance(settings, AlphaEditHyperParams)
        if not isinstance(state, NullSpaceState):
            raise TypeError(f"AlphaEdit edits from a NullSpaceState (its start()), got {state!r}")
        missing = [layer for layer in state.layers if layer not in state.projectors]
        if missing:
            raise ValueError(
                f"projectors has no layer {missing}: give one for each of {list(state.layers)}"
            )
        l2, anchor = settings.l2, settings.anchor

        def update(layer: int, keys: Tensor, residual: Tensor) -> Tensor:
            earlier = state.preserved.get(layer)
            drift = state.drift(model, layer) if anchor else None
            return null_space_update(
                state.projectors[layer], keys, residual, earlier, l2, anchor=anchor, drift=drift
            )

        return LayerSolve(update)


ALPHAEDIT = register_editor(AlphaEditEditor())
"""The registered AlphaEdit editor (``get_editor("alphaedit")``)."""


def null_space_update(
    projector: Float[Tensor, "d_mlp d_mlp"],
    keys: Float[Tensor, "request d_mlp"],
    residual: Float[Tensor, "request d_model"],
    preserved: Float[Tensor, "d_mlp d_mlp"] | None,
    l2: float,
    *,
    anchor: float = 0.0,
    drift: Float[Tensor, "d_mlp d_model"] | None = None,
) -> Float[Tensor, "d_mlp d_model"]:
    """``(P (KᵀK + K_pᵀK_p) + l2·I + α·P)⁻¹ P (Kᵀ R − α·D)`` in float64 (see the module
    docstring): the ΔW in P's range that minimises
    ``‖KΔW − R‖² + ‖K_pΔW‖² + l2‖ΔW‖² + α‖D + ΔW‖²``.

    Args:
        projector: P.
        keys: K, this batch's keys.
        residual: R, the residual share this layer takes.
        preserved: K_pᵀK_p of earlier edits (``None``: none).
        l2: the weight of ‖ΔW‖².
        anchor: α, the weight of the distance from the starting weights.
        drift: D = W − W₀, how far earlier edits moved the layer (needed when α > 0).

    Returns:
        ΔW for ``W_out``.
    """
    k, r = keys.double(), residual.double()
    p = projector.to(k.device, torch.float64)  # a projector given may wait on the CPU
    moment = k.T @ k if preserved is None else k.T @ k + preserved.to(k.device, torch.float64)
    system = p @ moment + l2 * torch.eye(len(p), dtype=torch.float64, device=p.device)
    target = k.T @ r
    if anchor:
        if drift is None:
            raise ValueError("anchor > 0 needs the drift D = W − W₀")
        system = system + anchor * p
        target = target - anchor * drift.to(k.device, torch.float64)
    return torch.linalg.solve(system, p @ target)


def alphaedit_edit(
    model: Model,
    requests: Sequence[EditRequest],
    *,
    layers: Sequence[int] | None = None,
    hparams: AlphaEditHyperParams | None = None,
    stats: dict[int, KeyStats] | None = None,
    preserved: dict[int, Tensor] | None = None,
    projectors: dict[int, Tensor] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> MultiLayerEdit:
    """One AlphaEdit batch: MEMIT's targets and spreading, each update in the null space.

    The model is not changed; apply the result with ``edit.apply(model)``. For
    edits in a row, :class:`~rome_lens.editing.sequential.SequentialEditor` keeps
    ``preserved`` and the projectors between batches (in a :class:`NullSpaceState`).

    Args:
        model: any TransformerLens model with MLPs (as earlier edits left it).
        requests: the facts to write.
        layers: ascending MLP layers; ``None`` uses :func:`default_alphaedit_layers`.
        hparams: the settings (``None``: :class:`AlphaEditHyperParams` defaults).
        stats: key statistics per layer (computed and cached where missing).
        preserved: per layer, Σ kᵀk over earlier edits' keys (``None``: none yet).
        projectors: per layer, the null-space projector (``None``: built from ``stats``).
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cache (key statistics and targets z_i).
        progress: show progress bars.

    Returns:
        The edit (``method == "alphaedit"``), every request read back on the edited model.
    """
    state = None
    if projectors is not None or preserved is not None:
        options = RunOptions(cache_dir, use_cache, progress)
        state = _given_state(model, hparams, layers, stats, preserved, projectors, options)
        layers = stats = None  # they are in the state
    return ALPHAEDIT.edit(model, requests, hparams, layers=layers, stats=stats, state=state,
                          cache_dir=cache_dir, use_cache=use_cache, progress=progress)  # fmt: skip


def _given_state(
    model: Model,
    hparams: AlphaEditHyperParams | None,
    layers: Sequence[int] | None,
    stats: Mapping[int, KeyStats] | None,
    preserved: Mapping[int, Tensor] | None,
    projectors: Mapping[int, Tensor] | None,
    options: RunOptions,
) -> NullSpaceState:
    """The state :func:`alphaedit_edit` edits from when given projectors or preserved keys."""
    if projectors is not None:
        chosen = ALPHAEDIT.checked_layers(model, layers or ALPHAEDIT.default_layers(model))
        if hparams is not None and hparams.keeps_original:
            raise ValueError(
                "rewind and anchor need the starting weights: give stats, not projectors, "
                "or edit in a row with SequentialEditor"
            )
        return NullSpaceState(tuple(chosen), projectors=projectors, preserved=preserved or {})
    started = ALPHAEDIT.start(model, hparams, layers=layers,
                              stats=stats, cache_dir=options.cache_dir,
                              use_cache=options.use_cache, progress=options.progress)  # fmt: skip
    assert isinstance(started, NullSpaceState)
    return dataclasses.replace(started, preserved=preserved or {})
