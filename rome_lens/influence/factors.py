"""EK-FAC factors of the MLP weights: the curvature influence functions precondition with.

Grosse et al. (2023, §2–3) approximate the Gauss–Newton Hessian of each weight
``W`` (``d_in × d_out``, inputs ``ā``, output gradients ``g``) by Kronecker
factors (Eq. 16), ``A = E[ā āᵀ]`` and ``S = E[g gᵀ]``, over the tokens of a
fitting corpus; gradients are of the summed next-token loss, with labels
sampled from the model (``fisher="sampled"``, the true Fisher) or the corpus's
next tokens (``"empirical"``). Both come from
:func:`~rome_lens.stats.moments.accumulate_moments` in float64, in one pass;
for ``W_out`` without a bias, ``A`` is exactly ROME's key statistics C and
shares their cache entry. EK-FAC (Eqs. 19–21) eigendecomposes ``A = Q_A Λ_A Q_Aᵀ``
and ``S = Q_S Λ_S Q_Sᵀ`` and refits the eigenvalues on a second pass from
per-sequence gradients rotated into that basis, ``Λ = E_seq[(Q_Aᵀ G Q_S)²]``.
``strategy="diagonal"`` makes the same pass in the weights' own basis, for
the diagonal approximation ``E_seq[G²]``.

Tokens counted are the corpus's real, non-BOS tokens (as for key statistics);
the gradients scored later count the same tokens. Factors are cached per model
fingerprint, layers, corpus, token count and Fisher.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence.factors import fit_influence_factors
>>> factors = fit_influence_factors(tiny_model(), ["The Eiffel Tower is in Paris."] * 4,
...                                 layers=[1], n_tokens=200, cache_dir=tempfile.mkdtemp(),
...                                 progress=False)
>>> factors.names, tuple(factors.eigen_lambda["blocks.1.mlp.W_out"].shape)  # d_mlp + bias, d_model
(['blocks.1.mlp.W_in', 'blocks.1.mlp.W_out'], (257, 64))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.cache import cache_dir, cache_key, cached
from rome_lens.core.corpus import Batch, Chunk, Corpus, CorpusSource, bos_tokens, token_batches
from rome_lens.core.distributed import Split, all_reduce_sum, is_main, shard
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import accumulator_dtype, available_memory, model_device, to_host
from rome_lens.core.results import Result
from rome_lens.core.runtime import capture_with_gradients, frozen, linear_layout
from rome_lens.influence.weights import MLPWeight, check_layers, mlp_weights
from rome_lens.stats.moments import (
    LABEL_SAMPLER,
    Labels,
    MomentKey,
    Moments,
    accumulate_moments,
    label_generators,
    next_token_loss,
    token_budgets,
    within_budgets,
)

__all__ = [
    "STRATEGIES",
    "InfluenceFactors",
    "Strategy",
    "fit_influence_factors",
    "gradient_squared_norms",
    "input_factor",
    "text_gradients",
]

Strategy = Literal["ekfac", "kfac", "diagonal", "identity"]
STRATEGIES: tuple[Strategy, ...] = ("ekfac", "kfac", "diagonal", "identity")
_NEEDS_SECOND_PASS = ("ekfac", "diagonal")
_TABLES = ("input_vectors", "input_values", "output_vectors", "output_values", "eigen_lambda",
           "diagonal")  # fmt: skip  # InfluenceFactors' per-weight tensors


@dataclass(repr=False)
class InfluenceFactors(Result):
    """Kronecker factors (eigendecomposed) and corrected eigenvalues for each MLP weight."""

    kind = "influence_factors"
    layers: list[int]  # the MLP layers covered
    names: list[str]  # the weights, e.g. "blocks.3.mlp.W_out", in order
    input_vectors: dict[str, Tensor]  # Q_A: eigenvectors of A = E[ā āᵀ]
    input_values: dict[str, Tensor]  # Λ_A, ascending
    output_vectors: dict[str, Tensor]  # Q_S: eigenvectors of S = E[g gᵀ]
    output_values: dict[str, Tensor]  # Λ_S, ascending
    eigen_lambda: dict[str, Tensor]  # EK-FAC's Λ = E_seq[(Q_Aᵀ G Q_S)²]; empty unless fitted
    diagonal: dict[str, Tensor]  # E_seq[G²] in the weights' own basis; empty unless fitted
    strategy: str  # the strategy fitted; every fit also serves "kfac" and "identity"
    fisher: str  # "sampled" (true Fisher) or "empirical" labels
    n_tokens: int  # tokens the factors average over
    n_sequences: int  # sequences Λ averages over (0 without a second pass)
    corpus: str  # where the fitting text came from
    fingerprint: str  # model_fingerprint of the model
    seconds: float = 0.0  # fitting time

    def __repr__(self) -> str:
        return (
            f"InfluenceFactors({self.strategy}, layers {self.layers}, {len(self.names)} weights, "
            f"{self.n_tokens:,} tokens, {self.fisher} Fisher)"
        )

    def supports(self, strategy: str) -> bool:
        """Whether these factors can precondition with ``strategy``.

        Args:
            strategy: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.

        Returns:
            Whether the factors hold what it needs.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "ekfac":
            return bool(self.eigen_lambda)
        if strategy == "diagonal":
            return bool(self.diagonal)
        return True

    def eigenvalues(self, name: str, strategy: str) -> Float[Tensor, "d_in d_out"]:
        """The curvature in the eigenbasis (ekfac, kfac) or the weight's basis (diagonal).

        Args:
            name: a weight of :attr:`names`.
            strategy: the approximation.

        Returns:
            One value per entry of the (rotated) weight.
        """
        if not self.supports(strategy):
            raise ValueError(
                f"these factors were fitted for {self.strategy!r}, which does not give "
                f"{strategy!r}: fit with strategy={strategy!r}"
            )
        if strategy == "ekfac":
            return self.eigen_lambda[name]
        if strategy == "diagonal":
            return self.diagonal[name]
        return torch.outer(self.input_values[name], self.output_values[name])

    def to_dataframe(self) -> pd.DataFrame:
        """One row per weight: its shape and the spread of its factors' eigenvalues."""
        rows = []
        for name in self.names:
            a, s = self.input_values[name], self.output_values[name]
            row = {"weight": name, "d_in": len(a), "d_out": len(s)}
            row |= {"A_max": float(a[-1]), "A_mean": float(a.mean()), "S_max": float(s[-1])}
            row["S_mean"] = float(s.mean())
            if name in self.eigen_lambda:
                row["lambda_mean"] = float(self.eigen_lambda[name].mean())
            rows.append(row)
        return pd.DataFrame(rows)


def fit_influence_factors(
    model: Model,
    corpus: CorpusSource | Corpus = None,
    *,
    layers: Sequence[int] | None = None,
    weights: Sequence[str] | None = None,
    n_tokens: int = 20_000,
    strategy: Strategy = "ekfac",
    fisher: Labels = "sampled",
    seed: int = 0,
    batch_size: int = 16,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
    layers_per_pass: int | None = None,
) -> InfluenceFactors:
    """Fit the factors that precondition influence scores (cached per model and corpus).

    The moments of a layer are four square matrices as wide as its MLP (about
    4 GiB per layer of GPT-J in float64), so the layers are summed in passes over
    the corpus, as many per pass as fit half the device's free memory: all of a
    small model's in one pass, GPT-J's in several on an 80 GB GPU, each pass's
    factors moved to the CPU before the next (the scan brings back one weight's
    at a time).

    Args:
        model: any TransformerLens model with dense MLPs (not changed).
        corpus: fitting text: strings, a ``.txt``/``.jsonl`` path, a :class:`Corpus`, or
            ``None`` to sample it from the model.
        layers: the MLP layers (``None``: every layer).
        weights: which of ``"W_in"``, ``"W_gate"``, ``"W_out"`` (``None``: all the model has).
        n_tokens: tokens the factors average over.
        strategy: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"`` or ``"identity"``;
            every fit also serves ``"kfac"`` and ``"identity"``. EK-FAC and diagonal
            need a second pass.
        fisher: ``"sampled"`` labels (the true Fisher) or ``"empirical"`` ones.
        seed: seeds a sampled corpus and the sampled labels.
        batch_size: sequences per forward and backward pass.
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cache.
        progress: show progress bars.
        distributed: split the corpus over the ranks of the process group
            (``None``: when one is initialised; see :mod:`rome_lens.core.distributed`).
        layers_per_pass: MLP layers whose moments are summed in one pass over the corpus
            (``None``: as many as fit half the free memory of the model's device, see
            :func:`moment_bytes`). The factors do not depend on it.

    Returns:
        The factors.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    layers = check_layers(model, layers)
    chosen = mlp_weights(model, layers, weights)
    source = Corpus.read(corpus)
    fingerprint = model_fingerprint(model)
    names = [w.name for w in chosen]
    path = _cache_path(fingerprint, names, source, n_tokens, strategy, fisher, seed, cache_dir)
    split = Split.of(distributed)
    run = _Run(source, n_tokens, fisher, seed, batch_size, cache_dir, use_cache,
               progress and is_main(split), split)  # fmt: skip

    def fit() -> InfluenceFactors:
        started = time.perf_counter()
        fitted = _fit_passes(model, chosen, strategy, run, layers_per_pass)
        return InfluenceFactors(
            layers=layers,
            names=names,
            **fitted.tables,
            strategy=strategy,
            fisher=fisher,
            n_tokens=fitted.n_tokens,
            n_sequences=fitted.n_sequences,
            corpus=source.name,
            fingerprint=fingerprint,
            seconds=time.perf_counter() - started,
        )

    return cached(
        path,
        fit,
        load=InfluenceFactors.load,
        save=lambda path, factors: factors.save(path),
        use_cache=use_cache,
        split=split,
    )


@dataclass(frozen=True)
class _Run:
    """How a fit reads its corpus: what :func:`fit_influence_factors` was given."""

    source: Corpus
    """The fitting text."""
    n_tokens: int
    """Tokens the factors average over."""
    fisher: Labels
    """Sampled or empirical labels."""
    seed: int
    """Seeds a sampled corpus and the sampled labels."""
    batch_size: int
    """Sequences per forward and backward pass."""
    cache_dir: str | os.PathLike[str] | None
    """The rome_lens cache folder."""
    use_cache: bool
    """Read and write the cache (the moments W_out shares with ROME)."""
    progress: bool
    """Show progress bars (on the main rank)."""
    split: Split
    """This process's share of the corpus."""


@dataclass(frozen=True)
class _Fitted:
    """The factors of some weights, gathered over passes before the result is built."""

    tables: dict[str, dict[str, Tensor]]
    """Each of InfluenceFactors' per-weight tables (``_TABLES``), by weight name."""
    n_tokens: int
    """Tokens the factors average over."""
    n_sequences: int
    """Sequences Λ averages over (0 without a second pass)."""


def _fit_passes(
    model: Model,
    chosen: Sequence[MLPWeight],
    strategy: str,
    run: _Run,
    layers_per_pass: int | None,
) -> _Fitted:
    """Every chosen weight's factors, a group of layers per pass over the corpus.

    With several passes the device holds one pass's factors at a time: each
    pass's go to the CPU before the next begins.
    """
    tables: dict[str, dict[str, Tensor]] = {table: {} for table in _TABLES}
    n_tokens = n_sequences = 0
    passes = layer_passes(model, chosen, layers_per_pass)
    for group in passes:
        fitted = _fit_pass(model, [w for w in chosen if w.layer in group], group, strategy, run)
        if len(passes) > 1:
            fitted = _to_host(fitted)
        for table, values in fitted.tables.items():
            tables[table].update(values)
        n_tokens, n_sequences = fitted.n_tokens, fitted.n_sequences
    return _Fitted(tables, n_tokens, n_sequences)


def _fit_pass(
    model: Model, in_pass: list[MLPWeight], group: list[int], strategy: str, run: _Run
) -> _Fitted:
    """The factors of the weights of one group of layers: their moments in one pass, the
    eigenbases, then (EK-FAC, diagonal) the eigenvalues refitted in a second pass."""
    moments = accumulate_moments(
        model,
        forward=sorted({w.input_hook for w in in_pass}),
        backward=sorted({w.output_hook for w in in_pass}),
        corpus=run.source,
        n_tokens=run.n_tokens,
        labels=run.fisher,
        seed=run.seed,
        batch_size=run.batch_size,
        cache_dir=run.cache_dir,
        use_cache=run.use_cache,
        cache_hooks=[w.input_hook for w in in_pass if w.short == "W_out"],  # shared with ROME
        progress=run.progress,
        announce=f"influence factors of layers {group}",
        distributed=run.split.active,
    )
    n_tokens = moments[in_pass[0].input_hook, "forward"].count
    tables: dict[str, dict[str, Tensor]] = {table: {} for table in _TABLES}
    for weight in tqdm(in_pass, desc="eigendecomposing", disable=not run.progress):
        for table, value in _eigenbases(model, weight, moments).items():
            tables[table][weight.name] = value
    del moments  # the eigenvalue pass and the next layers need the room
    n_sequences = 0
    if strategy in _NEEDS_SECOND_PASS:
        refitted, n_sequences = _refit_eigenvalues(model, in_pass, tables, strategy, run)
        tables["diagonal" if strategy == "diagonal" else "eigen_lambda"] = refitted
    return _Fitted(tables, n_tokens, n_sequences)


def _eigenbases(
    model: Model, weight: MLPWeight, moments: dict[MomentKey, Moments]
) -> dict[str, Tensor]:
    """The eigenvalues and eigenvectors of one weight's two Kronecker factors, by table.

    A function of its own so that the float64 factor matrices are freed when it returns,
    before the next pass's moments are gathered.
    """
    a = input_factor(model, weight, moments[weight.input_hook, "forward"])
    s = moments[weight.output_hook, "backward"].second_moment
    found: dict[str, Tensor] = {}
    for side, matrix in (("input", a), ("output", s)):
        values, vectors = torch.linalg.eigh(matrix)
        found[f"{side}_values"], found[f"{side}_vectors"] = values.float(), vectors.float()
    return found


def _to_host(fitted: _Fitted) -> _Fitted:
    """The same factors on the CPU, where they wait for the scan."""
    tables = {
        table: {name: to_host(value) for name, value in values.items()}
        for table, values in fitted.tables.items()
    }
    return _Fitted(tables, fitted.n_tokens, fitted.n_sequences)


def moment_bytes(model: Model, weights: Sequence[MLPWeight]) -> int:
    """Bytes the moments of ``weights`` hold while summed: Σx and Σx xᵀ of each distinct
    input and output hook, with Kahan's compensation where the sums are float32.

    Args:
        model: the model (its device sets the accumulator dtype).
        weights: the weights.

    Returns:
        The bytes.
    """
    dtype = accumulator_dtype(model_device(model))
    copies = 1 if dtype == torch.float64 else 2
    widths = {w.input_hook: w.d_in for w in weights} | {w.output_hook: w.d_out for w in weights}
    return sum(d * (d + 1) for d in widths.values()) * dtype.itemsize * copies


def layer_passes(
    model: Model, weights: Sequence[MLPWeight], layers_per_pass: int | None = None
) -> list[list[int]]:
    """The layers of ``weights`` in groups, each summed in one pass over the corpus.

    Args:
        model: the model.
        weights: the weights to fit.
        layers_per_pass: the group size (``None``: as many layers as fit half the
            free memory of the model's device, at least one).

    Returns:
        The groups, in layer order.
    """
    layers = sorted({w.layer for w in weights})
    if layers_per_pass is None:
        largest = max(moment_bytes(model, [w for w in weights if w.layer == i]) for i in layers)
        layers_per_pass = max(1, available_memory(model_device(model)) // 2 // largest)
    elif layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    return [layers[i : i + layers_per_pass] for i in range(0, len(layers), layers_per_pass)]


def input_factor(model: Model, weight: MLPWeight, moments: Moments) -> Float[Tensor, "d_in d_in"]:
    """``A = E[ā āᵀ]`` of a weight from the moments of its input hook (float64).

    Where the hook is ln2's normalised input (W_in and W_gate of a
    ``HookedTransformer``), ln2's weight and bias (if the model keeps them) are
    applied here; a bias adds a ones column.

    Args:
        model: the model.
        weight: the weight.
        moments: the moments of ``weight.input_hook``.

    Returns:
        The factor, ``d_in`` or ``d_in + 1`` square.
    """
    second, mean = moments.second_moment, moments.mean
    if weight.ln2_affine:
        ln = model.blocks[weight.layer].ln2
        scale, shift = getattr(ln, "w", None), getattr(ln, "b", None)
        if isinstance(scale, Tensor):
            w = scale.detach().to(second.device, second.dtype)
            second, mean = second * w[:, None] * w[None, :], mean * w
        if isinstance(shift, Tensor):
            b = shift.detach().to(second.device, second.dtype)
            second = second + torch.outer(mean, b) + torch.outer(b, mean) + torch.outer(b, b)
            mean = mean + b
    if not weight.bias:
        return second
    top = torch.cat([second, mean[:, None]], dim=1)
    bottom = torch.cat([mean, mean.new_ones(1)])[None]
    return torch.cat([top, bottom])


def sequence_gradients(
    model: Model,
    tokens: Tensor,
    counted: Tensor,
    weights: Sequence[MLPWeight],
    loss: Callable[[Tensor], Tensor],
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each weight's inputs ``ā`` and output gradients ``g`` at the counted tokens of a batch.

    Args:
        model: the model.
        tokens: ``[batch pos]`` token ids.
        counted: ``[batch pos]`` the tokens whose terms count (others are zeroed).
        weights: the weights.
        loss: the scalar function of the logits to differentiate.

    Returns:
        ``{weight: (ā [batch pos d_in], g [batch pos d_out])}``, float32 on the model's device.
    """
    acts, grads = capture_with_gradients(
        model,
        tokens,
        sorted({w.input_hook for w in weights}),
        sorted({w.output_hook for w in weights}),
        loss,
    )
    mask = counted.to(model_device(model), torch.float32)[..., None]
    return {
        w.name: (
            w.inputs(model, acts[w.input_hook].float()) * mask,
            grads[w.output_hook].float() * mask,
        )
        for w in weights
    }


def text_gradients(
    model: Model, chunks: Sequence[Chunk], weights: Sequence[MLPWeight], batch_size: int
) -> Iterator[tuple[Batch, dict[str, tuple[Tensor, Tensor]]]]:
    """Each batch of ``chunks`` and its weights' ``(ā, g)`` for ``log p(chunk)``: the pass
    that scans, indexes and splits texts by token all make.

    Args:
        model: the model (frozen and in linear layout while the batches are taken).
        chunks: the text chunks.
        weights: the weights.
        batch_size: chunks per forward and backward pass.

    Yields:
        ``(batch, {weight: (ā [batch pos d_in], g [batch pos d_out])})``.
    """
    with frozen(model), linear_layout(model):
        for batch in token_batches(model, chunks, batch_size):

            def log_likelihood(logits: Tensor, batch: Batch = batch) -> Tensor:
                return -next_token_loss(logits, batch.tokens, batch.real, "empirical", None)

            yield (
                batch,
                sequence_gradients(model, batch.tokens, batch.counted, weights, log_likelihood),
            )


def gradient_squared_norms(
    a: Float[Tensor, "batch pos d_in"], g: Float[Tensor, "batch pos d_out"]
) -> Float[Tensor, " batch"]:
    """``‖Σ_t ā_t g_tᵀ‖²`` per text, from the two Gram matrices (no gradient formed).

    Args:
        a: the weight's inputs at the counted tokens.
        g: its output gradients there.

    Returns:
        Each text's squared gradient norm, in float64.
    """
    a, g = a.double(), g.double()
    return (torch.einsum("bti,bsi->bts", a, a) * torch.einsum("bto,bso->bts", g, g)).sum((1, 2))


def _refit_eigenvalues(
    model: Model,
    weights: list[MLPWeight],
    bases: dict[str, dict[str, Tensor]],
    strategy: str,
    run: _Run,
) -> tuple[dict[str, Tensor], int]:
    """EK-FAC's Λ (or, for ``"diagonal"``, E[G²]) of ``weights`` from per-sequence gradients
    (a second pass; this rank's share of the sequences, then summed over the ranks).

    Args:
        model: the model.
        weights: the weights of this pass.
        bases: their eigenbases, by table (``input_values``, ``input_vectors``, ...).
        strategy: ``"ekfac"`` or ``"diagonal"``.
        run: how the corpus is read.

    Returns:
        The refitted values by weight name, and the sequences they average over.
    """
    chunks = run.source.chunks(
        model, n_tokens=run.n_tokens, seed=run.seed, cache_dir=run.cache_dir, progress=False
    )
    budgets = token_budgets(chunks, run.n_tokens, len(bos_tokens(model)))
    mine = shard([i for i, budget in enumerate(budgets) if budget > 0], run.split)
    diagonal = strategy == "diagonal"
    device = model_device(model)
    squares = {  # float32: a sum over sequences, hundreds of terms, not tokens
        w.name: torch.zeros(len(bases["input_values"][w.name]), w.d_out, device=device)
        for w in weights
    }
    rotations = {
        w.name: (
            bases["input_vectors"][w.name].to(device),
            bases["output_vectors"][w.name].to(device),
        )
        for w in weights
    }
    bar = tqdm(total=len(mine), desc="EK-FAC eigenvalues", unit="seq", disable=not run.progress)
    with bar, frozen(model), linear_layout(model):
        for batch in token_batches(model, [chunks[i] for i in mine], run.batch_size):
            rows = [mine[j] for j in batch.indices]
            generators = label_generators(run.seed, rows)  # the same labels as the first pass

            def loss(logits: Tensor, batch: Batch = batch, generators: list = generators) -> Tensor:
                return next_token_loss(logits, batch.tokens, batch.real, run.fisher, generators)

            counted = within_budgets(batch.counted, [budgets[i] for i in rows])
            found = sequence_gradients(model, batch.tokens, counted, weights, loss)
            for name, (a, g) in found.items():
                if not diagonal:  # rotating each token is cheaper than rotating each G
                    a, g = a @ rotations[name][0], g @ rotations[name][1]
                total = squares[name]
                for a_seq, g_seq in zip(a, g, strict=True):  # one G at a time stays in cache
                    gradient = a_seq.T @ g_seq  # [d_in d_out]
                    total.addcmul_(gradient, gradient)
            bar.update(len(batch.indices))
    sequences = int(all_reduce_sum(torch.tensor([len(mine)]), run.split))
    means = {name: all_reduce_sum(value, run.split) / sequences for name, value in squares.items()}
    return means, sequences


def _cache_path(
    fingerprint: str,
    names: list[str],
    corpus: Corpus,
    n_tokens: int,
    strategy: str,
    fisher: str,
    seed: int,
    root: str | os.PathLike[str] | None,
) -> Path:
    """The file of the factors fitted with these settings (any of them changes the factors)."""
    fitted = strategy if strategy in _NEEDS_SECOND_PASS else "kfac"
    labels = f"{fisher}-{LABEL_SAMPLER}" if fisher == "sampled" else fisher
    digest = cache_key(names, corpus.id(seed), n_tokens, fitted, labels, seed, length=16)
    return cache_dir(root) / "influence" / f"factors-{fingerprint}-{digest}.st"
