"""Causal tracing: where does a model recall a fact?

ROME's experiment (Meng et al. 2022, arXiv 2202.05262) in three runs:

1. **Clean**: run the prompt and note the probability of the answer.
2. **Corrupted**: add Gaussian noise to the subject's token embeddings
   (``hook_embed``); the answer's probability collapses.
3. **Restored**: in the corrupted run, put back one clean activation at one
   (token, layer) and see how much of the answer comes back. That gain over the
   corrupted run is the *indirect effect* of the state.

Three kinds of state are restored:

* ``"resid"``: ``blocks.{l}.hook_resid_post`` at token t;
* ``"mlp"`` / ``"attn"``: ``blocks.{j}.hook_mlp_out`` / ``hook_attn_out`` at
  token t for the ``window`` layers ``j`` around ``l``, as ROME does
  (``window=1`` restores the single layer).

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.tracing.engine import trace_fact
>>> model = tiny_model()  # random weights: it knows no fact, so the trace warns
>>> with warnings.catch_warnings(record=True):
...     trace = trace_fact(model, "The Eiffel Tower is located in the city of",
...                        "The Eiffel Tower", kinds=("mlp",), samples=2, progress=False)
>>> trace.scores.shape  # (kind, token, layer)
torch.Size([1, 10, 3])
>>> list(trace.to_dataframe().columns[:4])
['kind', 'token', 'str_token', 'layer']

How it is fast
--------------
ROME's code runs one forward pass per (token, layer, kind). Here the clean and
corrupted runs happen once and are cached: the corrupted residual stream
before every layer, and the corrupted keys and values of every layer. A
restoration at (t, l) then starts at the first layer it changes
(``start_at_layer``) from the cached corrupted residual, and only for
positions ``t`` onwards: earlier positions cannot see the restoration, so
their keys and values come from the cache (a frozen ``past_kv_cache``).
Restorations at the same token share one batch that grows as it descends the
layers, so each layer is one forward call for every cell that has started.
Tokens before the subject are never run: their clean and corrupted states are
the same, so restoring them scores the corrupted probability.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core import backend, hooks
from rome_lens.core.backend import Model
from rome_lens.core.distributed import Split, gather_bytes, is_main, shard
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import model_device, to_host
from rome_lens.core.runtime import linear_layout, unembed
from rome_lens.core.tokens import prompt_tokens, subject_range, target_token_ids
from rome_lens.tracing.results import (
    TOKEN_GROUPS,
    AverageEffects,
    CausalTrace,
    SeveredTrace,
    UnreliableTraceWarning,
    warn_if_unreliable,
)

__all__ = [
    "KINDS",
    "average_causal_effects",
    "embedding_noise_scale",
    "trace_fact",
    "trace_severed",
    "window_layers",
]

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("resid", "mlp", "attn")
_OUTPUT_HOOK = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}
NOISE_FACTOR = 3.0  # ROME's noise: 3 standard deviations of the subject embeddings


# --------------------------------------------------------------------------- public API


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored around ``layer``: ROME's ``[l - window//2, l + ceil(window/2))``.

    Args:
        layer: the window's centre.
        window: its width.
        n_layers: the model's depth (the window is clipped to it).

    Returns:
        The layers restored together.
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def embedding_noise_scale(
    model: Model, subjects: Iterable[str], factor: float = NOISE_FACTOR
) -> float:
    """``factor`` × the std of the subjects' token embeddings, pooled as ROME does.

    Args:
        model: any TransformerLens model with a tokenizer.
        subjects: the subjects whose token embeddings are pooled.
        factor: how many standard deviations.

    Returns:
        The noise standard deviation.
    """
    device = model_device(model)
    with torch.inference_mode():
        rows = [model.embed(model.to_tokens(s, prepend_bos=False).to(device))[0] for s in subjects]
        if not rows:
            raise ValueError("subjects is empty: need at least one subject to measure embeddings")
        return factor * float(torch.cat(rows).float().std())


def trace_fact(
    model: Model,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise_scale: float | None = None,
    window: int = 10,
    seed: int = 0,
    prepend_bos: bool | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> CausalTrace:
    """Trace where ``model`` recalls the answer to ``prompt`` about ``subject``.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompt: the text whose next token is the answer.
        subject: a substring of ``prompt``; its tokens get the noise.
        target: the answer whose first token is scored; ``None`` scores the
            clean top-1 token.
        kinds: any of ``"resid"``, ``"mlp"``, ``"attn"``.
        samples: noise draws averaged per score.
        noise_scale: noise standard deviation; ``None`` uses
            :func:`embedding_noise_scale` of the subject.
        window: layers restored together for ``"mlp"`` and ``"attn"``.
        seed: seeds the noise, ``torch.Generator().manual_seed(seed)``.
        prepend_bos: as in TransformerLens (``None``: the model's default).
        batch_size: most sequences in one forward pass.
        progress: show a progress bar.

    Returns:
        The scores of every (kind, token, layer). When the model does not know
        the answer (clean p < 0.1) or the noise does not make it forget
        (a drop under 0.05), the trace warns with ``UnreliableTraceWarning``
        and lists why in ``trace.problems``.
    """
    kinds = _check_kinds(kinds)
    _check_positive(samples=samples, window=window, batch_size=batch_size)
    run = _prepare(model, prompt, subject, target, samples, noise_scale, seed, prepend_bos)
    n_layers, n_pos = model.cfg.n_layers, run.tokens.shape[1]
    first = run.subject[0]
    jobs = [
        _restoration(kind, t, layer, window, n_layers)
        for kind in kinds
        for t in range(first, n_pos)
        for layer in range(n_layers)
    ]
    scores = torch.full((len(kinds), n_pos, n_layers), run.corrupted_prob)
    found = _run_jobs(model, run, jobs, batch_size, progress, "causal trace")
    scores[:, first:] = found.view(len(kinds), n_pos - first, n_layers)
    trace = CausalTrace(
        prompt=prompt,
        subject=subject,
        kinds=kinds,
        scores=scores,
        window=window,
        **run.summary(model),
    )
    warn_if_unreliable(trace)
    return trace


def trace_severed(
    model: Model,
    prompt: str,
    subject: str,
    *,
    severed: str = "mlp",
    token: int | None = None,
    target: str | None = None,
    samples: int = 10,
    noise_scale: float | None = None,
    seed: int = 0,
    prepend_bos: bool | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> SeveredTrace:
    """ROME's severed-path experiment at one token.

    For each layer l, restore the clean ``hook_resid_post`` at (``token``, l),
    once as in :func:`trace_fact` and once while the ``severed`` outputs
    (``"mlp"`` or ``"attn"``) at ``token`` stay at their corrupted values in
    every later layer. The gap shows how much of the restored state's effect
    flows through that path.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompt: the text whose next token is the answer.
        subject: a substring of ``prompt``; its tokens get the noise.
        severed: ``"mlp"`` or ``"attn"``: the path held at its corrupted values.
        token: the position restored; ``None`` is the last subject token.
        target: the answer whose first token is scored (``None``: the clean top-1).
        samples: noise draws averaged per score.
        noise_scale: noise standard deviation (``None``: 3 × the subject embeddings' std).
        seed: seeds the noise.
        prepend_bos: as in TransformerLens (``None``: the model's default).
        batch_size: most sequences in one forward pass.
        progress: show a progress bar.

    Returns:
        One score per layer with and without the severed path.
    """
    if severed not in _OUTPUT_HOOK:
        raise ValueError(f"severed must be 'mlp' or 'attn', got {severed!r}")
    _check_positive(samples=samples, batch_size=batch_size)
    run = _prepare(model, prompt, subject, target, samples, noise_scale, seed, prepend_bos)
    n_layers, n_pos = model.cfg.n_layers, run.tokens.shape[1]
    token = run.subject[1] - 1 if token is None else token
    if not 0 <= token < n_pos:
        raise ValueError(f"token {token} is out of range for a prompt of {n_pos} tokens")
    jobs = [_restoration("resid", token, layer, 1, n_layers) for layer in range(n_layers)]
    jobs += [
        _Job(token, layer + 1, restore_input=layer, freeze=(severed, range(layer + 1, n_layers)))
        for layer in range(n_layers)
    ]
    if token < run.subject[0]:
        found = torch.full((2 * n_layers,), run.corrupted_prob)
    else:
        found = _run_jobs(model, run, jobs, batch_size, progress, "severed trace")
    result = SeveredTrace(
        prompt=prompt,
        subject=subject,
        severed=severed,
        token=token,
        scores=found[:n_layers],
        severed_scores=found[n_layers:],
        **run.summary(model),
    )
    warn_if_unreliable(result)
    return result


def average_causal_effects(
    model: Model,
    facts: Iterable[Mapping[str, str]],
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise_scale: float | None = None,
    window: int = 10,
    seed: int = 0,
    prepend_bos: bool | None = None,
    batch_size: int = 256,
    progress: bool = True,
    distributed: bool | None = None,
) -> AverageEffects:
    """Trace many facts and average their indirect effects by ROME's token groups.

    ``facts`` are mappings with ``"prompt"`` and ``"subject"`` (and optionally
    ``"target"``), like the records of ROME's ``known_1000.json``. The noise
    scale is measured once over all subjects, as ROME does. Groups are the
    first, middle and last subject token, the first token after the subject,
    the further tokens and the last token; a fact adds to the groups it has.

    Args:
        model: any TransformerLens model with a tokenizer.
        facts: mappings with ``"prompt"``, ``"subject"`` and optionally ``"target"``.
        kinds: any of ``"resid"``, ``"mlp"``, ``"attn"``.
        samples: noise draws averaged per score.
        noise_scale: noise standard deviation; ``None`` measures it over all subjects.
        window: layers restored together for ``"mlp"`` and ``"attn"``.
        seed: seeds the noise of every trace.
        prepend_bos: as in TransformerLens (``None``: the model's default).
        batch_size: most sequences in one forward pass, as in :func:`trace_fact`.
        progress: show a progress bar.
        distributed: split the facts over the ranks of the process group and gather
            the traces (``None``: when one is initialised; see
            :mod:`rome_lens.core.distributed`).

    Returns:
        Mean indirect effects and 95% intervals per (kind, group, layer), and every trace.
        Facts whose trace cannot locate them (see ``CausalTrace.problems``) are
        kept, as ROME keeps them, without a warning for each.
    """
    facts = list(facts)
    if not facts:
        raise ValueError("facts is empty: need at least one fact to average")
    _check_positive(samples=samples, window=window, batch_size=batch_size)
    if noise_scale is None:
        noise_scale = embedding_noise_scale(model, [f["subject"] for f in facts])
    split = Split.of(distributed)
    mine = [facts[i] for i in shard(range(len(facts)), split)]
    bar = tqdm(mine, desc="average causal effects", disable=not (progress and is_main(split)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreliableTraceWarning)
        traces = [
            trace_fact(
                model,
                f["prompt"],
                f["subject"],
                target=f.get("target"),
                kinds=kinds,
                samples=samples,
                noise_scale=noise_scale,
                window=window,
                seed=seed,
                prepend_bos=prepend_bos,
                batch_size=batch_size,
                progress=False,
            )
            for f in bar
        ]
    if split.active:
        gathered = gather_bytes([trace.to_bytes() for trace in traces], split)
        traces = [CausalTrace.from_bytes(b) for b in gathered]
    return _averaged(traces, model.cfg.n_layers)


# --------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class _Job:
    """One restoration: a batch of ``samples`` corrupted rows patched at ``token``."""

    token: int
    start: int
    """First layer the rows run through (n_layers: straight to the unembedding)"""
    restore_input: int | None = None
    """Layer whose clean resid_post enters at `token`."""
    restore: tuple[str, range] | None = None
    """Kind whose clean outputs go back, and where."""
    freeze: tuple[str, range] | None = None
    """Kind whose corrupted outputs are re-imposed."""


def _restoration(kind: str, token: int, layer: int, window: int, n_layers: int) -> _Job:
    if kind == "resid":
        return _Job(token, layer + 1, restore_input=layer)
    layers = window_layers(layer, window, n_layers)
    return _Job(token, layers.start, restore=(kind, layers))


@dataclass
class _Run:
    """The clean and corrupted runs every restoration starts from."""

    tokens: Int[Tensor, "1 pos"]
    str_tokens: list[str]
    subject: tuple[int, int]
    target: int
    noise_scale: float
    seed: int
    samples: int
    clean_prob: float
    corrupted_prob: float
    clean_resid: Float[Tensor, "layer pos d_model"]
    """hook_resid_post."""
    clean_out: dict[str, Float[Tensor, "layer pos d_model"]]
    """hook_{mlp,attn}_out."""
    corrupted_resid: Float[Tensor, "layer_plus_1 sample pos d_model"]
    """Before each layer, final."""
    corrupted_out: dict[str, Float[Tensor, "layer sample pos d_model"]]
    keys_values: list[tuple[Tensor, Tensor]]
    """Per layer, keys and values [sample, pos, n_kv_heads, d_head] of the corrupted run."""

    def summary(self, model: Model) -> dict[str, Any]:
        return {
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "str_tokens": self.str_tokens,
            "target_token": self.target,
            "target_str": model.to_single_str_token(self.target),
            "noise_scale": self.noise_scale,
            "seed": self.seed,
            "samples": self.samples,
            "subject_range": self.subject,
            "fingerprint": model_fingerprint(model),
        }


def _prepare(
    model: Model,
    prompt: str,
    subject: str,
    target: str | None,
    samples: int,
    noise_scale: float | None,
    seed: int,
    prepend_bos: bool | None,
) -> _Run:
    """Check the inputs, then run and cache the clean and corrupted passes."""
    tokens = prompt_tokens(model, prompt, prepend_bos).to(model_device(model))
    first, last = subject_range(model, prompt, subject, prepend_bos)
    if noise_scale is None:
        noise_scale = embedding_noise_scale(model, [subject])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, last - first, model.cfg.d_model), generator=generator)
    noise = (noise * noise_scale).to(model_device(model))
    n_layers = model.cfg.n_layers

    outputs = [f"blocks.{i}.{h}" for i in range(n_layers) for h in _OUTPUT_HOOK.values()]
    wanted = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + outputs
    wanted.append(f"blocks.{n_layers - 1}.hook_resid_post")

    with torch.inference_mode():
        clean_logits, clean = _run_with_cache(
            model, tokens, [f"blocks.{i}.hook_resid_post" for i in range(n_layers)] + outputs
        )
        clean_probs = clean_logits[0, -1].float().softmax(-1)
        target_id = (
            int(clean_probs.argmax())
            if target is None
            else target_token_ids(model, prompt, target)[0]
        )
        kv = backend.new_kv_cache(model, samples)
        noisy = [("hook_embed", hooks.add_at_positions(noise, slice(first, last)))]
        with hooks.attached(model, noisy):
            batch = tokens.expand(samples, -1)
            corrupted_logits, corrupted = _run_with_cache(model, batch, wanted, past_kv_cache=kv)
    corrupted_probs = corrupted_logits[:, -1].float().softmax(-1)[:, target_id]
    resid_before = [corrupted[f"blocks.{i}.hook_resid_pre"] for i in range(n_layers)]
    resid_before.append(corrupted[f"blocks.{n_layers - 1}.hook_resid_post"])
    return _Run(
        tokens=tokens,
        str_tokens=list(model.to_str_tokens(tokens[0])),
        subject=(first, last),
        target=target_id,
        noise_scale=float(noise_scale),
        seed=seed,
        samples=samples,
        clean_prob=float(clean_probs[target_id]),
        corrupted_prob=float(corrupted_probs.mean()),
        clean_resid=_stack(clean, "hook_resid_post", n_layers)[:, 0],
        clean_out={k: _stack(clean, h, n_layers)[:, 0] for k, h in _OUTPUT_HOOK.items()},
        corrupted_resid=torch.stack(resid_before),
        corrupted_out={k: _stack(corrupted, h, n_layers) for k, h in _OUTPUT_HOOK.items()},
        keys_values=backend.cached_keys_values(model, kv),
    )


def _run_with_cache(
    model: Model, tokens: Tensor, names: list[str], past_kv_cache: object = None
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """Logits, and the activations at ``names`` (filling ``past_kv_cache`` if given)."""
    store: dict[str, Tensor] = {}

    def keep(name: str) -> hooks.Hook:
        def hook(act: Tensor, hook: object) -> None:
            store[name] = act.detach()

        return hook

    with hooks.attached(model, [(name, keep(name)) for name in names]):
        mask = None if past_kv_cache is None else torch.ones_like(tokens)  # the cache keeps it
        logits = backend.forward(model, tokens, past_kv_cache=past_kv_cache, attention_mask=mask)
    return logits, store


def _stack(cache: dict[str, Tensor], hook_name: str, n_layers: int) -> Tensor:
    return torch.stack([cache[f"blocks.{layer}.{hook_name}"] for layer in range(n_layers)])


def _run_jobs(
    model: Model,
    run: _Run,
    jobs: list[_Job],
    batch_size: int,
    progress: bool,
    desc: str,
) -> Float[Tensor, " job"]:
    """Mean P(target) over the noise samples for each job; one descent per token."""
    by_token: dict[int, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_token[job.token].append(i)
    result = torch.empty(len(jobs), device=model_device(model))
    with linear_layout(model), torch.inference_mode():
        for ids in tqdm(by_token.values(), desc=desc, disable=not progress):
            result[ids] = _descend(model, run, [jobs[i] for i in ids], batch_size)
    return to_host(result)  # the only move: the scores go to the CPU once, to be shown


def _descend(model: Model, run: _Run, jobs: list[_Job], batch_size: int) -> Float[Tensor, " job"]:
    """Run jobs that share a token down the layers; each joins the batch at its start layer.

    Only positions from the token on are computed; the earlier positions' keys
    and values are the cached corrupted ones, which no restoration at the token
    can change. Each layer runs in chunks of ``batch_size`` sequences, which
    keeps the activations small enough to stay in the CPU's caches.
    """
    token, samples, n_layers = jobs[0].token, run.samples, model.cfg.n_layers
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].start)  # rows by start layer
    jobs = [jobs[i] for i in order]
    row_sample = torch.arange(samples).repeat(len(jobs))
    resid = run.corrupted_resid[0, :, token:][:0]  # empty [0, pos, d_model]
    for layer in range(n_layers):
        resid = torch.cat([resid, _entering(run, jobs, layer)])
        patches = _layer_patches(run, jobs, layer, resid.shape[0], row_sample)
        out = torch.empty_like(resid)
        for lo in range(0, resid.shape[0], batch_size):
            hi = min(lo + batch_size, resid.shape[0])
            kv = _prefix_cache(model, run, layer, row_sample[lo:hi], token)
            with hooks.attached(model, _chunk_hooks(patches, lo, hi)):
                out[lo:hi] = backend.forward(
                    model,
                    resid[lo:hi],
                    start_at_layer=layer,
                    stop_at_layer=layer + 1,
                    past_kv_cache=kv,
                )
        resid = out
    final = torch.cat([resid[:, -1:], _entering(run, jobs, n_layers)[:, -1:]])
    probs = torch.cat(
        [
            unembed(model, final[lo : lo + batch_size, 0]).float().softmax(-1)[:, run.target]
            for lo in range(0, final.shape[0], batch_size)
        ]
    )
    means = probs.view(len(jobs), samples).mean(1)
    out_means = torch.empty_like(means)
    out_means[order] = means
    return out_means


def _entering(run: _Run, jobs: list[_Job], layer: int) -> Tensor:
    """The corrupted residual for jobs that start at ``layer``, with clean states put back."""
    token = jobs[0].token
    entering = [job for job in jobs if job.start == layer]
    resid = run.corrupted_resid[layer, :, token:].repeat(len(entering), 1, 1)
    for i, job in enumerate(entering):
        if job.restore_input is not None:
            rows = slice(i * run.samples, (i + 1) * run.samples)
            resid[rows, 0] = run.clean_resid[job.restore_input, token]
    return resid


# A patch: (hook name, batch rows, the values those rows get at the token).
_Patch = tuple[str, Tensor, Tensor]


def _layer_patches(
    run: _Run, jobs: list[_Job], layer: int, n_rows: int, row_sample: Tensor
) -> list[_Patch]:
    """The MLP/attention outputs to restore or freeze at the token in ``layer``."""
    token, samples = jobs[0].token, run.samples
    present = jobs[: n_rows // samples]
    patches = []
    for kind, hook_name in _OUTPUT_HOOK.items():
        name = f"blocks.{layer}.{hook_name}"
        restored = [j for j, job in enumerate(present) if _covers(job.restore, kind, layer)]
        if restored:
            rows = _rows(restored, samples)
            clean = run.clean_out[kind][layer, token].expand(len(rows), -1)
            patches.append((name, rows, clean))
        frozen = [j for j, job in enumerate(present) if _covers(job.freeze, kind, layer)]
        if frozen:
            rows = _rows(frozen, samples)
            patches.append((name, rows, run.corrupted_out[kind][layer, row_sample[rows], token]))
    return patches


def _covers(patch: tuple[str, range] | None, kind: str, layer: int) -> bool:
    return patch is not None and patch[0] == kind and layer in patch[1]


def _chunk_hooks(patches: list[_Patch], lo: int, hi: int) -> list[tuple[str, hooks.Hook]]:
    """The hooks for batch rows ``[lo, hi)``, with rows renumbered from 0."""
    fwd_hooks = []
    for name, rows, values in patches:
        inside = (rows >= lo) & (rows < hi)  # on the CPU, with the rows
        if inside.any():
            kept = values[inside.to(values.device)]  # a mask lives with the tensor it masks
            fwd_hooks.append((name, hooks.set_at_position(rows[inside] - lo, 0, kept)))
    return fwd_hooks


def _rows(job_indices: list[int], samples: int) -> Tensor:
    return (torch.tensor(job_indices)[:, None] * samples + torch.arange(samples)).flatten()


def _prefix_cache(model: Model, run: _Run, layer: int, row_sample: Tensor, token: int) -> object:
    """A frozen KV cache holding the corrupted keys and values of positions before ``token``."""
    keys, values = run.keys_values[layer]
    return backend.prefix_cache(model, layer, keys[row_sample, :token], values[row_sample, :token])


# --------------------------------------------------------------------------- helpers


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kind(s) {unknown or kinds!r}: expected some of {KINDS}")
    return kinds


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _averaged(traces: list[CausalTrace], n_layers: int) -> AverageEffects:
    """The traces' indirect effects averaged within each of ROME's token groups."""
    per_group: list[list[Tensor]] = [[] for _ in TOKEN_GROUPS]
    for trace in traces:
        effect = trace.indirect_effect()
        for g, positions in enumerate(_token_groups(trace.subject_range, len(trace.str_tokens))):
            if positions:
                per_group[g].append(effect[:, positions].mean(dim=1))
    shape = (len(traces[0].kinds), n_layers)
    mean, ci95 = zip(*(_mean_ci(values, shape) for values in per_group), strict=True)
    return AverageEffects(
        kinds=traces[0].kinds,
        groups=TOKEN_GROUPS,
        mean=torch.stack(mean, dim=1),
        ci95=torch.stack(ci95, dim=1),
        counts=torch.tensor([len(v) for v in per_group]),
        n_facts=len(traces),
        traces=traces,
    )


def _token_groups(subject: tuple[int, int], n_pos: int) -> list[list[int]]:
    """Positions in each of ROME's token groups (see ``TOKEN_GROUPS``)."""
    first, last = subject[0], subject[1] - 1
    return [
        [first],
        list(range(first + 1, last)),
        [last],
        [last + 1] if last + 1 < n_pos else [],
        list(range(last + 2, n_pos - 1)),
        [n_pos - 1],
    ]


def _mean_ci(values: list[Tensor], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    if not values:
        nan = torch.full(shape, float("nan"))
        return nan, nan
    stacked = torch.stack(values)
    ci = 1.96 * stacked.std(0) / len(values) ** 0.5 if len(values) > 1 else torch.zeros(shape)
    return stacked.mean(0), ci
