"""Second moments of any hook point over a corpus: Σx, Σxxᵀ and n, on the model's device, cached.

ROME's key statistics, the Microscope's fitted maps and the Kronecker factors
of influence functions are all sums over the tokens of a corpus of ``x`` and
``x xᵀ``, where ``x`` is a hook point's activation (forward) or the gradient
of the loss arriving at it (backward). :func:`accumulate_moments` computes
them once for several hook points in one pass over the corpus and caches each
:class:`Moments` on disk, keyed by the fingerprint of the weights it depends
on, the hook, the corpus, the token count and (for gradients) the labels. An
entry computed on another model is never read, and a corrupt one is rebuilt.

Tokens counted are the corpus's real, non-BOS tokens. Gradients are those of
the summed next-token cross-entropy, with labels sampled from the model's own
predictions (``labels="sampled"``, seeded: the true Fisher) or the corpus's
next tokens (``labels="empirical"``).

The sums are formed where the model runs, in the accumulator dtype of its
device (:mod:`rome_lens.core.precision`: float64 on the CPU), from activations
promoted out of half precision first; they reach the CPU when saved.

>>> import tempfile, torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.stats.moments import accumulate_moments
>>> model = tiny_model()
>>> found = accumulate_moments(model, forward=["blocks.1.mlp.hook_post"],
...                            backward=["blocks.1.hook_mlp_out"],
...                            corpus=["The Eiffel Tower is in Paris."], n_tokens=100,
...                            cache_dir=tempfile.mkdtemp(), progress=False)
>>> keys = found["blocks.1.mlp.hook_post", "forward"]
>>> keys.count, tuple(keys.second_moment.shape), keys.outer.dtype
(7, (256, 256), torch.float64)
>>> tuple(found["blocks.1.hook_mlp_out", "backward"].outer.shape)
(64, 64)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.cache import cache_dir, hit_on_every_rank, read_cached
from rome_lens.core.corpus import Batch, Chunk, Corpus, CorpusSource, bos_tokens, token_batches
from rome_lens.core.distributed import Split, all_reduce_max, all_reduce_sum, is_main, shard
from rome_lens.core.fingerprint import (
    check_fingerprint,
    hook_fingerprint,
    hook_scope,
    model_fingerprint,
)
from rome_lens.core.precision import RunningSum, accumulator_dtype, model_device
from rome_lens.core.results import Result
from rome_lens.core.runtime import capture, capture_with_gradients, frozen, linear_layout

__all__ = [
    "LABEL_SAMPLER",
    "Direction",
    "Labels",
    "Moments",
    "accumulate_moments",
    "label_generators",
    "next_token_loss",
    "token_budgets",
    "within_budgets",
]

Direction = Literal["forward", "backward"]
Labels = Literal["sampled", "empirical"]
MomentKey = tuple[str, Direction]
LABEL_SAMPLER = "icdf"  # how sampled labels are drawn (in cache names: a new sampler, a new entry)


@dataclass
class Moments(Result):
    """Σx, Σxxᵀ and the count of one hook point's activations (or gradients) over a corpus."""

    kind = "moments"
    hook: str
    """Hook point, e.g. "blocks.2.mlp.hook_post"."""
    direction: str
    """"forward": activations; "backward": gradients of the loss at the hook."""
    total: Float[Tensor, " d"]
    """Σx, in the accumulator dtype of the device it was summed on (float64 on the CPU)."""
    outer: Float[Tensor, "d d"]
    """Σx xᵀ, likewise."""
    count: int
    """Rows summed (tokens)"""
    corpus: str
    """Where the text came from."""
    fingerprint: str
    """Of the weights the hook's values depend on."""
    labels: str = ""
    """For gradients: "sampled" or "empirical" labels, and the seed."""

    @property
    def mean(self) -> Float[Tensor, " d"]:
        """E[x]."""
        return self.total / max(self.count, 1)

    @property
    def second_moment(self) -> Float[Tensor, "d d"]:
        """E[x xᵀ]."""
        return self.outer / max(self.count, 1)

    @property
    def covariance(self) -> Float[Tensor, "d d"]:
        """E[x xᵀ] − E[x] E[x]ᵀ."""
        mean = self.mean
        return self.second_moment - torch.outer(mean, mean)

    def to(self, device: torch.device) -> Moments:
        """These moments with their sums on ``device`` (itself when they are there)."""
        if self.total.device == device:
            return self
        return replace(self, total=self.total.to(device), outer=self.outer.to(device))

    def check_model(self, model: Model) -> None:
        """Raise ``ValueError`` unless these moments belong to ``model``."""
        found = hook_fingerprint(model, self.hook, self.direction)
        check_fingerprint(found, self.fingerprint, f"the moments of {self.hook}")

    def to_dataframe(self) -> pd.DataFrame:
        """One row: the hook, direction, count, corpus and trace of E[x xᵀ]."""
        row = {
            "hook": self.hook,
            "direction": self.direction,
            "count": self.count,
            "corpus": self.corpus,
            "labels": self.labels,
            "trace": self.second_moment.trace().item(),
        }
        return pd.DataFrame([row])


def accumulate_moments(
    model: Model,
    *,
    forward: list[str] | tuple[str, ...] = (),
    backward: list[str] | tuple[str, ...] = (),
    corpus: CorpusSource | Corpus = None,
    n_tokens: int = 20_000,
    labels: Labels = "sampled",
    seed: int = 0,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    cache_hooks: Sequence[str] | None = None,
    progress: bool = True,
    announce: str | None = None,
    distributed: bool | None = None,
) -> dict[MomentKey, Moments]:
    """Moments of hook points' activations (``forward``) and gradients (``backward``).

    Args:
        model: any TransformerLens model.
        forward: hook points whose activations are summed.
        backward: hook points whose loss gradients are summed.
        corpus: strings, a ``.txt``/``.jsonl`` path, a :class:`Corpus`, or
            ``None`` to sample text from the model (seeded by ``seed``).
        n_tokens: how many tokens to sum over (fewer if a given corpus runs out).
        labels: for gradients, ``"sampled"`` from the model or ``"empirical"``.
        seed: seeds the sampled corpus and the sampled labels.
        batch_size: sequences per forward pass.
        cache_dir: the rome_lens cache folder (see :mod:`rome_lens.core.cache`).
        use_cache: read and write the disk cache.
        cache_hooks: with ``use_cache``, cache only these hooks (``None``: every hook);
            the others are recomputed each time.
        progress: show progress bars and, before a long computation, one line
            saying what is computed and where it is cached.
        announce: what the moments are, for that line (e.g. "key statistics of layer 2").
        distributed: split the corpus over the ranks of the process group and sum
            (``None``: when one is initialised; see :mod:`rome_lens.core.distributed`).

    Returns:
        ``{(hook, direction): Moments}`` for every hook asked for.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if labels not in ("sampled", "empirical"):
        raise ValueError(f"labels must be 'sampled' or 'empirical', got {labels!r}")
    wanted: list[MomentKey] = [(h, "forward") for h in forward] + [
        (h, "backward") for h in backward
    ]
    if not wanted:
        raise ValueError("name at least one hook point in forward= or backward=")
    unknown = [h for h, _ in wanted if h not in model.hook_dict]
    if unknown:
        raise ValueError(f"the model has no hook point {unknown[0]!r}")
    source = Corpus.read(corpus)
    label_id, corpus_id = f"{labels}{seed}", source.id(seed)
    paths = {
        key: _cache_path(model, key, corpus_id, n_tokens, label_id, cache_dir)
        for key in wanted
        if use_cache and (cache_hooks is None or key[0] in cache_hooks)
    }
    split = Split.of(distributed)
    loaded = _read(paths, wanted)
    if hit_on_every_rank(loaded is not None, split) and loaded is not None:
        return {key: loaded[key].to(model_device(model)) for key in wanted}
    progress = progress and is_main(split)  # every rank computes, so the collectives match
    if progress:
        what = announce or ", ".join(f"{h} ({d})" for h, d in wanted)
        where = f"; cached in {next(iter(paths.values())).parent}" if paths else ""
        tqdm.write(
            f"computing {what} once: {n_tokens:,} tokens of {source.name}{where}", file=sys.stderr
        )
    computed = _accumulate(
        model, source, wanted, n_tokens, labels, label_id, seed, batch_size, cache_dir, progress,
        split,
    )  # fmt: skip
    if is_main(split):
        for key, path in paths.items():
            computed[key].save(path)
    return computed


def next_token_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Tensor,
    real: Tensor,
    labels: Labels,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> Tensor:
    """Summed cross-entropy of each real position's next token, with sampled or true labels.

    A position counts when the token after it is real (not padding).

    Args:
        logits: ``[batch pos vocab]`` logits.
        tokens: ``[batch pos]`` the corpus tokens.
        real: ``[batch pos]`` which tokens are not padding.
        labels: ``"sampled"`` from the model or ``"empirical"`` (the corpus's next tokens).
        generator: drives the sampled labels: one for the batch, or one per sequence
            (see :func:`label_generators`).

    Returns:
        The summed loss (a scalar that keeps the graph).
    """
    predicts = real[:, :-1] & real[:, 1:]
    mask = predicts.to(logits.device)  # a boolean mask lives with the tensor it masks
    log_probs = logits[:, :-1][mask].float().log_softmax(-1)
    if labels == "empirical":
        targets = tokens[:, 1:].to(log_probs.device)[mask]
    else:
        with torch.no_grad():
            targets = _sampled_labels(log_probs.detach(), predicts.sum(1).tolist(), generator)
    return -log_probs.gather(-1, targets[:, None]).sum()


def _sampled_labels(
    log_probs: Float[Tensor, "n vocab"],
    per_row: list[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> Tensor:
    """One label per row drawn from ``exp(log_probs)`` by inverting its CDF on the device.

    The randomness is one uniform per row from the CPU generators (``n`` numbers
    cross to the device, not ``n × vocab`` probabilities to the CPU), so the labels
    depend on the seed and the sequence, not on the device or the batching.
    """
    if isinstance(generator, Sequence):
        parts = [
            torch.rand(n, generator=g, dtype=torch.float64)
            for n, g in zip(per_row, generator, strict=True)
        ]
        uniform = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    else:
        uniform = torch.rand(len(log_probs), generator=generator, dtype=torch.float64)
    cdf = log_probs.double().exp().cumsum(-1)  # float64: a 100k-entry CDF keeps its tail
    drawn = torch.searchsorted(cdf, (uniform.to(cdf.device) * cdf[:, -1])[:, None])[:, 0]
    return drawn.clamp_(max=log_probs.shape[-1] - 1)


def label_generators(seed: int, sequences: Sequence[int]) -> list[torch.Generator]:
    """One generator per sequence, seeded by ``seed`` and its place in the corpus.

    Sampled labels then depend on neither the batching nor how the corpus is
    split across processes.

    Args:
        seed: the run's seed.
        sequences: the sequences' indices in the corpus.

    Returns:
        The generators, in order.
    """
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in sequences]


def token_budgets(chunks: Sequence[Chunk], n_tokens: int, skip: int) -> list[int]:
    """How many counted tokens each chunk gives, so that the first ``n_tokens`` in corpus
    order count (the last chunk may give part of its tokens, the ones after none).

    Args:
        chunks: the corpus's chunks, in order.
        n_tokens: the tokens wanted.
        skip: leading tokens of each chunk that never count (BOS).

    Returns:
        One budget per chunk.
    """
    budgets, left = [], n_tokens
    for chunk in chunks:
        budgets.append(max(0, min(len(chunk.tokens) - skip, left)))
        left -= budgets[-1]
    return budgets


def _accumulate(
    model: Model,
    corpus: Corpus,
    keys: list[MomentKey],
    n_tokens: int,
    labels: Labels,
    label_id: str,
    seed: int,
    batch_size: int,
    cache_root: str | os.PathLike[str] | None,
    progress: bool,
    split: Split,
) -> dict[MomentKey, Moments]:
    """Sum x and x xᵀ over the first ``n_tokens`` counted tokens (this rank's share,
    then summed over the ranks); gradients' moments record ``label_id``."""
    chunks = corpus.chunks(
        model, n_tokens=n_tokens, seed=seed, cache_dir=cache_root, progress=progress
    )
    budgets = token_budgets(chunks, n_tokens, len(bos_tokens(model)))
    mine = shard([i for i, budget in enumerate(budgets) if budget > 0], split)
    sums = {key: _Sums() for key in keys}
    backward = [hook for hook, direction in keys if direction == "backward"]
    count = 0
    bar = tqdm(total=sum(budgets[i] for i in mine), desc="moments", unit="tok",
               disable=not progress)  # fmt: skip
    with bar, frozen(model), linear_layout(model):
        for batch in token_batches(model, [chunks[i] for i in mine], batch_size):
            rows = [mine[j] for j in batch.indices]
            take = within_budgets(batch.counted, [budgets[i] for i in rows])
            if backward:
                generators = label_generators(seed, rows)
                values = _with_gradients(model, batch, keys, labels, generators)
            else:
                with torch.inference_mode():
                    values = _activations(model, batch.tokens, keys)
            for key, value in values.items():
                sums[key].add(value[take.to(value.device)])
            added = int(take.sum())
            count += added
            bar.update(added)
    widths = {key: _width(sums[key], split) for key in keys}
    count = int(all_reduce_sum(torch.tensor([count]), split))
    scopes = {key: hook_scope(model, *key) for key in keys}
    prints = {scope: model_fingerprint(model, upto_layer=scope) for scope in set(scopes.values())}
    moments = {}
    for key in keys:
        total, outer = sums[key].padded(widths[key], model_device(model))
        moments[key] = Moments(
            hook=key[0],
            direction=key[1],
            total=all_reduce_sum(total, split),
            outer=all_reduce_sum(outer, split),
            count=count,
            corpus=corpus.name,
            fingerprint=prints[scopes[key]],
            labels=label_id if key[1] == "backward" else "",
        )
    return moments


def within_budgets(counted: Tensor, budgets: list[int]) -> Tensor:
    """``counted`` with only the first ``budgets[row]`` true entries of each row left true.

    Args:
        counted: ``[batch pos]`` the tokens that may count.
        budgets: how many of them count, per row (from :func:`token_budgets`).

    Returns:
        The tokens that count.
    """
    order = counted.long().cumsum(1)
    return counted & (order <= torch.tensor(budgets)[:, None])


def _width(sums: _Sums, split: Split) -> int:
    """The hook's width, known to every rank (one whose shard was empty has seen none)."""
    return int(all_reduce_max(torch.tensor([sums.width]), split))


class _Sums:
    """Running Σx and Σx xᵀ, on the device the values come from, in its accumulator dtype.

    The sums stay where the model runs, so a GPU forms each batch's xᵀx itself
    and nothing crosses to the CPU per batch. Their dtype is
    :func:`~rome_lens.core.precision.accumulator_dtype` of that device: float64,
    or Kahan-compensated float32 where float64 is slow.
    """

    def __init__(self) -> None:
        self.total: RunningSum | None = None
        self.outer: RunningSum | None = None

    @property
    def width(self) -> int:
        """The values' width (0 before any were added)."""
        return 0 if self.total is None else self.total.value.numel()

    def padded(self, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Σx and Σx xᵀ where they were summed; zeros of ``width`` on ``device`` when
        nothing was (a rank whose shard was empty)."""
        if self.total is None or self.outer is None:
            dtype = accumulator_dtype(device)
            total = torch.zeros(width, dtype=dtype, device=device)
            return total, torch.zeros(width, width, dtype=dtype, device=device)
        return self.total.value, self.outer.value

    def add(self, rows: Float[Tensor, "n d"]) -> None:
        if self.total is None or self.outer is None:
            dtype = accumulator_dtype(rows.device)
            self.total, self.outer = RunningSum(dtype), RunningSum(dtype)
        rows = rows.to(self.total.dtype)
        self.total.add(rows.sum(0))
        self.outer.add(rows.T @ rows)


def _activations(model: Model, tokens: Tensor, keys: list[MomentKey]) -> dict[MomentKey, Tensor]:
    """Each hook's activation as ``[batch pos d]``, running only as far as the hooks."""
    found = capture(model, tokens, sorted({hook for hook, _ in keys}))
    return {key: found[key[0]].reshape(*tokens.shape, -1) for key in keys}


def _with_gradients(
    model: Model,
    batch: Batch,
    keys: list[MomentKey],
    labels: Labels,
    generator: Sequence[torch.Generator],
) -> dict[MomentKey, Tensor]:
    """Activations and loss gradients at the hooks, as ``[batch pos d]``, for one batch."""
    forward = sorted({hook for hook, direction in keys if direction == "forward"})
    backward = sorted({hook for hook, direction in keys if direction == "backward"})

    def loss(logits: Tensor) -> Tensor:
        return next_token_loss(logits, batch.tokens, batch.real, labels, generator)

    acts, grads = capture_with_gradients(model, batch.tokens, forward, backward, loss)
    shape = batch.tokens.shape
    return {
        key: (acts if key[1] == "forward" else grads)[key[0]].reshape(*shape, -1) for key in keys
    }


def _cache_path(
    model: Model,
    key: MomentKey,
    corpus_id: str,
    n_tokens: int,
    label_id: str,
    root: str | os.PathLike[str] | None,
) -> Path:
    hook, direction = key
    fingerprint = hook_fingerprint(model, hook, direction)
    extra = f"-{label_id}-{LABEL_SAMPLER}" if direction == "backward" else ""
    name = f"{hook}-{direction}-{fingerprint}-{corpus_id}-{n_tokens}{extra}.st"
    return cache_dir(root) / "moments" / name


def _read(paths: dict[MomentKey, Path], wanted: list[MomentKey]) -> dict[MomentKey, Moments] | None:
    """Every wanted hook's cached moments, or ``None`` unless all of them are cached and sound.

    The hooks are summed together in one pass, so a single missing one means
    that pass, and the pass gives them all.
    """
    if len(paths) < len(wanted):
        return None
    found = {}
    for key, path in paths.items():
        moments = read_cached(path, Moments.load)
        if moments is None:
            return None  # the rest are read no further: the pass rewrites them
        found[key] = moments
    return found
