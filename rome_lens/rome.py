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
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from rome_lens.fingerprint import check_layer, model_fingerprint
from rome_lens.generation import sample_text
from rome_lens.hooks import add_at_rows, attached, capture
from rome_lens.models import DEFAULT_MODEL_NAME, frozen, linear_layout
from rome_lens.patches import WeightEdit
from rome_lens.predict import pad
from rome_lens.stats import DEFAULT_N_TOKENS, KeyStats, key_second_moment
from rome_lens.tokens import prompt_tokens, subject_range, target_token_ids

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
_CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
_TEMPLATES: weakref.WeakKeyDictionary[HookedTransformer, dict[object, list[str]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` with ``{}`` where the subject goes."""

    prompt: str  # e.g. "{} is located in the city of"
    subject: str  # e.g. "The Eiffel Tower"
    target_new: str  # the new answer, e.g. "Rome"
    target_true: str | None = None  # the current answer, if known, e.g. "Paris"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or "{}" not in self.prompt:
            raise ValueError(
                f'prompt must contain "{{}}" where the subject goes, got {self.prompt!r}'
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError(f"subject must be a non-empty string, got {self.subject!r}")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValueError(f"target_new must be a non-empty string, got {self.target_new!r}")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            warnings.warn(
                f"target_new {self.target_new!r} equals the true answer: the edit changes nothing",
                stacklevel=3,
            )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_start(self) -> int:
        """Character offset of the subject in :attr:`text`."""
        return self.prompt.index("{}")


@dataclass(frozen=True)
class ROMEHyperParams:
    """Settings of :func:`rome_edit` (ROME's defaults for GPT-2 XL unless noted)."""

    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (tokens, how many)
    context_seed: int = 0  # seed of the sampled context prefixes
    kl_prompt: str = "{} is a"  # essence prompt whose prediction the KL term preserves
    v_lr: float = 0.5  # Adam learning rate for δ
    v_steps: int = 20  # most optimisation steps for δ
    v_weight_decay: float = 0.5  # weight of ‖δ‖ / ‖v_init‖² in the loss (ROME's form)
    clamp_norm_factor: float = 4.0  # ‖δ‖ is clamped to this × ‖v_init‖
    kl_factor: float = 0.0625  # weight of the KL term
    early_stop_nll: float = 5e-2  # stop once the NLL of target_new is below this
    mom2_adjustment: bool = True  # use C = E[kkᵀ]; False edits with C = I (worse specificity)
    mom2_n_tokens: int = DEFAULT_N_TOKENS  # tokens of key statistics when stats=None
    max_condition: float = 1e10  # C above this condition number gets a ridge (and a warning)

    def __post_init__(self) -> None:
        if "{}" not in self.kl_prompt:
            raise ValueError(
                f'kl_prompt must contain "{{}}" for the subject, got {self.kl_prompt!r}'
            )


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


def context_templates(model: HookedTransformer, hparams: ROMEHyperParams) -> list[str]:
    """``"{}"`` and the sampled prefixes, each ending in ``". {}"`` (ROME's contexts).

    Sampled once per model object and settings, as ROME does, so that a series
    of edits shares one set of contexts even as the weights change.
    """
    settings = (hparams.context_lengths, hparams.context_seed)
    memo = _TEMPLATES.setdefault(model, {})
    if settings not in memo:
        memo[settings] = _sample_templates(model, hparams)
    return list(memo[settings])


def _sample_templates(model: HookedTransformer, hparams: ROMEHyperParams) -> list[str]:
    templates = ["{}"]
    for length, count in hparams.context_lengths:
        starts = [_CONTEXT_STARTS[i % len(_CONTEXT_STARTS)] for i in range(count)]
        seed = hparams.context_seed + length
        for text in sample_text(model, starts, length, seed=seed, top_k=5):
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


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
    prompt_tokens(model, request.text)  # the filled prompt must fit the context
    subject_range(model, request.text, request.subject, start=request.subject_start)
    target_ids = target_token_ids(model, request.text, request.target_new)
    moment = _key_moment(model, layer, hparams, stats, progress)
    started = time.perf_counter()
    templates = context_templates(model, hparams)
    with frozen(model):
        key = compute_key(model, request, layer, templates)
        w_out, b_out = (p.detach().double() for p in _mlp_out_params(model, layer))
        v_init = w_out.T @ key + b_out
        delta, losses = compute_delta(
            model, request, layer, templates, target_ids, v_init, hparams, progress
        )
    ridge, condition = _ridge(moment, hparams.max_condition)
    if moment is None:
        u = key
    else:
        eye = torch.eye(len(key), dtype=torch.float64)
        u = torch.linalg.solve(moment.moment + ridge * eye, key)
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
        losses=losses,
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
    if stats is None:
        return key_second_moment(model, layer, n_tokens=hparams.mom2_n_tokens, progress=progress)
    stats.check(model, layer)
    return stats


def _ridge(stats: KeyStats | None, max_condition: float) -> tuple[float, float]:
    """The diagonal to add to C so its condition number is at most ``max_condition``."""
    if stats is None:
        return 0.0, 1.0
    condition = stats.condition_number
    if condition <= max_condition:
        return 0.0, condition
    low, high = stats.eigenvalues[0].item(), stats.eigenvalues[-1].item()
    ridge = (high - max_condition * low) / (max_condition - 1)
    warnings.warn(
        f"key statistics of layer {stats.layer} are ill-conditioned (condition number "
        f"{condition:.3g} from {stats.n_tokens} tokens): adding {ridge:.3g} to the diagonal; "
        "compute them over more tokens",
        stacklevel=3,
    )
    return ridge, condition


def _mlp_out_params(model: HookedTransformer, layer: int) -> tuple[Tensor, Tensor]:
    mlp = model.blocks[layer].mlp
    w_out, b_out = mlp.W_out, mlp.b_out
    assert isinstance(w_out, Tensor) and isinstance(b_out, Tensor)
    return w_out, b_out


def _in_contexts(request: EditRequest, templates: list[str]) -> list[tuple[str, str, int]]:
    """The request's prompt inside each context template, with the subject's offset."""
    out = []
    for template in templates:
        prefix = template[: template.index("{}")]
        out.append((prefix + request.text, request.subject, len(prefix) + request.subject_start))
    return out


def _encode(
    model: HookedTransformer, texts: list[tuple[str, str, int]]
) -> tuple[list[list[int]], list[int]]:
    """Tokens of each ``(text, subject, subject_start)``, and the subject's last token in each."""
    sequences, last = [], []
    for text, subject, start in texts:
        sequences.append(prompt_tokens(model, text)[0].tolist())
        last.append(subject_range(model, text, subject, start=start)[1] - 1)
    return sequences, last


def compute_key(
    model: HookedTransformer, request: EditRequest, layer: int, templates: list[str]
) -> Float[Tensor, " d_mlp"]:
    """k\\*: ``blocks.{layer}.mlp.hook_post`` at the last subject token, averaged over contexts."""
    sequences, last = _encode(model, _in_contexts(request, templates))
    tokens, _ = pad([torch.tensor(s) for s in sequences], 0, "right")
    store: list[Tensor] = []
    hooks = [(f"blocks.{layer}.mlp.hook_post", capture(store))]
    with torch.inference_mode(), attached(model, hooks):
        # Right padding needs no mask: under causal attention real tokens never see pads.
        model(tokens.to(model.cfg.device), stop_at_layer=layer + 1)
    keys = store[0][torch.arange(len(last)), torch.tensor(last)]
    return keys.double().mean(0).cpu()


class ValueObjective:
    """The model's log-probabilities at chosen positions as a function of δ, computed cheaply.

    δ is added to ``blocks.{layer}.hook_mlp_out`` at each sequence's last subject
    token, so nothing before that token, and nothing below ``layer``, depends on
    it. Those parts are computed once: the tokens before the subject's last
    token are left-padded into a common prefix whose keys and values go into a
    frozen TransformerLens KV cache, and the rest of each sequence (the
    "suffix", right-padded) is run up to ``layer``. Each call then runs only
    the suffix through the layers from ``layer`` on, about a quarter of the
    positions and, at early layers, most of the depth.
    """

    def __init__(
        self,
        model: HookedTransformer,
        layer: int,
        sequences: list[list[int]],
        subject_last: list[int],
        reads: list[tuple[int, int]],
    ) -> None:
        """``reads`` are the (sequence, position) pairs whose next-token log-probs are returned."""
        self.model, self.layer = model, layer
        device = model.cfg.device
        width = max(subject_last)
        prefixes = [
            torch.tensor(seq[:last], dtype=torch.long)
            for seq, last in zip(sequences, subject_last, strict=True)
        ]
        suffixes = [
            torch.tensor(seq[last:], dtype=torch.long)
            for seq, last in zip(sequences, subject_last, strict=True)
        ]
        suffix, _ = pad(suffixes, 0, "right")  # causal attention never reads right pads
        self.cache: TransformerLensKeyValueCache | None = None
        self.mask: Tensor | None = None
        with torch.no_grad():
            if width > 0:
                prefix, prefix_mask = pad(prefixes, 0, "left")
                self.cache = TransformerLensKeyValueCache.init_cache(
                    model.cfg, device, len(sequences)
                )
                model(
                    prefix.to(device),
                    attention_mask=prefix_mask.to(device),
                    past_kv_cache=self.cache,
                )
                self.cache.freeze()
                self.mask = torch.cat([prefix_mask, torch.ones_like(suffix)], dim=1).to(device)
            self.resid = model(
                suffix.to(device),
                attention_mask=None if self.cache is None else torch.ones_like(suffix).to(device),
                past_kv_cache=self.cache,
                stop_at_layer=layer,
            )
        self.read_rows = torch.tensor([row for row, _ in reads], device=device)
        self.read_positions = torch.tensor(
            [position - subject_last[row] for row, position in reads], device=device
        )
        self.hook_rows = torch.arange(len(sequences), device=device)
        self.hook_positions = torch.zeros(len(sequences), dtype=torch.long, device=device)

    def __call__(self, delta: Float[Tensor, " d_model"]) -> Float[Tensor, "read vocab"]:
        """Log-probabilities of the next token at every read position, with δ added."""
        model, n_layers = self.model, self.model.cfg.n_layers
        hook = add_at_rows(self.hook_rows, self.hook_positions, delta)
        with attached(model, [(f"blocks.{self.layer}.hook_mlp_out", hook)]):
            final = model(
                self.resid,
                start_at_layer=self.layer,
                stop_at_layer=n_layers,
                past_kv_cache=self.cache,
                attention_mask=self.mask,
            )
        picked = final[self.read_rows, self.read_positions]
        logits = model(picked[:, None], start_at_layer=n_layers)[:, 0]
        return logits.float().log_softmax(-1).cpu()


def compute_delta(
    model: HookedTransformer,
    request: EditRequest,
    layer: int,
    templates: list[str],
    target_ids: list[int],
    v_init: Float[Tensor, " d_model"],
    hparams: ROMEHyperParams,
    progress: bool = True,
) -> tuple[Float[Tensor, " d_model"], list[float]]:
    """δ = v\\* − v_init, optimised so the model says ``target_new`` (see module docstring)."""
    rewrites = _in_contexts(request, templates)
    kl_text = hparams.kl_prompt.replace("{}", request.subject, 1)
    kl = (kl_text, request.subject, hparams.kl_prompt.index("{}"))
    sequences, subject_last = _encode(model, [*rewrites, kl])
    sequences = [seq + target_ids[:-1] for seq in sequences[:-1]] + [sequences[-1]]
    if max(len(s) for s in sequences) > model.cfg.n_ctx:
        raise ValueError(f"a context prompt is longer than the model's n_ctx={model.cfg.n_ctx}")
    # Read each target token's prediction in every rewrite prompt, then the KL prompt's last.
    reads, answers = [], []
    for row, seq in enumerate(sequences[:-1]):
        first = len(seq) - len(target_ids)
        reads += [(row, first + j) for j in range(len(target_ids))]
        answers += target_ids
    reads.append((len(sequences) - 1, len(sequences[-1]) - 1))
    objective = ValueObjective(model, layer, sequences, subject_last, reads)
    answer_ids = torch.tensor(answers)[:, None]
    n_rewrites, n_target = len(rewrites), len(target_ids)

    delta = torch.zeros(model.cfg.d_model, device=v_init.device, requires_grad=True)
    init_norm = v_init.norm().item()
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    losses: list[float] = []
    init_kl: Tensor | None = None
    steps = tqdm(range(hparams.v_steps), desc="optimising v*", disable=not progress, leave=False)
    with torch.enable_grad(), linear_layout(model):
        for _ in steps:
            log_probs = objective(delta.to(model.cfg.device))
            token_nll = -log_probs[:-1].gather(1, answer_ids)[:, 0]
            nll = token_nll.view(n_rewrites, n_target).mean(1).mean()
            if init_kl is None:
                init_kl = log_probs[-1:].detach()
            kl_loss = F.kl_div(init_kl, log_probs[-1:], log_target=True, reduction="batchmean")
            decay = delta.norm() / init_norm**2
            loss = nll + hparams.kl_factor * kl_loss + hparams.v_weight_decay * decay
            losses.append(loss.item())
            steps.set_postfix(nll=f"{nll.item():.3f}")
            if nll.item() < hparams.early_stop_nll:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                max_norm = hparams.clamp_norm_factor * init_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return delta.detach().cpu(), losses
