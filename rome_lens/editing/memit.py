"""MEMIT: write thousands of facts at once, spread over several MLP layers.

Mass-Editing Memory in a Transformer (Meng et al. 2022, arXiv 2210.07229)
generalises ROME from one fact in one layer to many facts in a range of
layers ``L_1 < … < L_last``:

1. **Targets z_i.** For each request, z_i is the residual stream
   ``blocks.{L_last}.hook_resid_post`` at the subject's last token that makes
   the model say the new target: ``z_i = h_i + δ_i``, with δ_i optimised
   exactly as ROME's v* is (NLL over context prompts, KL on "{subject} is a",
   decay, norm clamp), by :func:`rome_lens.editing.memory.optimise_deltas`, many
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

The result is a :class:`MultiLayerEdit`, applied, reverted, saved and loaded
like a ROME edit (:mod:`rome_lens.editing.patches`), with every request read
back on the edited model (``edit.outcomes``). Memory grows linearly with the
number of requests: keys and targets are computed in batches, and the only
square matrices are ``d_mlp × d_mlp``.

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

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.cache import CacheError, discard, load_tensors, save_tensors
from rome_lens.core.cache import cache_dir as cache_folder
from rome_lens.core.fingerprint import check_layer, model_fingerprint
from rome_lens.core.precision import dtype_name, model_dtype
from rome_lens.core.runtime import frozen
from rome_lens.editing.defaults import default_memit_layers, default_mom2_update_weight
from rome_lens.editing.memory import (
    compute_keys,
    context_templates,
    in_contexts,
    optimise_deltas,
    subject_activations,
)
from rome_lens.editing.outcomes import measure_outcomes, warn_misses
from rome_lens.editing.patches import EditOutcome, WeightEdit, WeightPatch, edited
from rome_lens.editing.requests import EditHyperParams, EditRequest, check_hparams, check_request
from rome_lens.stats.keys import KeyStats, checked_stats

__all__ = ["MEMITHyperParams", "MultiLayerEdit", "memit_edit"]


@dataclass(frozen=True)
class MEMITHyperParams(EditHyperParams):
    """Settings of :func:`memit_edit`: those of
    :class:`~rome_lens.editing.requests.EditHyperParams` with MEMIT's values where they
    differ, and the fields below."""

    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    """MEMIT: "{}" + 5 of 10 tokens."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ ≤ this × ‖h‖ (MEMIT: 0.75 for GPT-2 XL and GPT-J)"""
    v_steps: int = 20
    """Most steps for δ (MEMIT: 20 for GPT-2 XL, 25 for GPT-J)"""
    mom2_update_weight: float | None = None
    """Λ (paper: 20k GPT-2 XL, 15k GPT-J); None: by model."""
    requests_per_batch: int = 32
    """Requests whose δ are optimised together."""
    key_match: Literal["averaged", "both"] = "both"
    """Keys each request writes through: its context-averaged key alone, or that and its
    bare prompt's key, each at half weight (as ROME's ``key_match="both"``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_match not in ("averaged", "both"):
            raise ValueError(f"key_match must be 'averaged' or 'both', got {self.key_match!r}")


@dataclass(repr=False)
class MultiLayerEdit(WeightEdit):
    """A MEMIT edit: one ΔW for each ``blocks.{L}.mlp.W_out`` it touches."""

    kind = "multi_layer"
    requests: list[EditRequest]
    """The facts written, in order."""
    layers: list[int]
    """The edited MLPs, ascending."""
    delta: dict[int, Float[Tensor, "d_mlp d_model"]]
    """Layer -> ΔW (float64)"""
    targets: Float[Tensor, "request d_model"]
    """Z_i at blocks.{layers[-1]}.hook_resid_post."""
    fingerprint: str
    """Of the weights feeding blocks.{layers[0]}.mlp.hook_post."""
    base_layer: int = -1
    """Layers[0]; set in __post_init__."""
    residual_norms: list[float] = field(default_factory=list)
    """Mean ‖z − h‖ before each layer."""
    mom2_update_weight: float = 0.0
    """Λ the edit was solved with."""
    seconds: float = 0.0
    """Time memit_edit took, key statistics excluded."""
    stats_seconds: float = 0.0
    """Time spent obtaining the key statistics."""
    outcomes: list[EditOutcome] = field(default_factory=list)
    """Each request read back."""
    method: str = "memit"
    """``"memit"`` or ``"alphaedit"``: how each layer's update was solved."""
    keys: dict[int, Float[Tensor, "row d_mlp"]] = field(default_factory=dict)
    """Layer -> the keys K solved for, one row per request, or two scaled by 1/√2 with
    ``key_match="both"`` (AlphaEdit adds KᵀK to what later batches preserve)."""
    weight_dtype: str = ""
    """The dtype of the weights it was computed on and is written back in ("bfloat16"...);
    ΔW itself is held in float64."""

    def __post_init__(self) -> None:
        self.base_layer = self.layers[0]

    def deltas(self) -> dict[str, Tensor]:
        return {f"blocks.{layer}.mlp.W_out": self.delta[layer] for layer in sorted(self.delta)}

    def layer_dataframe(self) -> pd.DataFrame:
        """One row per edited layer: ΔW's norm and the residual left before its update."""
        return pd.DataFrame(
            {
                "layer": self.layers,
                "parameter": list(self.deltas()),
                "delta_norm": [self.delta[layer].norm().item() for layer in self.layers],
                "residual_norm": self.residual_norms,
                "requests": len(self.requests),
            }
        )


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
    ``edit.apply(model)`` or ``with rome_lens.edited(model, edit): ...``.

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
        use_cache: read and write the cached targets z_i.
        progress: show progress bars.

    Returns:
        The edit, with every request read back on the edited model
        (``edit.outcomes``); it warns with ``EditMissWarning`` about requests that
        did not take.
    """
    hparams = MEMITHyperParams() if hparams is None else hparams
    check_hparams(hparams, MEMITHyperParams)
    requests = check_requests(model, requests)
    layers = check_layers(model, default_memit_layers(model) if layers is None else layers)
    given = stats or {}
    stats_started = time.perf_counter()
    moments = {
        layer: checked_stats(
            model,
            layer,
            given.get(layer),
            n_tokens=hparams.mom2_n_tokens,
            cache_dir=cache_dir,
            progress=progress,
        )
        for layer in layers
    }
    weight = hparams.mom2_update_weight
    if weight is None:
        weight = default_mom2_update_weight(model)
    fingerprint = model_fingerprint(model, upto_layer=layers[0])
    started = time.perf_counter()
    templates = context_templates(model, hparams)
    with frozen(model):
        targets = subject_targets(
            model, requests, layers[-1], templates, hparams, cache_dir, use_cache, progress
        )
        edit = MultiLayerEdit(
            requests=requests,
            layers=layers,
            delta={},
            targets=targets,
            fingerprint=fingerprint,
            mom2_update_weight=weight,
            stats_seconds=started - stats_started,
            weight_dtype=dtype_name(model_dtype(model)),
        )

        def solve(layer: int, keys: Tensor, residual: Tensor) -> Tensor:
            moment = moments[layer]
            regularised = moment.regularised(moment.ridge(hparams.max_condition))
            return _solve_update(regularised, keys, residual, weight)

        edit.keys = write_layers(model, edit, templates, solve, progress, hparams.key_match)
    edit.seconds = time.perf_counter() - started
    edit.outcomes = measure_outcomes(model, edit)
    warn_misses(edit)
    return edit


def write_layers(
    model: Model,
    edit: MultiLayerEdit,
    templates: list[str],
    solve: Callable[[int, Tensor, Tensor], Tensor],
    progress: bool,
    key_match: str,
) -> dict[int, Float[Tensor, "row d_mlp"]]:
    """MEMIT's step 2: each layer in turn takes its share of the residual left (in place).

    Args:
        model: the model (left as it was).
        edit: the edit, with its requests, layers and targets; ``edit.delta`` is filled.
        templates: the context templates the keys average over.
        solve: ``(layer, keys K, residual share R) -> ΔW`` for one layer.
        progress: show a progress bar.
        key_match: ``"both"`` adds each bare prompt's key as a second row with the
            same residual, both rows scaled by 1/√2 so that a request weighs as
            much against λC as with one key.

    Returns:
        Each layer's keys (which no update of the edit changes: an MLP's keys depend
        only on the layers below it).
    """
    layers, requests = edit.layers, edit.requests
    key_sets = [templates, ["{}"]] if key_match == "both" else [templates]
    scale = math.sqrt(len(key_sets))
    all_keys = {}
    for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", disable=not progress)):
        partial = WeightPatch(edit.deltas(), edit.fingerprint, layers[0])
        with edited(model, partial):
            per_set = [compute_keys(model, requests, layer, t) for t in key_sets]
            keys = torch.cat(per_set) / scale  # [set·request, d_mlp]
            residual = edit.targets - _subject_residuals(model, requests, layers[-1])
        edit.residual_norms.append(residual.norm(dim=1).mean().item())
        share = residual / (len(layers) - i)  # [request, d_model]
        all_keys[layer] = keys
        edit.delta[layer] = solve(layer, keys, share.repeat(len(key_sets), 1) / scale)
    return all_keys


def _solve_update(
    moment: Float[Tensor, "d_mlp d_mlp"],
    keys: Float[Tensor, "request d_mlp"],
    residual: Float[Tensor, "request d_model"],
    weight: float,
) -> Float[Tensor, "d_mlp d_model"]:
    """argmin_ΔW ‖K ΔW − R‖² + λ tr(ΔWᵀ C ΔW) = (λC + KᵀK)⁻¹ KᵀR, in float64."""
    keys, residual = keys.double(), residual.double()
    return torch.linalg.solve(weight * moment.double() + keys.T @ keys, keys.T @ residual)


def _subject_residuals(
    model: Model, requests: Sequence[EditRequest], layer: int
) -> Float[Tensor, "request d_model"]:
    """h_i: ``blocks.{layer}.hook_resid_post`` at each bare prompt's last subject token."""
    texts = [in_contexts(request, ["{}"])[0] for request in requests]
    return subject_activations(model, texts, f"blocks.{layer}.hook_resid_post")


def subject_targets(
    model: Model,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hparams: MEMITHyperParams,
    folder: str | os.PathLike[str] | None,
    use_cache: bool,
    progress: bool,
) -> Float[Tensor, "request d_model"]:
    """z_i = h_i + δ_i for every request, read from the per-request cache where present.

    Args:
        model: the model, as the edit will find it.
        requests: the facts.
        layer: the last edited layer (z lives at its ``hook_resid_post``).
        templates: the context templates δ is optimised over.
        hparams: the δ settings.
        folder: the cache folder.
        use_cache: read and write cached z.
        progress: show progress bars.

    Returns:
        ``[request d_model]`` targets, float64, on the model's device.
    """
    h = _subject_residuals(model, requests, layer)
    fingerprint = model_fingerprint(model)  # z depends on every weight
    paths = [_z_path(fingerprint, request, layer, hparams, folder) for request in requests]
    targets: list[Tensor | None] = [_load_z(p, h.device) if use_cache else None for p in paths]
    missing = [i for i, z in enumerate(targets) if z is None]
    if missing:
        deltas, _ = optimise_deltas(
            model,
            [requests[i] for i in missing],
            layer,
            templates,
            h[missing].norm(dim=1),
            hparams,
            batch_size=hparams.requests_per_batch,
            hook=f"blocks.{layer}.hook_mlp_out",  # added to the residual as it is, on every family
            progress=progress,
        )
        for i, delta in zip(missing, deltas, strict=True):
            z = targets[i] = h[i] + delta.double()
            if use_cache:
                save_tensors(paths[i], {"z": z}, {"request": asdict(requests[i])})
    return torch.stack([z for z in targets if z is not None])


def _z_path(
    fingerprint: str,
    request: EditRequest,
    layer: int,
    hparams: MEMITHyperParams,
    folder: str | os.PathLike[str] | None,
) -> Path:
    """Cache file of one z: keyed by the whole model, the layer, the δ settings and the request."""
    settings = asdict(hparams)
    for unused in ("mom2_update_weight", "mom2_n_tokens", "max_condition", "requests_per_batch",
                   "null_space_energy", "l2", "key_match"):  # fmt: skip
        settings.pop(unused, None)  # they do not change z (MEMIT and AlphaEdit share it)
    key = json.dumps([fingerprint, layer, settings, asdict(request)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_folder(folder) / "memit_z" / f"L{layer}-{digest}.st"


def _load_z(path: Path, device: torch.device) -> Tensor | None:
    try:
        return load_tensors(path)[0]["z"].to(device)
    except FileNotFoundError:
        return None
    except (CacheError, KeyError) as err:
        discard(path, str(err))
        return None


def check_requests(model: Model, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """The requests as a list, after every check ROME makes and a check for conflicts.

    Args:
        model: the model to edit.
        requests: the facts.

    Returns:
        The requests, as a list.

    Raises:
        ValueError: no request, a bad one, or two giving one prompt different targets.
    """
    requests = list(requests)
    if not requests:
        raise ValueError("memit_edit needs at least one EditRequest, got none")
    seen: dict[tuple[str, str], EditRequest] = {}
    for request in requests:
        check_request(model, request)
        key = (request.prompt, request.subject)
        other = seen.setdefault(key, request)
        if other.target_new.strip() != request.target_new.strip():
            raise ValueError(
                f"two requests set {request.prompt!r} for subject {request.subject!r} to "
                f"different targets: {other!r} and {request!r} "
                "(rome_lens.without_conflicts keeps the first of such CounterFact cases)"
            )
    return requests


def check_layers(model: Model, layers: Sequence[int]) -> list[int]:
    """The layers, checked: in range, at least one, strictly ascending.

    Args:
        model: the model.
        layers: the MLP layers to edit.

    Returns:
        The layers, as a list.
    """
    layers = [check_layer(model, layer) for layer in layers]
    if not layers:
        raise ValueError("layers must name at least one MLP layer, got none")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"layers must be in strictly ascending order, got {layers}")
    return layers
