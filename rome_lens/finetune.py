"""The FT+L baseline: fine-tune one ``W_out`` under an L∞ constraint.

ROME's paper compares against constrained fine-tuning (Zhu et al. 2020): train
the edited layer's weights on the new fact with Adam, and after every step
clip each entry of the change to ``[-ε, ε]`` so the model cannot drift far.
Here the trained weight is the same ``blocks.{L}.mlp.W_out`` that ROME edits,
so the two methods differ only in how they choose ΔW, and
:func:`~rome_lens.evaluate.evaluate_edits` can run both in one go.

The change ΔW is trained outside the model: a hook adds ``k @ ΔW`` to
``hook_mlp_out``, where ``k`` is the layer's key, which equals editing
``W_out``. The weights are never touched, and the result is a
:class:`~rome_lens.patches.WeightPatch` applied and reverted like any edit.

>>> import rome_lens
>>> from rome_lens.finetune import ft_edit
>>> from rome_lens.rome import EditRequest
>>> model = rome_lens.tiny_model()
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> patch = ft_edit(model, request, layer=1, progress=False)
>>> round(patch.delta["blocks.1.mlp.W_out"].abs().max().item(), 6)  # ε, the L∞ bound
0.0005
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rome_lens.fingerprint import check_layer
from rome_lens.hooks import add_product, attached, capture
from rome_lens.models import frozen, linear_layout
from rome_lens.patches import WeightPatch
from rome_lens.rome import EditRequest, default_layer
from rome_lens.tokens import prompt_tokens, subject_range, target_token_ids

__all__ = ["FTHyperParams", "ft_edit"]


@dataclass(frozen=True)
class FTHyperParams:
    """Settings of :func:`ft_edit` (ROME's FT+L settings for GPT-2 XL)."""

    lr: float = 5e-4  # Adam learning rate
    steps: int = 25  # most optimisation steps
    norm_constraint: float = 5e-4  # ε: every entry of ΔW stays in [-ε, ε]
    early_stop_nll: float = 1e-2  # stop once the NLL of target_new is below this


def ft_edit(
    model: HookedTransformer,
    request: EditRequest,
    *,
    layer: int | None = None,
    hparams: FTHyperParams = FTHyperParams(),
    progress: bool = True,
) -> WeightPatch:
    """Fine-tune ``blocks.{layer}.mlp.W_out`` on the request's prompt (the model is not changed)."""
    layer = default_layer(model) if layer is None else check_layer(model, layer)
    subject_range(model, request.text, request.subject, start=request.subject_start)
    started = time.perf_counter()
    head = prompt_tokens(model, request.text)[0].tolist()
    answer = target_token_ids(model, request.text, request.target_new)
    tokens = torch.tensor([head + answer[:-1]], device=model.cfg.device)
    positions = torch.arange(len(head) - 1, len(head) - 1 + len(answer))
    n_layers = model.cfg.n_layers
    w_out = model.blocks[layer].mlp.W_out
    delta = torch.zeros(w_out.shape, device=w_out.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.lr)
    keys: list[torch.Tensor] = []
    hooks = [
        (f"blocks.{layer}.mlp.hook_post", capture(keys)),
        (f"blocks.{layer}.hook_mlp_out", add_product(keys, delta)),
    ]
    losses: list[float] = []
    with frozen(model), linear_layout(model):
        with torch.no_grad():
            resid = model(tokens, stop_at_layer=layer)
        steps = tqdm(range(hparams.steps), desc="fine-tuning", disable=not progress, leave=False)
        with torch.enable_grad(), attached(model, hooks):
            for _ in steps:
                keys.clear()
                final = model(resid, start_at_layer=layer, stop_at_layer=n_layers)
                logits = model(final[:, positions], start_at_layer=n_layers)[0]
                nll = -logits.float().log_softmax(-1)[torch.arange(len(answer)), answer].mean()
                losses.append(nll.item())
                if nll.item() < hparams.early_stop_nll:
                    break
                optimizer.zero_grad()
                nll.backward()
                optimizer.step()
                with torch.no_grad():
                    delta.clamp_(-hparams.norm_constraint, hparams.norm_constraint)
    return WeightPatch.for_model(
        model,
        {f"blocks.{layer}.mlp.W_out": delta.detach().double().cpu()},
        method="ft",
        request=asdict(request),
        losses=losses,
        seconds=time.perf_counter() - started,
    )
