"""The multi-layer pipeline MEMIT and AlphaEdit share; only the solve differs.

A multi-layer editor writes a batch of requests into ``blocks.{L}.mlp.W_out``
for a range of layers ``L_1 < … < L_last`` in five steps, all here but one:

1. **Check** the settings, the requests (no two giving one prompt different
   answers) and the layers, before any slow work.
2. **Start**: each layer's key statistics C, read, computed or given, and
   whatever the solve keeps (``start``, :class:`~rome_lens.editing.editors.EditorState`).
3. **Targets z_i** at ``blocks.{L_last}.hook_resid_post``, cached per request
   (:func:`subject_targets`): the cache key comes from the settings' own
   :meth:`~rome_lens.editing.requests.EditHyperParams.value_settings`, so MEMIT
   and AlphaEdit with the same δ settings share one z per request.
4. **Layers, in ascending order** (:func:`spread_over_layers`): with the
   earlier layers' updates in place, the keys K and the residual left
   ``r_i = z_i − h_i``; the layer takes ``r / (layers left)``, solved by the
   editor's :class:`LayerSolve`, the one part that differs: MEMIT's
   ``(λC + KᵀK)⁻¹KᵀR`` (:mod:`rome_lens.editing.memit`), AlphaEdit's null-space
   solve (:mod:`rome_lens.editing.alphaedit`).
5. **Outcomes**: every request read back on the edited model.

The result is a :class:`MultiLayerEdit`, built complete from its deltas, keys
and residual norms.

>>> import tempfile, torch, warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import (
...     AlphaEditHyperParams, EditRequest, MEMITHyperParams, get_editor)
>>> from rome_lens.stats import key_second_moment
>>> model, folder = tiny_model(), tempfile.mkdtemp()
>>> stats = {layer: key_second_moment(model, layer, n_tokens=500, cache_dir=folder,
...                                   progress=False) for layer in (0, 1)}
>>> requests = [EditRequest("{} is located in", "The Louvre", "Berlin")]
>>> edits = {}
>>> with warnings.catch_warnings(record=True):  # a random model may not take it
...     for name, settings in [("memit", MEMITHyperParams(context_lengths=(), v_steps=3)),
...                            ("alphaedit", AlphaEditHyperParams(context_lengths=(), v_steps=3))]:
...         edits[name] = get_editor(name).edit(model, requests, settings, layers=[0, 1],
...                                             stats=stats, cache_dir=folder, progress=False)
>>> torch.equal(edits["memit"].targets, edits["alphaedit"].targets)  # one z, from the cache
True
>>> edits["alphaedit"].layer_dataframe()[["layer", "requests"]].to_dict("records")
[{'layer': 0, 'requests': 1}, {'layer': 1, 'requests': 1}]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model, weight
from rome_lens.core.cache import cache_dir as cache_folder
from rome_lens.core.cache import cache_key, load_tensors, read_cached, save_tensors
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import dtype_name, model_dtype
from rome_lens.core.runtime import frozen
from rome_lens.editing.editors import BaseEditor, EditorState, RunOptions
from rome_lens.editing.memory import (
    compute_keys,
    context_templates,
    in_contexts,
    optimize_deltas,
    subject_activations,
)
from rome_lens.editing.patches import EditOutcome, WeightEdit, WeightPatch, edited, weights_as
from rome_lens.editing.requests import EditHyperParams, EditRequest, check_request
from rome_lens.stats.keys import DEFAULT_N_TOKENS, KeyStats

__all__ = [
    "LayerSolve",
    "LayerWrites",
    "MultiLayerEdit",
    "MultiLayerEditor",
    "MultiLayerHyperParams",
    "MultiLayerState",
    "anchored_targets",
    "check_requests",
    "spread_over_layers",
    "subject_residuals",
    "subject_targets",
    "target_path",
]


@dataclass(frozen=True)
class MultiLayerHyperParams(EditHyperParams):
    """What MEMIT and AlphaEdit share: :class:`~rome_lens.editing.requests.EditHyperParams`
    with MEMIT's values where they differ, and the fields below."""

    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    """MEMIT: "{}" + 5 of 10 tokens."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ ≤ this × ‖h‖ (MEMIT: 0.75 for GPT-2 XL and GPT-J)"""
    v_steps: int = 20
    """Most steps for δ (MEMIT: 20 for GPT-2 XL, 25 for GPT-J)"""
    mom2_n_tokens: int = DEFAULT_N_TOKENS
    """Tokens of key statistics when none are given."""
    requests_per_batch: int = 32
    """Requests whose δ are optimised together."""
    key_match: Literal["averaged", "both"] = "both"
    """Keys each request writes through: its context-averaged key alone, or that and its
    bare prompt's key, each at half weight (as ROME's ``key_match="both"``)."""

    rewind: bool = False
    """Compute each batch's targets z on the weights the editor's state started from, not
    on the model as earlier batches left it (NSE's weights rewinding): earlier edits do
    not bend later targets, and each z is cached once, for the unedited model."""
    value_norm_anchor: bool = False
    """Give every value the last layer writes, v* = (its MLP output) + δ, one norm: the
    trimmed mean (largest 5% dropped) of ‖v*‖ over the first batch (NAS's norm anchor),
    so that values, and updates, do not grow batch after batch."""
    anchor: float = 0.0
    """α, the weight of ‖W − W₀‖² in each layer's solve, W₀ the weights the state started
    from (soft preservation, as RLSEdit's anchor to the original weights); 0: none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_match not in ("averaged", "both"):
            raise ValueError(f"key_match must be 'averaged' or 'both', got {self.key_match!r}")
        if not (math.isfinite(self.anchor) and self.anchor >= 0):
            raise ValueError(f"anchor must be a finite number ≥ 0, got {self.anchor!r}")

    @property
    def keeps_original(self) -> bool:
        """Whether the state keeps the starting weights (to rewind to, or to anchor to)."""
        return self.rewind or self.anchor > 0


@dataclass(repr=False)
class MultiLayerEdit(WeightEdit):
    """A MEMIT or AlphaEdit edit: one ΔW for each ``blocks.{L}.mlp.W_out`` it touches."""

    kind = "multi_layer"
    requests: list[EditRequest]
    """The facts written, in order."""
    layers: list[int]
    """The edited MLPs, ascending."""
    delta: dict[int, Float[Tensor, "d_mlp d_model"]]
    """Layer -> ΔW (float64)"""
    targets: Float[Tensor, "request d_model"]
    """z_i at blocks.{layers[-1]}.hook_resid_post."""
    fingerprint: str
    """Of the weights feeding blocks.{layers[0]}.mlp.hook_post."""
    base_layer: int = -1
    """``layers[0]``; set in __post_init__."""
    residual_norms: list[float] = field(default_factory=list)
    """Mean ‖z − h‖ before each layer."""
    mom2_update_weight: float = 0.0
    """λ the edit was solved with (MEMIT's; 0 for AlphaEdit)."""
    seconds: float = 0.0
    """Time the edit took, key statistics and outcomes excluded."""
    stats_seconds: float = 0.0
    """Time spent obtaining the key statistics (and AlphaEdit's projectors)."""
    outcomes: list[EditOutcome] = field(default_factory=list)
    """Each request read back."""
    method: str = "memit"
    """The editor's name (``"memit"``, ``"alphaedit"``): how each layer's update was solved."""
    keys: dict[int, Float[Tensor, "row d_mlp"]] = field(default_factory=dict)
    """Layer -> the keys K solved for, one row per request, or two scaled by 1/√2 with
    ``key_match="both"`` (AlphaEdit adds KᵀK to what later batches preserve)."""
    weight_dtype: str = ""
    """The dtype of the weights it was computed on and is written back in ("bfloat16"...);
    ΔW itself is held in float64."""
    value_norm: float = 0.0
    """The norm every value v* was given (``value_norm_anchor``); 0: not anchored."""

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


@dataclass(frozen=True)
class MultiLayerState(EditorState):
    """What a multi-layer editor carries from batch to batch, besides the key statistics."""

    preserved: Mapping[int, Tensor] = field(default_factory=dict)
    """Layer -> Σ KᵀK over the keys of the edits applied so far (AlphaEdit's ``cache_c``,
    MEMIT's history term); empty at first, or the keys you choose to preserve."""
    original: Mapping[int, Tensor] = field(default_factory=dict)
    """Layer -> ``W_out`` when the state was started, kept when the settings rewind or
    anchor (:attr:`MultiLayerHyperParams.keeps_original`)."""
    value_norm: float | None = None
    """The norm values are anchored to, once the first anchored edit has set it."""

    def after(self, edit: WeightEdit) -> MultiLayerState:
        """The state once ``edit`` is applied: its keys join those preserved, and its value
        norm becomes the anchor if none was set.

        Args:
            edit: a multi-layer edit made from this state, now applied.

        Returns:
            The next state.
        """
        if not isinstance(edit, MultiLayerEdit):
            raise TypeError(f"{type(self).__name__} follows multi-layer edits, got {edit!r}")
        preserved = dict(self.preserved)
        for layer, keys in edit.keys.items():
            outer = keys.double().T @ keys.double()
            preserved[layer] = preserved[layer] + outer if layer in preserved else outer
        value_norm = self.value_norm
        if value_norm is None and edit.value_norm > 0:
            value_norm = edit.value_norm
        return dataclasses.replace(self, preserved=preserved, value_norm=value_norm)

    def starting_weights(self) -> dict[str, Tensor]:
        """``{"blocks.{L}.mlp.W_out": W₀}`` for every layer, to rewind to.

        Raises:
            ValueError: the state kept no starting weights.
        """
        missing = [layer for layer in self.layers if layer not in self.original]
        if missing:
            raise ValueError(
                f"the state kept no starting weights of layers {missing}: start it with "
                "settings that rewind or anchor"
            )
        return {f"blocks.{layer}.mlp.W_out": self.original[layer] for layer in self.layers}

    def drift(self, model: Model, layer: int) -> Float[Tensor, "d_mlp d_model"]:
        """``W − W₀`` at ``layer``, float64: how far earlier edits moved the weights.

        Raises:
            ValueError: the state kept no starting weights.
        """
        if layer not in self.original:
            raise ValueError(
                f"the state kept no starting weights of layer {layer}: start it with "
                "settings that rewind or anchor"
            )
        now = weight(model, f"blocks.{layer}.mlp.W_out").detach().double()
        return now - self.original[layer].to(now.device, torch.float64)


@dataclass(frozen=True)
class LayerSolve:
    """How each layer's update is solved: the one part in which multi-layer editors differ."""

    update: Callable[[int, Tensor, Tensor], Tensor]
    """``(layer, keys K [row d_mlp], residual share R [row d_model]) -> ΔW [d_mlp d_model]``."""
    mom2_update_weight: float = 0.0
    """λ, recorded with the edit (MEMIT's; other solves have none)."""


@dataclass(frozen=True)
class LayerWrites:
    """What :func:`spread_over_layers` found: each layer's ΔW, keys and residual left."""

    delta: dict[int, Tensor]
    """Layer -> ΔW (float64)."""
    keys: dict[int, Tensor]
    """Layer -> the keys solved for."""
    residual_norms: list[float]
    """Mean ‖z − h‖ before each layer's update."""


class MultiLayerEditor(BaseEditor[MultiLayerEdit]):
    """The shared pipeline (see the module docstring); subclasses give :meth:`solver`, and
    ``layers_by_default``."""

    batched = True
    settings_type: type[MultiLayerHyperParams]
    layers_by_default: Callable[[Model], list[int]]
    """The layers it edits in a model when none are given, e.g. ``default_memit_layers``."""

    def default_layers(self, model: Model) -> list[int]:
        """``layers_by_default(model)``."""
        return self.layers_by_default(model)

    @abstractmethod
    def solver(
        self, model: Model, settings: MultiLayerHyperParams, state: MultiLayerState
    ) -> LayerSolve:
        """How this editor solves each layer's update, from ``state`` (its layers,
        statistics and whatever else the editor keeps)."""

    def state_from(
        self,
        model: Model,
        settings: MultiLayerHyperParams,
        layers: list[int],
        stats: dict[int, KeyStats],
        started: float,
    ) -> MultiLayerState:
        """The layers and their statistics, nothing preserved yet, and the starting weights
        if the settings rewind or anchor."""
        original = {}
        if settings.keeps_original:
            original = {
                layer: weight(model, f"blocks.{layer}.mlp.W_out").detach().clone()
                for layer in layers
            }
        seconds = time.perf_counter() - started
        return MultiLayerState(tuple(layers), stats, seconds, original=original)

    def check_requests(self, model: Model, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests, checked, with no two giving one prompt different targets."""
        return check_requests(model, requests)

    def compute(
        self,
        model: Model,
        requests: list[EditRequest],
        settings: MultiLayerHyperParams,
        state: EditorState,
        options: RunOptions,
    ) -> MultiLayerEdit:
        """Targets z (cached per request), then each layer's share of the residual, solved
        by :meth:`solver`."""
        started = time.perf_counter()
        layers = list(state.layers)
        if not isinstance(state, MultiLayerState):
            raise TypeError(f"{self.label} edits from a MultiLayerState (its start()): {state!r}")
        solve = self.solver(model, settings, state)
        fingerprint = model_fingerprint(model, upto_layer=layers[0])
        templates = context_templates(model, settings)
        with frozen(model):
            with weights_as(model, state.starting_weights() if settings.rewind else {}):
                targets = subject_targets(model, requests, layers[-1], templates, settings, options)
                value_norm = 0.0
                if settings.value_norm_anchor:
                    targets, value_norm = anchored_targets(
                        model, requests, layers[-1], targets, state.value_norm
                    )
            written = spread_over_layers(
                model, requests, layers, targets, fingerprint, templates, solve,
                settings.key_match, options.progress,
            )  # fmt: skip
        return MultiLayerEdit(
            requests=requests,
            layers=layers,
            delta=written.delta,
            targets=targets,
            fingerprint=fingerprint,
            residual_norms=written.residual_norms,
            mom2_update_weight=solve.mom2_update_weight,
            seconds=time.perf_counter() - started,
            stats_seconds=state.seconds,
            method=self.name,
            keys=written.keys,
            weight_dtype=dtype_name(model_dtype(model)),
            value_norm=value_norm,
        )


def spread_over_layers(
    model: Model,
    requests: list[EditRequest],
    layers: list[int],
    targets: Float[Tensor, "request d_model"],
    fingerprint: str,
    templates: list[str],
    solve: LayerSolve,
    key_match: str,
    progress: bool,
) -> LayerWrites:
    """Each layer in turn takes its share of the residual left (MEMIT's step 2).

    Args:
        model: the model (left as it was: the earlier layers' updates are applied
            only while a layer's keys and residual are read).
        requests: the facts.
        layers: ascending MLP layers.
        targets: z_i at ``blocks.{layers[-1]}.hook_resid_post``.
        fingerprint: of the model up to ``layers[0]``.
        templates: the context templates the keys average over.
        solve: the layer's update from its keys and residual share.
        key_match: ``"both"`` adds each bare prompt's key as a second row with the
            same residual, both rows scaled by 1/√2 so that a request weighs as
            much against λC as with one key.
        progress: show a progress bar.

    Returns:
        Each layer's ΔW and keys (which no update of the edit changes: an MLP's
        keys depend only on the layers below it), and the residual left before it.
    """
    key_sets = [templates, ["{}"]] if key_match == "both" else [templates]
    scale = math.sqrt(len(key_sets))
    delta: dict[int, Tensor] = {}
    keys_of: dict[int, Tensor] = {}
    norms: list[float] = []
    for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", disable=not progress)):
        named = {f"blocks.{done}.mlp.W_out": d for done, d in delta.items()}
        with edited(model, WeightPatch(named, fingerprint, layers[0])):
            per_set = [compute_keys(model, requests, layer, t) for t in key_sets]
            keys = torch.cat(per_set) / scale  # [set·request, d_mlp]
            residual = targets - subject_residuals(model, requests, layers[-1])
        norms.append(residual.norm(dim=1).mean().item())
        share = residual / (len(layers) - i)  # [request, d_model]
        keys_of[layer] = keys
        delta[layer] = solve.update(layer, keys, share.repeat(len(key_sets), 1) / scale)
    return LayerWrites(delta, keys_of, norms)


def subject_residuals(
    model: Model, requests: Sequence[EditRequest], layer: int
) -> Float[Tensor, "request d_model"]:
    """h_i: ``blocks.{layer}.hook_resid_post`` at each bare prompt's last subject token.

    Args:
        model: the model.
        requests: the facts.
        layer: the layer.

    Returns:
        ``[request d_model]``, float64.
    """
    texts = [in_contexts(request, ["{}"])[0] for request in requests]
    return subject_activations(model, texts, f"blocks.{layer}.hook_resid_post")


def subject_targets(
    model: Model,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hparams: MultiLayerHyperParams,
    options: RunOptions,
) -> Float[Tensor, "request d_model"]:
    """z_i = h_i + δ_i for every request, read from the per-request cache where present.

    The missing ones are optimised together (``requests_per_batch`` at a time)
    and each saved under :func:`target_path`.

    Args:
        model: the model, as the edit will find it.
        requests: the facts.
        layer: the last edited layer (z lives at its ``hook_resid_post``).
        templates: the context templates δ is optimised over.
        hparams: the δ settings.
        options: the cache folder, whether to read and write cached z, and whether to
            show progress bars.

    Returns:
        ``[request d_model]`` targets, float64, on the model's device.
    """
    h = subject_residuals(model, requests, layer)
    fingerprint = model_fingerprint(model)  # z depends on every weight
    folder = options.cache_dir
    paths = [target_path(fingerprint, request, layer, hparams, folder) for request in requests]
    load = functools.partial(_load_target, device=h.device)
    targets = [read_cached(path, load) if options.use_cache else None for path in paths]
    missing = [i for i, z in enumerate(targets) if z is None]
    if missing:
        deltas, _ = optimize_deltas(
            model,
            [requests[i] for i in missing],
            layer,
            templates,
            h[missing].norm(dim=1),
            hparams,
            batch_size=hparams.requests_per_batch,
            hook=f"blocks.{layer}.hook_mlp_out",  # added to the residual as it is, on every family
            progress=options.progress,
        )
        for i, delta in zip(missing, deltas, strict=True):
            z = targets[i] = h[i] + delta.double()
            if options.use_cache:
                save_tensors(paths[i], {"z": z}, {"request": asdict(requests[i])})
    return torch.stack([z for z in targets if z is not None])


def anchored_targets(
    model: Model,
    requests: Sequence[EditRequest],
    layer: int,
    targets: Float[Tensor, "request d_model"],
    norm: float | None,
) -> tuple[Float[Tensor, "request d_model"], float]:
    """The targets with each value ``v* = v + δ`` set to one norm (NAS's norm anchor).

    ``v`` is ``blocks.{layer}.hook_mlp_out`` at the bare prompt's last subject token
    and ``δ = z − h``; the value keeps its direction and takes the norm ``norm``,
    or, for the first batch, the trimmed mean of its own values' norms (the
    largest 5% dropped), which later batches then keep.

    Args:
        model: the model the targets were computed on.
        requests: the facts.
        layer: the last edited layer.
        targets: z_i at ``blocks.{layer}.hook_resid_post``.
        norm: the anchor (``None``: set it from these values).

    Returns:
        The anchored targets, and the norm used.
    """
    texts = [in_contexts(request, ["{}"])[0] for request in requests]
    h = subject_activations(model, texts, f"blocks.{layer}.hook_resid_post")
    v = subject_activations(model, texts, f"blocks.{layer}.hook_mlp_out")
    values = v + (targets - h)  # [request d_model]
    norms = values.norm(dim=1)
    if norm is None:
        kept = max(1, math.ceil(0.95 * len(norms)))
        norm = float(norms.sort().values[:kept].mean())
    return h - v + values * (norm / norms)[:, None], norm


def target_path(
    fingerprint: str,
    request: EditRequest,
    layer: int,
    hparams: EditHyperParams,
    folder: str | os.PathLike[str] | None,
) -> Path:
    """The cache file of one z: keyed by the whole model, the layer, the settings that
    change δ (the settings' own :meth:`~EditHyperParams.value_settings`) and the request.

    Args:
        fingerprint: ``model_fingerprint(model)``.
        request: the fact.
        layer: the layer z lives at.
        hparams: the settings.
        folder: the cache folder (``None``: the default).

    Returns:
        The path.
    """
    key = cache_key(fingerprint, layer, hparams.value_settings(), asdict(request))
    return cache_folder(folder) / "memit_z" / f"L{layer}-{key}.st"


def _load_target(path: Path, device: torch.device) -> Tensor:
    return load_tensors(path)[0]["z"].to(device)


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
        raise ValueError("an edit needs at least one EditRequest, got none")
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
