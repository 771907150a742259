"""MEMIT: write thousands of facts at once, spread over several MLP layers.

Mass-Editing Memory in a Transformer (Meng et al. 2022, arXiv 2210.07229)
generalises ROME from one fact in one layer to many facts in a range of
layers ``L_1 < … < L_last``:

1. **Targets z_i.** For each request, z_i is the residual stream
   ``blocks.{L_last}.hook_resid_post`` at the subject's last token that makes
   the model say the new target: ``z_i = h_i + δ_i``, with δ_i optimised
   exactly as ROME's v* is (NLL over context prompts, KL on "{subject} is a",
   decay, norm clamp), by :func:`rome_lens.editing.memory.optimize_deltas`, many
   requests per batch. The z_i are cached on disk per request.
2. **Layers, in ascending order.** At layer ``L_j``, with the updates of the
   earlier layers in place, each request's remaining residual
   ``r_i = z_i − h_i`` is recomputed and spread evenly over the layers left:
   ``R = r / (n_layers_left)``. The keys ``K`` (``blocks.{L_j}.mlp.hook_post``
   at the last subject token, averaged over contexts) and the key second
   moment ``C`` of that layer give the update of ``blocks.{L_j}.mlp.W_out``
   that maps the keys to ``R`` while disturbing other keys least::

       ΔW = (λ C + Kᵀ K)⁻¹ Kᵀ R        (K: request × d_mlp, R: request × d_model)

   solved in float64 without forming an inverse; λ is ``mom2_update_weight``.
   With ``key_match="both"`` (the default) each request adds a second row, its
   bare prompt's key with the same residual, both rows scaled by 1/√2: prompts
   that begin with the subject spell it without the leading space the contexts
   give it, and this row makes the edit hold there too (``docs/mass_editing.md``).

Every step but the solve is the pipeline MEMIT shares with AlphaEdit
(:mod:`rome_lens.editing.multilayer`). The result is a :class:`MultiLayerEdit`,
applied, reverted, saved and loaded like a ROME edit
(:mod:`rome_lens.editing.patches`), with every request read back on the edited
model (``edit.outcomes``). Memory grows linearly with the number of requests:
keys and targets are computed in batches, and the only square matrices are
``d_mlp × d_mlp``.

>>> import tempfile, warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import EditRequest, MEMITHyperParams, memit_edit
>>> from rome_lens.stats import key_second_moment
>>> model = tiny_model()
>>> requests = [EditRequest("{} is located in", "The Eiffel Tower", "Rome"),
...             EditRequest("{} is located in", "The Louvre", "Berlin")]
>>> folder = tempfile.mkdtemp()  # a cache folder for this example; omit to use the default
>>> stats = {layer: key_second_moment(model, layer, n_tokens=500, cache_dir=folder,
...                                   progress=False) for layer in (0, 1)}
>>> hparams = MEMITHyperParams(context_lengths=(), v_steps=3)
>>> with warnings.catch_warnings(record=True):  # a random model may not take them
...     edit = memit_edit(model, requests, layers=[0, 1], hparams=hparams, stats=stats,
...                       cache_dir=folder, progress=False)
>>> sorted(edit.deltas())
['blocks.0.mlp.W_out', 'blocks.1.mlp.W_out']
>>> with edit.apply(model):
...     pass  # both facts are written here; the weights are restored on exit
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.editing.defaults import default_memit_layers, default_mom2_update_weight
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
    "MEMIT",
    "MEMITEditor",
    "MEMITHyperParams",
    "MultiLayerEdit",
    "memit_edit",
    "memit_update",
]


@dataclass(frozen=True)
class MEMITHyperParams(MultiLayerHyperParams):
    """Settings of :func:`memit_edit`: the multi-layer settings
    (:class:`~rome_lens.editing.multilayer.MultiLayerHyperParams`) and those of its solve."""

    max_condition: float = 1e10
    """C above this condition number gets a ridge (and a warning)"""
    mom2_update_weight: float | None = None
    """λ (paper: 20k GPT-2 XL, 15k GPT-J); None: by model."""
    norm_ridge: float = 0.0
    """Weight of ‖ΔW‖² in the solve (ENCORE's Frobenius-norm ridge; 0: MEMIT's solve)."""
    history: bool = False
    """Preserve the keys of earlier batches: add their Σ KᵀK, carried in the state, to the
    solve, so that batch after batch sums to one joint solve (the history term)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.norm_ridge) and self.norm_ridge >= 0):
            raise ValueError(f"norm_ridge must be a finite number ≥ 0, got {self.norm_ridge!r}")


class MEMITEditor(MultiLayerEditor):
    """MEMIT as an :class:`~rome_lens.editing.editors.Editor`: the multi-layer pipeline
    with the ridge-regularised least-squares solve."""

    name = "memit"
    label = "MEMIT"
    settings_type = MEMITHyperParams
    layers_by_default = staticmethod(default_memit_layers)

    def solver(
        self, model: Model, settings: MultiLayerHyperParams, state: MultiLayerState
    ) -> LayerSolve:
        """:func:`memit_update` per layer: C from the state's statistics, λ from the settings
        or the model's default, and what the options add (ridge, history, anchor)."""
        assert isinstance(settings, MEMITHyperParams)
        given = settings.mom2_update_weight
        weight = default_mom2_update_weight(model) if given is None else given
        max_condition, history = settings.max_condition, settings.history
        ridge, anchor = settings.norm_ridge, settings.anchor

        def update(layer: int, keys: Tensor, residual: Tensor) -> Tensor:
            moment = state.stats[layer]
            regularised = moment.regularized(moment.ridge(max_condition))
            return memit_update(
                regularised, keys, residual, weight,
                ridge=ridge,
                preserved=state.preserved.get(layer) if history else None,
                anchor=anchor,
                drift=state.drift(model, layer) if anchor else None,
            )  # fmt: skip

        return LayerSolve(update, mom2_update_weight=weight)


MEMIT = register_editor(MEMITEditor())
"""The registered MEMIT editor (``get_editor("memit")``)."""


def memit_update(
    moment: Float[Tensor, "d_mlp d_mlp"],
    keys: Float[Tensor, "request d_mlp"],
    residual: Float[Tensor, "request d_model"],
    weight: float,
    *,
    ridge: float = 0.0,
    preserved: Float[Tensor, "d_mlp d_mlp"] | None = None,
    anchor: float = 0.0,
    drift: Float[Tensor, "d_mlp d_model"] | None = None,
) -> Float[Tensor, "d_mlp d_model"]:
    """MEMIT's least squares in float64, with the options' terms:

    argmin_ΔW ‖KΔW − R‖² + λ tr(ΔWᵀCΔW) + ridge‖ΔW‖² + ‖K_pΔW‖² + α‖D + ΔW‖²
    = (λC + (ridge + α)·I + K_pᵀK_p + KᵀK)⁻¹ (KᵀR − α·D).

    Args:
        moment: C, the key second moment.
        keys: K.
        residual: R, the residual share this layer takes.
        weight: λ.
        ridge: the weight of ‖ΔW‖².
        preserved: K_pᵀK_p of earlier batches (``None``: none).
        anchor: α, the weight of the distance from the starting weights.
        drift: D = W − W₀ (needed when α > 0).

    Returns:
        ΔW for ``W_out``.
    """
    k, r = keys.double(), residual.double()
    system = weight * moment.double() + k.T @ k
    if ridge or anchor:
        system = system + (ridge + anchor) * torch.eye(len(system), dtype=torch.float64,
                                                       device=system.device)  # fmt: skip
    if preserved is not None:
        system = system + preserved.to(system.device, torch.float64)
    target = k.T @ r
    if anchor:
        if drift is None:
            raise ValueError("anchor > 0 needs the drift D = W − W₀")
        target = target - anchor * drift.to(target.device, torch.float64)
    return torch.linalg.solve(system, target)


def memit_edit(
    model: Model,
    requests: Sequence[EditRequest],
    *,
    layers: Sequence[int] | None = None,
    hparams: MEMITHyperParams | None = None,
    stats: dict[int, KeyStats] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> MultiLayerEdit:
    """Compute one edit that writes every request into ``blocks.{L}.mlp.W_out`` for L in layers.

    The model is not changed (the updates are applied only while later layers
    are computed, and always reverted): apply the result with
    ``edit.apply(model)`` or ``with rome_lens.edited(model, edit): ...``. The
    same edit as ``get_editor("memit").edit(model, requests, hparams, ...)``.

    Args:
        model: any TransformerLens model with MLPs.
        requests: the facts to write; two requests may not give one subject and
            prompt different targets.
        layers: ascending MLP layers; ``None`` uses :func:`default_memit_layers`.
        hparams: the settings (``None``: :class:`MEMITHyperParams` defaults).
        stats: key statistics per layer; missing layers are loaded or computed
            (cached) with :func:`~rome_lens.stats.keys.key_second_moment`.
        cache_dir: the rome_lens cache folder, for the key statistics and the
            per-request targets z_i (default: see :mod:`rome_lens.core.cache`).
        use_cache: read and write the cache (key statistics and targets z_i).
        progress: show progress bars.

    Returns:
        The edit, with every request read back on the edited model
        (``edit.outcomes``); it warns with ``EditMissWarning`` about requests that
        did not take.
    """
    return MEMIT.edit(
        model,
        requests,
        hparams,
        layers=layers,
        stats=stats,
        cache_dir=cache_dir,
        use_cache=use_cache,
        progress=progress,
    )
