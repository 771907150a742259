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
   other keys (second moment C, from :mod:`rome_lens.stats`) as little as
   possible. The same k\\* is used in u and in the denominator; mixing an
   averaged and a bare-prompt key, as the original code does, lets repeated
   edits at one layer blow up (the collapse reported by r-ROME).

:func:`rome_edit` computes the edit without touching the model; the returned
:class:`RankOneEdit` is applied and reverted exactly with the machinery of
:mod:`rome_lens.patches`.

>>> import rome_lens, torch
>>> from rome_lens.rome import EditRequest, ROMEHyperParams, rome_edit
>>> model = rome_lens.tiny_model()
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> edit = rome_edit(model, request, layer=1, progress=False,
...                  hparams=ROMEHyperParams(mom2_adjustment=False, context_lengths=()))
>>> with edit.apply(model):
...     value = model.blocks[1].mlp.W_out.T @ edit.key.float() + model.blocks[1].mlp.b_out
>>> torch.allclose(value, edit.value.float(), atol=1e-4)  # k* now maps to v*
True
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rome_lens.fingerprint import check_layer, model_fingerprint
from rome_lens.memory import (
    EditHyperParams,
    EditRequest,
    check_request,
    compute_keys,
    context_templates,
    optimise_deltas,
)
from rome_lens.models import DEFAULT_MODEL_NAME, frozen
from rome_lens.patches import WeightEdit
from rome_lens.stats import KeyStats, checked_stats

__all__ = [
    "DEFAULT_LAYERS",
    "EditRequest",
    "ROMEHyperParams",
    "RankOneEdit",
    "context_templates",
    "default_layer",
    "rome_edit",
]

# Layers ROME edits by default: the paper's choices for GPT-2 and GPT-J, and ours for the
# default model (chosen by causal tracing and bench/bench_rome.py, see docs/editing.md).
DEFAULT_LAYERS = {
    "gpt2-medium": 8,
    "gpt2-large": 12,
    "gpt2-xl": 17,
    "gpt-j-6B": 5,
    "gpt-neox-20b": 15,
    DEFAULT_MODEL_NAME: 2,
}


@dataclass(frozen=True)
class ROMEHyperParams(EditHyperParams):
    """Settings of :func:`rome_edit`: those of :class:`~rome_lens.memory.EditHyperParams`, and:"""

    mom2_adjustment: bool = True  # use C = E[kkᵀ]; False edits with C = I (worse specificity)


@dataclass
class RankOneEdit(WeightEdit):
    """A ROME edit: ΔW = left ⊗ right on ``blocks.{layer}.mlp.W_out``."""

    kind: ClassVar[str] = "rank_one"
    request: EditRequest
    layer: int
    left: Float[Tensor, " d_mlp"]  # u / (u · k*), with u = C⁻¹ k* (float64)
    right: Float[Tensor, " d_model"]  # v* − W_outᵀ k* − b_out (float64)
    key: Float[Tensor, " d_mlp"]  # k*, averaged over contexts (float64)
    value: Float[Tensor, " d_model"]  # v*, the MLP output k* maps to after the edit
    fingerprint: str  # of the weights feeding blocks.{layer}.mlp.hook_post
    base_layer: int = -1  # equals `layer`; set in __post_init__
    ridge: float = 0.0  # added to C's diagonal when it was ill-conditioned
    condition_number: float = 1.0  # of C (1 for C = I)
    losses: list[float] = field(default_factory=list)  # total loss per optimisation step
    seconds: float = 0.0  # time rome_edit took, statistics excluded

    def __post_init__(self) -> None:
        self.base_layer = self.layer

    @property
    def parameter(self) -> str:
        """The edited weight, ``blocks.{layer}.mlp.W_out``."""
        return f"blocks.{self.layer}.mlp.W_out"

    def deltas(self) -> dict[str, Tensor]:
        return {self.parameter: torch.outer(self.left, self.right)}

    def to_dataframe(self) -> pd.DataFrame:
        """One row describing the edit."""
        row = asdict(self.request) | {
            "layer": self.layer,
            "delta_norm": (self.left.norm() * self.right.norm()).item(),
            "ridge": self.ridge,
            "condition_number": self.condition_number,
            "steps": len(self.losses),
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "seconds": self.seconds,
        }
        return pd.DataFrame([row])

    def _to_saved(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {"left": self.left, "right": self.right, "key": self.key, "value": self.value}
        meta = {"request": asdict(self.request), "layer": self.layer, "ridge": self.ridge}
        meta |= {"condition_number": self.condition_number, "losses": self.losses}
        return tensors, meta | {"seconds": self.seconds}

    @classmethod
    def _from_saved(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> RankOneEdit:
        return cls(
            request=EditRequest(**meta["request"]),
            layer=int(meta["layer"]),
            fingerprint="",
            ridge=float(meta["ridge"]),
            condition_number=float(meta["condition_number"]),
            losses=[float(x) for x in meta["losses"]],
            seconds=float(meta["seconds"]),
            left=tensors["left"],
            right=tensors["right"],
            key=tensors["key"],
            value=tensors["value"],
        )


def default_layer(model: HookedTransformer) -> int:
    """The layer ROME edits in ``model``: :data:`DEFAULT_LAYERS`, else a third of the way in."""
    name = model.cfg.model_name
    if name in DEFAULT_LAYERS and DEFAULT_LAYERS[name] < model.cfg.n_layers:
        return DEFAULT_LAYERS[name]
    return round(model.cfg.n_layers / 3)


def rome_edit(
    model: HookedTransformer,
    request: EditRequest,
    *,
    layer: int | None = None,
    hparams: ROMEHyperParams = ROMEHyperParams(),
    stats: KeyStats | None = None,
    progress: bool = True,
) -> RankOneEdit:
    """Compute the rank-one edit that writes ``request`` into ``blocks.{layer}.mlp.W_out``.

    The model is not changed: apply the result with ``edit.apply(model)`` or
    ``with rome_lens.edited(model, edit): ...``.

    Args:
        layer: the MLP layer to edit; ``None`` uses :func:`default_layer`.
        stats: key statistics of that layer; ``None`` loads or computes them
            (cached) with :func:`~rome_lens.stats.key_second_moment`.
    """
    layer = default_layer(model) if layer is None else check_layer(model, layer)
    check_request(model, request)
    moment = _key_moment(model, layer, hparams, stats, progress)
    started = time.perf_counter()
    templates = context_templates(model, hparams)
    with frozen(model):
        key = compute_keys(model, [request], layer, templates)[0]
        w_out, b_out = (p.detach().double() for p in _mlp_out_params(model, layer))
        v_init = w_out.T @ key + b_out
        deltas, losses = optimise_deltas(
            model, [request], layer, templates, v_init.norm()[None], hparams, progress=progress
        )
    delta = deltas[0]
    if moment is None:
        u, ridge, condition = key, 0.0, 1.0
    else:
        ridge, condition = moment.ridge(hparams.max_condition), moment.condition_number
        u = torch.linalg.solve(moment.regularised(ridge), key)
    return RankOneEdit(
        request=request,
        layer=layer,
        left=u / (u @ key),
        right=delta.double(),
        key=key,
        value=v_init + delta.double(),
        fingerprint=model_fingerprint(model, upto_layer=layer),
        ridge=ridge,
        condition_number=condition,
        losses=losses[0],
        seconds=time.perf_counter() - started,
    )


def _key_moment(
    model: HookedTransformer,
    layer: int,
    hparams: ROMEHyperParams,
    stats: KeyStats | None,
    progress: bool,
) -> KeyStats | None:
    if not hparams.mom2_adjustment:
        if stats is not None:
            raise ValueError("stats were given but hparams.mom2_adjustment is False (C = I)")
        return None
    return checked_stats(model, layer, stats, n_tokens=hparams.mom2_n_tokens, progress=progress)


def _mlp_out_params(model: HookedTransformer, layer: int) -> tuple[Tensor, Tensor]:
    mlp = model.blocks[layer].mlp
    w_out, b_out = mlp.W_out, mlp.b_out
    assert isinstance(w_out, Tensor) and isinstance(b_out, Tensor)
    return w_out, b_out
