"""The FT+L baseline: fine-tune one ``W_out`` under an L∞ constraint.

ROME's paper compares against constrained fine-tuning (Zhu et al. 2020): train
the edited layer's weights on the new fact with Adam, and after every step
clip each entry of the change to ``[-ε, ε]`` so the model cannot drift far.
Here the trained weight is the same ``blocks.{L}.mlp.W_out`` that ROME edits,
so the two methods differ only in how they choose ΔW, and
:func:`~rome_lens.evaluation.evaluate_edits` can run both in one go.

The change ΔW is trained outside the model: a hook adds ``k @ ΔW`` to
``W_out``'s output (``hook_mlp_out``), where ``k`` is the layer's key, which equals editing
``W_out``. The weights are never touched, and the result is a
:class:`~rome_lens.editing.patches.WeightPatch` applied and reverted like any
edit, with its request read back on the edited model (``patch.outcomes``).

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import EditRequest, ft_edit
>>> model = tiny_model()
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> with warnings.catch_warnings(record=True):  # ε = 5e-4 rarely moves a fact
...     patch = ft_edit(model, request, layer=1, progress=False)
>>> round(patch.delta["blocks.1.mlp.W_out"].abs().max().item(), 6)  # ε, the L∞ bound
0.0005
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model, forward, mlp_output_hook, weight
from rome_lens.core.hooks import add_product, attached, record
from rome_lens.core.precision import model_device
from rome_lens.core.runtime import frozen, linear_layout, run_to_layer, unembed
from rome_lens.core.tokens import prompt_tokens, target_token_ids
from rome_lens.editing.editors import EditorState, RunOptions, SingleLayerEditor
from rome_lens.editing.patches import WeightPatch
from rome_lens.editing.registry import register_editor
from rome_lens.editing.requests import EditorSettings, EditRequest

__all__ = ["FT", "FTEditor", "FTHyperParams", "ft_edit"]


@dataclass(frozen=True)
class FTHyperParams(EditorSettings):
    """Settings of :func:`ft_edit` (ROME's FT+L settings for GPT-2 XL)."""

    lr: float = 5e-4
    """Adam learning rate."""
    steps: int = 25
    """Most optimisation steps."""
    norm_constraint: float = 5e-4
    """ε: every entry of ΔW stays in [-ε, ε]."""
    early_stop_nll: float = 1e-2
    """Stop once the NLL of target_new is below this."""


class FTEditor(SingleLayerEditor[WeightPatch]):
    """FT+L as an :class:`~rome_lens.editing.editors.Editor`: one request, ROME's layer, no
    key statistics."""

    name = "ft"
    label = "FT+L"
    settings_type = FTHyperParams

    def unread_stats(self, settings: FTHyperParams) -> str | None:
        """FT+L trains ΔW on the request alone: it reads no key statistics."""
        return "FT+L reads no key statistics"

    def compute(
        self,
        model: Model,
        requests: list[EditRequest],
        settings: FTHyperParams,
        state: EditorState,
        options: RunOptions,
    ) -> WeightPatch:
        """ΔW trained on the one request (see the module docstring); FT+L caches nothing."""
        (request,), (layer,) = requests, state.layers
        started = time.perf_counter()
        delta, losses = _train_delta(model, request, layer, settings, options.progress)
        return WeightPatch.for_model(
            model,
            {f"blocks.{layer}.mlp.W_out": delta.double()},
            requests=[request],
            method="ft",
            losses=losses,
            seconds=time.perf_counter() - started,
        )


FT = register_editor(FTEditor())
"""The registered FT+L editor (``get_editor("ft")``)."""


def _train_delta(
    model: Model, request: EditRequest, layer: int, hparams: FTHyperParams, progress: bool
) -> tuple[Tensor, list[float]]:
    """ΔW trained with Adam on the target's NLL, clamped to [-ε, ε], and the NLL per step."""
    head = prompt_tokens(model, request.text)[0].tolist()
    answer = target_token_ids(model, request.text, request.target_new)
    tokens = torch.tensor([head + answer[:-1]], device=model_device(model))
    positions = torch.arange(len(head) - 1, len(head) - 1 + len(answer))
    n_layers = model.cfg.n_layers
    w_out = weight(model, f"blocks.{layer}.mlp.W_out")
    delta = torch.zeros(w_out.shape, device=w_out.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.lr)
    keys: list[Tensor] = []
    hooks = [
        (f"blocks.{layer}.mlp.hook_post", record(keys)),
        (mlp_output_hook(model, layer), add_product(keys, delta)),
    ]
    losses: list[float] = []
    with frozen(model), linear_layout(model):
        with torch.no_grad():
            resid = run_to_layer(model, tokens, layer)
        steps = tqdm(range(hparams.steps), desc="fine-tuning", disable=not progress, leave=False)
        with torch.enable_grad(), attached(model, hooks):
            for _ in steps:
                keys.clear()
                final = forward(model, resid, start_at_layer=layer, stop_at_layer=n_layers)
                logits = unembed(model, final[0, positions])
                nll = -logits.float().log_softmax(-1)[torch.arange(len(answer)), answer].mean()
                losses.append(nll.item())
                if nll.item() < hparams.early_stop_nll:
                    break
                optimizer.zero_grad()
                nll.backward()
                optimizer.step()
                with torch.no_grad():
                    delta.clamp_(-hparams.norm_constraint, hparams.norm_constraint)
    return delta.detach(), losses


def ft_edit(
    model: Model,
    request: EditRequest,
    *,
    layer: int | None = None,
    hparams: FTHyperParams | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> WeightPatch:
    """Fine-tune ``blocks.{layer}.mlp.W_out`` on the request's prompt (the model is not changed).

    The same edit as ``get_editor("ft").edit(model, [request], hparams, ...)``.

    Args:
        model: any TransformerLens model with MLPs.
        request: the fact to write.
        layer: the MLP layer to train; ``None`` uses ROME's default layer.
        hparams: the settings (``None``: :class:`FTHyperParams` defaults).
        cache_dir: the rome_lens cache folder; FT+L caches nothing, and takes it
            as every editor does.
        use_cache: likewise unused.
        progress: show a progress bar.

    Returns:
        The trained ΔW as a patch, with the request read back (``patch.took``);
        it warns with ``EditMissWarning`` when the new answer did not take.
    """
    return FT.edit(
        model,
        [request],
        hparams,
        layers=None if layer is None else [layer],
        cache_dir=cache_dir,
        use_cache=use_cache,
        progress=progress,
    )
