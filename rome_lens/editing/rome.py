"""ROME: rewrite one fact with a rank-one update of ``blocks.{L}.mlp.W_out``.

Rank-One Model Editing (Meng et al. 2022, arXiv 2202.05262) reads an MLP's
output matrix as a key-value memory: the hidden activation at the subject's
last token, ``k = blocks.{L}.mlp.hook_post``, is a key, and ``W_outᵀ k + b_out``
(``blocks.{L}.hook_mlp_out``) is the value written into the residual stream.
To make "The Eiffel Tower is located in the city of" end in "Rome":

1. **k\\*** is the key of the subject's last token, averaged over the bare
   prompt and 20 short context prefixes the model writes itself (10 of 5 and
   10 of 10 sampled tokens, seeded), so the edit holds in any context.
2. **v\\*** is the value that makes the model say the new target. A vector δ is
   added to ``hook_mlp_out`` at the last subject token and optimised with Adam
   on the NLL of ``target_new`` after every context prompt, plus a KL term
   that keeps "{subject} is a" predicting what it did (the subject's other
   properties), plus a weight decay on δ; ‖δ‖ is clamped to 4 × ‖v_init‖.
   Then v\\* = v_init + δ, with v_init = ``W_outᵀ k* + b_out``.
3. **The update** is ΔW = u ⊗ (v\\* − W_outᵀ k\\* − b_out) / (u · k\\*) with
   u = C⁻¹ k\\*, the least-squares change that maps k\\* to v\\* while moving the
   other keys (second moment C, from :mod:`rome_lens.stats.keys`) as little as
   possible. ``key_match`` says which keys gain exactly δ: ``"averaged"``
   (k\\* in the denominator too), ``"bare"`` (the bare prompt's key there, as
   the original code does), or ``"both"`` (the default: the least-C-norm ℓ
   with ``k* · ℓ = k_bare · ℓ = 1``). Prompts that begin with the subject spell
   it without the leading space the contexts give it, so their key differs
   from k\\*; ``docs/editing.md`` compares the three on 200 CounterFact cases.

:func:`rome_edit` computes the edit without touching the model, then reads
the request back with the edit applied (``edit.took``, ``edit.outcomes``) and
warns if the new answer did not take. The returned :class:`RankOneEdit` is
applied and reverted exactly with the machinery of
:mod:`rome_lens.editing.patches`.

>>> import torch, warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import EditRequest, ROMEHyperParams, rome_edit
>>> model = tiny_model()
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> with warnings.catch_warnings(record=True):  # a random model may not take it
...     edit = rome_edit(model, request, layer=1, progress=False,
...                      hparams=ROMEHyperParams(mom2_adjustment=False, context_lengths=()))
>>> with edit.apply(model):
...     value = model.blocks[1].mlp.W_out.T @ edit.key.float() + model.blocks[1].mlp.b_out
>>> torch.allclose(value, edit.value.float(), atol=1e-4)  # k* now maps to v*
True
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from rome_lens.core.backend import Model, weight
from rome_lens.core.fingerprint import check_layer, model_fingerprint
from rome_lens.core.precision import dtype_name, model_dtype
from rome_lens.core.runtime import frozen
from rome_lens.editing.defaults import default_layer
from rome_lens.editing.editors import EditorState, RunOptions, SingleLayerEditor
from rome_lens.editing.memory import compute_keys, context_templates, optimize_deltas
from rome_lens.editing.patches import EditOutcome, WeightEdit
from rome_lens.editing.registry import register_editor
from rome_lens.editing.requests import EditHyperParams, EditRequest
from rome_lens.stats.keys import DEFAULT_N_TOKENS, KeyStats

__all__ = [
    "KEY_MATCHES",
    "ROME",
    "KeyMatch",
    "ROMEEditor",
    "ROMEHyperParams",
    "RankOneEdit",
    "rome_edit",
]

KeyMatch = Literal["averaged", "bare", "both"]
KEY_MATCHES: tuple[KeyMatch, ...] = ("averaged", "bare", "both")


@dataclass(frozen=True)
class ROMEHyperParams(EditHyperParams):
    """Settings of :func:`rome_edit`: those of :class:`~rome_lens.editing.requests.EditHyperParams`,
    and:"""

    mom2_n_tokens: int = DEFAULT_N_TOKENS
    """Tokens of key statistics when none are given."""
    max_condition: float = 1e10
    """C above this condition number gets a ridge (and a warning)"""
    mom2_adjustment: bool = True
    """Use C = E[kkᵀ]; False edits with C = I (worse specificity)"""
    key_match: KeyMatch = "both"
    """Which keys ΔW maps exactly to v*: "averaged" k*, "bare" (the bare prompt's), "both"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_match not in KEY_MATCHES:
            raise ValueError(f"key_match must be one of {KEY_MATCHES}, got {self.key_match!r}")


@dataclass(repr=False)
class RankOneEdit(WeightEdit):
    """A ROME edit: ΔW = left ⊗ right on ``blocks.{layer}.mlp.W_out``."""

    kind = "rank_one"
    request: EditRequest
    """The fact written."""
    layer: int
    """The edited MLP."""
    left: Float[Tensor, " d_mlp"]
    """ℓ with k · ℓ = 1 for the keys matched: u / (u · k*), u = C⁻¹ k*, by default (float64)"""
    right: Float[Tensor, " d_model"]
    """v* − W_outᵀ k* − b_out (float64)"""
    key: Float[Tensor, " d_mlp"]
    """k*, averaged over contexts (float64)"""
    value: Float[Tensor, " d_model"]
    """v*, the MLP output k* maps to after the edit."""
    fingerprint: str
    """Of the weights feeding blocks.{layer}.mlp.hook_post."""
    base_layer: int = -1
    """Equals `layer`; set in __post_init__."""
    ridge: float = 0.0
    """Added to C's diagonal when it was ill-conditioned."""
    condition_number: float = 1.0
    """Of C (1 for C = I)"""
    losses: list[float] = field(default_factory=list)
    """Total loss per optimisation step."""
    seconds: float = 0.0
    """Time rome_edit took, key statistics excluded."""
    stats_seconds: float = 0.0
    """Time spent obtaining the key statistics (computing or loading)"""
    outcomes: list[EditOutcome] = field(default_factory=list)
    """The request read back."""
    weight_dtype: str = ""
    """The dtype of the weights it was computed on and is written back in ("bfloat16"...);
    ΔW itself is held in float64."""

    def __post_init__(self) -> None:
        self.base_layer = self.layer

    @property
    def requests(self) -> list[EditRequest]:  # type: ignore[override]
        """``[request]``: the one fact the edit writes."""
        return [self.request]

    @property
    def parameter(self) -> str:
        """The edited weight, ``blocks.{layer}.mlp.W_out``."""
        return f"blocks.{self.layer}.mlp.W_out"

    def deltas(self) -> dict[str, Tensor]:
        return {self.parameter: torch.outer(self.left, self.right)}

    def to_dataframe(self) -> pd.DataFrame:
        """One row: the request, whether it took, and the update's numbers."""
        row = super().to_dataframe().iloc[0].to_dict()
        row |= {
            "layer": self.layer,
            "delta_norm": (self.left.norm() * self.right.norm()).item(),
            "ridge": self.ridge,
            "condition_number": self.condition_number,
            "steps": len(self.losses),
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "seconds": self.seconds,
            "stats_seconds": self.stats_seconds,
        }
        return pd.DataFrame([row])


class ROMEEditor(SingleLayerEditor[RankOneEdit]):
    """ROME as an :class:`~rome_lens.editing.editors.Editor`: one request, one layer, C
    from the layer's key statistics."""

    name = "rome"
    label = "ROME"
    settings_type = ROMEHyperParams

    def unread_stats(self, settings: ROMEHyperParams) -> str | None:
        """``None`` with C from the statistics; the reason when ``mom2_adjustment`` is off."""
        return None if settings.mom2_adjustment else "hparams.mom2_adjustment is False (C = I)"

    def compute(
        self,
        model: Model,
        requests: list[EditRequest],
        settings: ROMEHyperParams,
        state: EditorState,
        options: RunOptions,
    ) -> RankOneEdit:
        """k*, v* and the rank-one update of the one request (see the module docstring)."""
        (request,), (layer,) = requests, state.layers
        if settings.mom2_adjustment and layer not in state.stats:
            raise ValueError(
                f"the state has no key statistics of layer {layer}, which mom2_adjustment "
                "reads: start it with these settings"
            )
        moment = state.stats[layer] if settings.mom2_adjustment else None
        started = time.perf_counter()
        templates = context_templates(model, settings)
        with frozen(model):
            key = compute_keys(model, [request], layer, templates)[0]
            w_out, b_out = (p.detach().double() for p in _mlp_out_params(model, layer))
            v_init = w_out.T @ key + b_out
            deltas, losses = optimize_deltas(
                model,
                [request],
                layer,
                templates,
                v_init.norm()[None],
                settings,
                progress=options.progress,
            )
            matched = _matched_keys(model, request, layer, key, settings.key_match)
        delta = deltas[0].double()
        regularised: Tensor | None = None
        if moment is None:
            u, ridge, condition = key, 0.0, 1.0
        else:
            ridge, condition = moment.ridge(settings.max_condition), moment.condition_number
            regularised = moment.regularized(ridge)
            u = torch.linalg.solve(regularised, key)
        return RankOneEdit(
            request=request,
            layer=layer,
            left=_left_vector(u, matched, regularised),
            right=delta,
            key=key,
            value=v_init + delta,
            fingerprint=model_fingerprint(model, upto_layer=layer),
            ridge=ridge,
            condition_number=condition,
            losses=losses[0],
            seconds=time.perf_counter() - started,
            stats_seconds=state.seconds,
            weight_dtype=dtype_name(model_dtype(model)),
        )


ROME = register_editor(ROMEEditor())
"""The registered ROME editor (``get_editor("rome")``)."""


def _matched_keys(
    model: Model, request: EditRequest, layer: int, key: Tensor, key_match: KeyMatch
) -> Float[Tensor, "n d_mlp"]:
    """The keys ΔW maps exactly to v*: k* averaged, the bare prompt's, or both."""
    if key_match == "averaged":
        return key[None]
    bare = compute_keys(model, [request], layer, ["{}"])[0]
    return torch.stack([key, bare]) if key_match == "both" else bare[None]


def _left_vector(
    u: Float[Tensor, " d_mlp"],
    matched: Float[Tensor, "n d_mlp"],
    moment: Float[Tensor, "d_mlp d_mlp"] | None,
) -> Float[Tensor, " d_mlp"]:
    """The left vector ℓ of ΔW = ℓ ⊗ δ, such that ``k · ℓ = 1`` for each matched key k.

    One key: ℓ = u / (k · u) with u = C⁻¹k* (for the bare key, ROME's original
    form). Both keys: the least-C-norm ℓ = C⁻¹Kᵀ (K C⁻¹ Kᵀ)⁺ 1, so that both the
    averaged and the bare prompt's keys gain exactly δ (an equality-constrained
    update in the style of EMMET; still rank one, since both gain the same δ).
    """
    if len(matched) == 1:
        return u / (matched[0] @ u)
    solved = matched.T if moment is None else torch.linalg.solve(moment, matched.T)  # C⁻¹Kᵀ
    gram = matched @ solved  # K C⁻¹ Kᵀ
    ones = torch.ones(len(matched), dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.pinv(gram, hermitian=True) @ ones
    return solved @ weights


def _mlp_out_params(model: Model, layer: int) -> tuple[Tensor, Tensor]:
    """``W_out`` and ``b_out`` of ``layer`` (zeros where the MLP has no bias)."""
    return weight(model, f"blocks.{layer}.mlp.W_out"), weight(model, f"blocks.{layer}.mlp.b_out")


def rome_edit(
    model: Model,
    request: EditRequest,
    *,
    layer: int | None = None,
    hparams: ROMEHyperParams | None = None,
    stats: KeyStats | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> RankOneEdit:
    """Compute the rank-one edit that writes ``request`` into ``blocks.{layer}.mlp.W_out``.

    The model is not changed: apply the result with ``edit.apply(model)`` or
    ``with rome_lens.edited(model, edit): ...``. The first edit at a layer
    computes its key statistics (about 5 s on the default model and a 2-core
    CPU, whose corpus ships with the package; a minute or more for a model
    that samples its own; announced on stderr when ``progress`` is on) and
    caches them. The
    same edit as ``get_editor("rome").edit(model, [request], hparams, ...)``.

    Args:
        model: any TransformerLens model with MLPs.
        request: the fact to write.
        layer: the MLP layer to edit; ``None`` uses :func:`default_layer`.
        hparams: the settings (``None``: :class:`ROMEHyperParams` defaults).
        stats: key statistics of that layer; ``None`` loads or computes them
            (cached) with :func:`~rome_lens.stats.keys.key_second_moment`.
        cache_dir: the rome_lens cache folder for the statistics.
        use_cache: read and write the cached statistics.
        progress: show progress bars.

    Returns:
        The edit, with ``took`` and ``outcomes`` read on the edited model; it
        warns with ``EditMissWarning`` when the new answer did not take.
    """
    layer = default_layer(model) if layer is None else check_layer(model, layer)
    return ROME.edit(
        model,
        [request],
        hparams,
        layers=[layer],
        stats=None if stats is None else {layer: stats},
        cache_dir=cache_dir,
        use_cache=use_cache,
        progress=progress,
    )
