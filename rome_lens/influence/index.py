"""A corpus gradient index: every text's gradient stored once, every later query a product.

A scan (:func:`~rome_lens.influence.influence`) runs a forward and backward
pass over the whole corpus for every query. The index does that pass once
and keeps, for each scored weight and text chunk, what the query needs to
meet the chunk's gradient ``G = Σ_t ā_t g_tᵀ`` (``ā_t`` the weight's input at
token ``t``, ``g_t`` the gradient at its output). The default keeps it whole:

* ``basis="tokens"``: each counted token's ``ā_t`` and ``g_t`` as they are.
  ``G`` has rank at most the chunk's length, so a short text's factors are
  far smaller than ``G`` (on the default model's ``W_out``, 2,112 numbers a
  token against 884,736), and nothing is lost: the query meets them as the
  scan does, ``Σ_t ā_tᵀ P g_t``, or, cut to rank ``r``
  (``ScoreSettings(query_rank=r)``), as ``Σ_t (ā_tᵀ L)(Rᵀ g_t)``,
  ``r (d_in + d_out)`` multiply-adds a token. The scores are the scan's own,
  for any strategy and damping, and the top texts' token scores are read
  from the index too. The price is disk that grows with the corpus's tokens
  (``dtype="bfloat16"`` halves it).

Three projections trade that exactness for a fixed size a chunk (LoGra,
arXiv 2405.13954): two thin bases per weight, ``M_in`` (``d_in × rank_in``)
and ``M_out`` (``d_out × rank_out``), and each chunk's gradient seen through
them,

    ``Π(G) = M_inᵀ G M_out = Σ_t (M_inᵀ ā_t)(M_outᵀ g_t)ᵀ``   ``[rank_in rank_out]``,

formed from the projected inputs and output gradients, so that no
``d_in × d_out`` gradient is ever built; a query's preconditioned gradient
``P`` goes through the same bases and meets every chunk in one matrix
product, ``⟨Π(P), Π(G)⟩``:

* ``basis="eigen"``: the factors' own eigenvectors with the largest
  eigenvalues. EK-FAC preconditions in exactly that basis, so
  ``⟨Π(P), Π(G)⟩`` is the EK-FAC score restricted to the directions in which
  the fitting corpus's gradients are largest;
* ``basis="random"``: a seeded Gaussian basis (LoGra's choice), scaled so that
  the product is unbiased for the full one;
* ``basis="whitened"``: the Gaussian basis applied in the eigenbasis to
  ``G ⊘ √(Λ + λ)``, the query meeting it as ``P ⊙ √(Λ + λ)``: the
  preconditioning split evenly between the sides, as TrackStar does, so that
  the projection's error is spread over the directions the score weighs. Such
  an index serves the strategy and damping it was built with.

Below full rank those scores are the projected gradients' own, not the
scan's: on the default model, EK-FAC with damping 0.1 × mean(Λ) spreads a
score over about half of each ``W_out``'s 885k eigen-directions
(``Σ Λ / (Λ + λ)``), so no small projection reproduces it.
``bench/bench_influence.py --only index`` measures every basis against
exact scores (docs/influence.md).

Each chunk's exact squared gradient norm per weight is stored too, so
``normalize=True`` divides by the true norms of the weights scored.

The index lives in a folder: ``index.json`` (what it was built from:
the model's fingerprint, the factors' and the corpus's digests, the
settings) and ``shard-00000.safetensors`` files of ``chunks_per_shard`` chunks
each, written atomically with a SHA-256 digest (:mod:`rome_lens.core.cache`).
A shard is verified in full the first time a process reads it; one that does
not match its digest is rebuilt from the model, factors and corpus. Under
``torchrun`` each rank builds, and later scores, the shards ``k`` with
``k mod world_size == rank``.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence import (IndexSettings, build_gradient_index,
...                                  fit_influence_factors, influence)
>>> model = tiny_model()
>>> texts = ["The Eiffel Tower is in Paris.", "The Louvre is a museum.", "Berlin is in Germany."]
>>> factors = fit_influence_factors(model, texts * 4, layers=[1, 2], n_tokens=200,
...                                 cache_dir=tempfile.mkdtemp(), progress=False)
>>> index = build_gradient_index(model, factors, texts, tempfile.mkdtemp(), progress=False)
>>> index.weights
('blocks.1.mlp.W_in', 'blocks.1.mlp.W_out', 'blocks.2.mlp.W_in', 'blocks.2.mlp.W_out')
>>> index.n_texts, index.n_tokens, index.bytes_per_text  # 4 × 321 float32 numbers a token
(3, 24, 41088)
>>> result = influence(model, factors, "The Eiffel Tower is in", " Paris", texts, top_k=2,
...                    index=index, progress=False)
>>> result.text_ids[0]  # the fact itself first, as the scan finds
0
>>> projected = build_gradient_index(model, factors, texts, tempfile.mkdtemp(),
...                                  settings=IndexSettings(basis="eigen", rank_in=16,
...                                                         rank_out=16), progress=False)
>>> projected.bytes_per_text  # 4 × 16 × 16 float32 numbers a chunk
4096
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.cache import CacheError, load_tensors, save_tensors
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource, bos_tokens
from rome_lens.core.distributed import Split, all_reduce_sum, is_main, shard
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import model_device, to_host
from rome_lens.influence.factors import (
    InfluenceFactors,
    gradient_squared_norms,
    text_gradients,
)
from rome_lens.influence.weights import MLPWeight, mlp_weights

__all__ = [
    "EigenQueries",
    "GradientIndex",
    "IndexSettings",
    "build_gradient_index",
    "factors_digest",
    "Projection",
    "index_scan",
    "indexed_token_scores",
    "project",
]

Basis = Literal["eigen", "random", "whitened", "tokens"]
StoredDtype = Literal["float32", "bfloat16"]
_MANIFEST = "index.json"
_FORMAT = 2  # bumped when the files' layout changes
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TOKEN_BLOCK = 4096  # tokens scored at once against dense queries (bounds their product)
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of shards this process checked


@dataclass(frozen=True)
class EigenQueries:
    """Preconditioned query gradients kept in the curvature's eigenbasis: ``P = Q_A X Q_Sᵀ``.

    EK-FAC and K-FAC divide in that basis; keeping ``X`` there, rotated in from the
    gradient's per-token factors, spares rotating a dense ``d_in × d_out`` gradient in
    and ``P`` back out, which cost more than everything else a query against an index
    does.
    """

    input_vectors: Float[Tensor, "d_in d_in"]  # Q_A
    rotated: Float[Tensor, "query d_in d_out"]  # X
    output_vectors: Float[Tensor, "d_out d_out"]  # Q_S

    def select(self, q: int) -> EigenQueries:
        """Query ``q`` alone."""
        return EigenQueries(self.input_vectors, self.rotated[q : q + 1], self.output_vectors)

    def dense(self) -> Float[Tensor, "query d_in d_out"]:
        """``P`` in the weight's own basis."""
        return self.input_vectors @ self.rotated @ self.output_vectors.T


Query = Tensor | EigenQueries | tuple[Tensor, Tensor]  # dense, eigenbasis, or factors (L, R)


def project(
    query: Query,
    input_basis: Float[Tensor, "d_in rank_in"],
    output_basis: Float[Tensor, "d_out rank_out"],
) -> Float[Tensor, "query rank_in rank_out"]:
    """``M_inᵀ P M_out`` for every query, from a dense ``P`` or from its eigenbasis form.

    Args:
        query: ``P`` as ``[query d_in d_out]``, :class:`EigenQueries`, or low-rank factors
            ``(L [query d_in r], R [query d_out r])`` with ``P = L Rᵀ``.
        input_basis: ``M_in``.
        output_basis: ``M_out``.

    Returns:
        ``[query rank_in rank_out]``.
    """
    if isinstance(query, tuple):
        left, right = query
        return (input_basis.T @ left) @ (output_basis.T @ right).mT
    if isinstance(query, EigenQueries):
        input_basis, output_basis = (
            query.input_vectors.T @ input_basis,
            query.output_vectors.T @ output_basis,
        )
        query = query.rotated
    return torch.einsum("ir,qio,os->qrs", input_basis, query, output_basis)


@dataclass(frozen=True)
class Projection:
    """How one weight's gradients are stored: ``M_inᵀ G M_out``, or for a whitened index
    ``M_inᵀ (Q_Aᵀ G Q_S ⊘ √(Λ + λ)) M_out``; and how a query meets them."""

    input_basis: Float[Tensor, "d_in rank_in"]
    output_basis: Float[Tensor, "d_out rank_out"]
    whitening: tuple[Tensor, Tensor, Tensor] | None = None  # Q_A, Q_S, √(Λ + λ)

    def to(self, device: torch.device) -> Projection:
        """The same projection on ``device``."""
        whitening = None if self.whitening is None else tuple(t.to(device) for t in self.whitening)
        return Projection(self.input_basis.to(device), self.output_basis.to(device), whitening)  # type: ignore[arg-type]

    def cut(self, rank: int) -> Projection:
        """The first ``rank`` directions of each basis (bases are nested)."""
        return Projection(self.input_basis[:, :rank], self.output_basis[:, :rank], self.whitening)

    def texts(
        self, a: Float[Tensor, "batch pos d_in"], g: Float[Tensor, "batch pos d_out"]
    ) -> Float[Tensor, "batch rank_in rank_out"]:
        """Each text's stored matrix, from its inputs and output gradients."""
        if self.whitening is None:
            return torch.einsum("bti,bto->bio", a @ self.input_basis, g @ self.output_basis)
        q_a, q_s, scale = self.whitening
        rotated = torch.einsum("bti,bto->bio", a @ q_a, g @ q_s) / scale  # [batch d_in d_out]
        return torch.einsum("ir,bio,os->brs", self.input_basis, rotated, self.output_basis)

    def queries(self, query: Query) -> Float[Tensor, "query rank_in rank_out"]:
        """Each query's matrix, so that its dot product with a text's is the score."""
        if self.whitening is None:
            return project(query, self.input_basis, self.output_basis)
        if not isinstance(query, EigenQueries):
            raise ValueError("a whitened index scores EK-FAC or K-FAC queries only")
        return torch.einsum("ir,qio,os->qrs", self.input_basis, query.rotated * self.whitening[2],
                            self.output_basis)  # fmt: skip


@dataclass(frozen=True)
class IndexSettings:
    """What a gradient index stores (:func:`build_gradient_index`)."""

    rank_in: int = 32
    """Input directions kept per weight (capped at the weight's ``d_in``)."""
    rank_out: int = 32
    """Output directions kept per weight (capped at ``d_out``)."""
    basis: Basis = "tokens"
    """``"tokens"``: no projection, each counted token's ``ā_t`` and ``g_t`` themselves, so
    that the scores are the scan's own (the ranks are unused); ``"eigen"``: the factors'
    eigenvectors with the largest eigenvalues; ``"random"``: a seeded Gaussian basis;
    ``"whitened"``: the same Gaussian basis applied to the gradient in the eigenbasis divided
    by ``√(Λ + λ)``, so that the preconditioning is split evenly between query and text."""
    dtype: StoredDtype = "float32"
    """How the stored numbers are kept: ``"bfloat16"`` halves the disk and the bytes a
    query streams, at about three significant digits per number."""
    seed: int = 0
    """Seeds the random bases."""
    strategy: Literal["ekfac", "kfac"] = "ekfac"
    """The curvature a whitened index divides by (the queries must use the same)."""
    damping: float = 0.1
    """Its damping, as :class:`~rome_lens.influence.settings.ScoreSettings` (whitened only)."""
    chunks_per_shard: int | None = None
    """Text chunks per shard file: the unit written, verified, rebuilt and streamed, and held
    in memory while it is built (``None``: 1024, or 64 for ``basis="tokens"``, whose shards
    hold ``d_in + d_out`` numbers per token and weight)."""
    layers: tuple[int, ...] | None = None
    """The MLP layers indexed (``None``: every layer of the factors)."""

    def __post_init__(self) -> None:
        if self.chunks_per_shard is None:
            object.__setattr__(self, "chunks_per_shard", 64 if self.basis == "tokens" else 1024)
        for name in ("rank_in", "rank_out", "chunks_per_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.basis not in ("eigen", "random", "whitened", "tokens"):
            raise ValueError(
                f"basis must be 'eigen', 'random', 'whitened' or 'tokens', got {self.basis!r}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.strategy not in ("ekfac", "kfac"):
            raise ValueError(f"strategy must be 'ekfac' or 'kfac', got {self.strategy!r}")
        if not isinstance(self.damping, int | float) or not self.damping >= 0:
            raise ValueError(f"damping must be a number >= 0, got {self.damping!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))


def factors_digest(factors: InfluenceFactors) -> str:
    """A short digest of the factors' content: which weights, and their eigen-decomposition.

    Args:
        factors: fitted factors.

    Returns:
        16 hex digits; equal factors give equal digests.
    """
    sha = hashlib.sha256(json.dumps([factors.fingerprint, factors.names]).encode())
    for name in factors.names:  # the spectra whole; Λ (d_in × d_out) by its sum and a sample
        for table in (factors.input_values, factors.output_values):
            sha.update(table[name].double().numpy().tobytes())
        if name in factors.eigen_lambda:
            flat = factors.eigen_lambda[name].flatten().double()
            sample = flat[:: max(1, len(flat) // 1024)]
            sha.update(torch.cat([flat.sum()[None], sample]).numpy().tobytes())
    return sha.hexdigest()[:16]


@dataclass(frozen=True)
class GradientIndex:
    """A built index: where it is and what it was built from (read from ``index.json``)."""

    path: Path  # the folder
    model: str  # model_fingerprint of the model
    factors: str  # factors_digest of the factors
    corpus: str  # Corpus.id() of the texts
    n_texts: int  # texts indexed
    n_chunks: int  # their chunks (a text longer than n_ctx has several)
    n_tokens: int  # their counted tokens (every one but BOS)
    weights: tuple[str, ...]  # the weights indexed, e.g. "blocks.3.mlp.W_out"
    ranks: tuple[tuple[int, int], ...]  # each weight's (rank_in, rank_out), or (d_in, d_out)
    settings: IndexSettings  # as built

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GradientIndex:
        """The index in the folder ``path``.

        Args:
            path: a folder written by :func:`build_gradient_index`.

        Returns:
            The index.
        """
        manifest = Path(path) / _MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{path} holds no gradient index: {_MANIFEST} is missing")
        try:
            data = json.loads(manifest.read_text())
            if data.pop("format") != _FORMAT:
                raise ValueError("it was written by another version of rome_lens")
            settings = IndexSettings(**{**data.pop("settings"), "layers": data.pop("layers")})
            return cls(
                path=Path(path), settings=settings, weights=tuple(data.pop("weights")),
                ranks=tuple(tuple(r) for r in data.pop("ranks")), **data,
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as err:
            raise CacheError(
                f"the gradient index manifest {manifest} is unreadable: {err}"
            ) from err

    @property
    def n_shards(self) -> int:
        """How many shard files hold the chunks."""
        return -(-self.n_chunks // self.chunks_per_shard)

    @property
    def chunks_per_shard(self) -> int:
        """Text chunks per shard file."""
        assert self.settings.chunks_per_shard is not None  # resolved by IndexSettings
        return self.settings.chunks_per_shard

    @property
    def bytes_per_text(self) -> int:
        """Disk bytes per text (the stored gradients; norms and owners aside)."""
        itemsize = _DTYPES[self.settings.dtype].itemsize
        if self.settings.basis == "tokens":
            stored = self.n_tokens * sum(d_in + d_out for d_in, d_out in self.ranks)
        else:
            stored = self.n_chunks * sum(r_in * r_out for r_in, r_out in self.ranks)
        return round(itemsize * stored / max(self.n_texts, 1))

    def check(self, model: Model, factors: InfluenceFactors, corpus: Corpus) -> None:
        """Raise, naming what differs, unless the index was built from these three.

        Args:
            model: the model scoring the query.
            factors: the factors preconditioning it.
            corpus: the texts the scores are about.
        """
        differences = [
            (self.model, model_fingerprint(model), "another model"),
            (self.factors, factors_digest(factors), "other factors"),
            (self.corpus, corpus.id(), "another corpus"),
        ]
        for built, given, what in differences:
            if built != given:
                raise ValueError(
                    f"the gradient index {self.path} was built for {what} ({built}, not "
                    f"{given}): rebuild it with build_gradient_index"
                )

    def shard_path(self, k: int) -> Path:
        """The file of shard ``k``."""
        return self.path / f"shard-{k:05d}.safetensors"

    def _manifest(self) -> dict[str, object]:
        settings = asdict(self.settings)
        layers = settings.pop("layers")
        return {
            "format": _FORMAT, "model": self.model, "factors": self.factors,
            "corpus": self.corpus, "n_texts": self.n_texts, "n_chunks": self.n_chunks,
            "n_tokens": self.n_tokens,
            "weights": list(self.weights), "ranks": [list(r) for r in self.ranks],
            "layers": list(layers) if layers is not None else None, "settings": settings,
        }  # fmt: skip


def build_gradient_index(
    model: Model,
    factors: InfluenceFactors,
    corpus: CorpusSource | Corpus,
    path: str | os.PathLike[str],
    *,
    settings: IndexSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
) -> GradientIndex:
    """Project every text's gradient once and store it in the folder ``path``.

    A folder that already holds this index (same model, factors, corpus and
    settings) is completed: shards that verify are kept, missing or corrupt
    ones are built. A folder holding another index is refused.

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`.
        corpus: the texts: strings, a ``.txt``/``.jsonl`` path or a :class:`Corpus`.
        path: the folder (created if missing).
        settings: ranks, basis, shard size, layers (``None``: ``IndexSettings()``).
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: each rank builds its share of the shards (``None``: when a
            process group is initialised).

    Returns:
        The index, to pass as ``index=`` to :func:`~rome_lens.influence.influence`.
    """
    settings = settings or IndexSettings()
    if not isinstance(settings, IndexSettings):
        raise TypeError(f"settings must be IndexSettings, got {type(settings).__name__}")
    texts = Corpus.read(corpus)
    if texts.documents is None or not texts.documents:
        raise ValueError("corpus must hold texts to index, got an empty or sampled corpus")
    factors.check_model(model)
    weights = _indexed_weights(model, factors, settings.layers)
    bases = _bases(factors, weights, settings)
    chunks = texts.chunks(model, max_length=model.cfg.n_ctx)
    index = GradientIndex(
        path=Path(path), model=model_fingerprint(model), factors=factors_digest(factors),
        corpus=texts.id(), n_texts=len(texts.documents), n_chunks=len(chunks),
        n_tokens=_counted_tokens(model, chunks), weights=tuple(w.name for w in weights),
        ranks=_stored_ranks(factors, weights, bases), settings=settings,
    )  # fmt: skip
    split = Split.of(distributed)
    mine = shard(range(index.n_shards), split)
    _check_disk(index, [k for k in mine if not index.shard_path(k).exists()], split)
    _claim_folder(index, write=is_main(split))
    all_reduce_sum(torch.zeros(1), split)  # the manifest is written before any shard
    todo = [k for k in mine if _read_shard(index, k) is None]
    total = sum(len(_shard_chunks(chunks, index, k)) for k in todo)
    quiet = not progress or not is_main(split)
    bar = tqdm(total=total, desc="indexing texts", unit="text", disable=quiet)
    with bar:
        for k in todo:
            _build_shard(model, weights, bases, index, k, chunks, batch_size, bar)
    all_reduce_sum(torch.zeros(1), split)  # every rank's shards are written before anyone reads
    return index


def _check_disk(index: GradientIndex, missing: list[int], split: Split) -> None:
    """Raise on every rank, before anything is written, if some rank's missing shards would
    not fit on its disk (a tokens index grows with the corpus's tokens)."""
    share = sum(min(index.chunks_per_shard, index.n_chunks - k * index.chunks_per_shard)
                for k in missing) / max(index.n_chunks, 1)  # fmt: skip
    needed = index.bytes_per_text * index.n_texts * share
    folder = index.path
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    short = all_reduce_sum(torch.tensor([float(needed > free)]), split)
    if short.item() > 0:
        raise OSError(
            f"the gradient index in {index.path} needs about {needed / 1e6:,.1f} MB, and "
            f"{free / 1e6:,.1f} MB are free there (on one rank at least): index fewer layers "
            "(IndexSettings(layers=...)), keep bfloat16 (dtype='bfloat16'), or project "
            "(basis='eigen')"
        )


def _indexed_weights(
    model: Model, factors: InfluenceFactors, layers: tuple[int, ...] | None
) -> list[MLPWeight]:
    """The factors' weights in ``layers`` (``None``: all of them)."""
    chosen = list(factors.layers) if layers is None else list(layers)
    missing = [layer for layer in chosen if layer not in factors.layers]
    if missing or not chosen:
        raise ValueError(f"the factors cover layers {factors.layers}, not {missing or chosen}")
    fitted = sorted({name.rsplit(".", 1)[-1] for name in factors.names})
    return [w for w in mlp_weights(model, chosen, fitted) if w.name in factors.names]


def _counted_tokens(model: Model, chunks: Sequence[Chunk]) -> int:
    """The tokens whose terms a text's gradient sums: every one but a leading BOS."""
    bos = bos_tokens(model)
    leading = sum(int(len(bos) > 0 and int(c.tokens[0]) == int(bos[0])) for c in chunks)
    return sum(len(c.tokens) for c in chunks) - leading


def _stored_ranks(
    factors: InfluenceFactors, weights: Sequence[MLPWeight], bases: dict[str, Projection]
) -> tuple[tuple[int, int], ...]:
    """Each weight's stored shape: its bases' ranks, or ``(d_in, d_out)`` unprojected."""
    if not bases:
        return tuple(
            (factors.input_vectors[w.name].shape[0], factors.output_vectors[w.name].shape[0])
            for w in weights
        )
    return tuple((p.input_basis.shape[1], p.output_basis.shape[1]) for p in bases.values())


def _bases(
    factors: InfluenceFactors, weights: Sequence[MLPWeight], settings: IndexSettings
) -> dict[str, Projection]:
    """Each weight's projection, rebuilt the same way whenever the index is read (none for
    ``basis="tokens"``, which stores the tokens' factors as they are)."""
    if settings.basis == "tokens":
        return {}
    bases = {}
    for weight in weights:
        generator = torch.Generator().manual_seed(settings.seed + zlib.crc32(weight.name.encode()))
        q_a, q_s = factors.input_vectors[weight.name], factors.output_vectors[weight.name]
        r_in, r_out = min(settings.rank_in, q_a.shape[0]), min(settings.rank_out, q_s.shape[0])
        whitening = None
        if settings.basis == "eigen":  # eigenvalues ascend: the last columns are the largest
            input_basis, output_basis = q_a[:, -r_in:].flip(-1), q_s[:, -r_out:].flip(-1)
        else:  # E[M Mᵀ] = I, so that ⟨Π(P), Π(G)⟩ is unbiased for ⟨P, G⟩
            input_basis = torch.randn(q_a.shape[0], r_in, generator=generator) / r_in**0.5
            output_basis = torch.randn(q_s.shape[0], r_out, generator=generator) / r_out**0.5
        if settings.basis == "whitened":
            values = factors.eigenvalues(weight.name, settings.strategy)
            scale = (values + settings.damping * values.mean()).sqrt()
            whitening = (q_a.float(), q_s.float(), scale.float())
        bases[weight.name] = Projection(
            input_basis.float().contiguous(), output_basis.float().contiguous(), whitening
        )
    return bases


def _shard_chunks(chunks: list[Chunk], index: GradientIndex, k: int) -> list[Chunk]:
    """The chunks shard ``k`` holds."""
    per_shard = index.chunks_per_shard
    return chunks[k * per_shard : (k + 1) * per_shard]


def _build_shard(
    model: Model,
    weights: Sequence[MLPWeight],
    bases: dict[str, Projection],
    index: GradientIndex,
    k: int,
    chunks: list[Chunk],
    batch_size: int,
    bar: tqdm,
) -> None:
    """Project shard ``k``'s chunks (or gather their tokens) and write the shard."""
    mine = _shard_chunks(chunks, index, k)
    if index.settings.basis == "tokens":
        tensors = _token_chunks(model, weights, mine, batch_size, bar)
    else:
        tensors = _project_chunks(model, weights, bases, mine, batch_size, bar)
    dtype = _DTYPES[index.settings.dtype]
    tensors = {name: t.to(dtype) if t.is_floating_point() and name != "squared_norms" else t
               for name, t in tensors.items()}  # fmt: skip
    save_tensors(index.shard_path(k), tensors, {"shard": k, "index": _key(index)})


def _key(index: GradientIndex) -> str:
    """What every shard of one index shares (its manifest, without the folder)."""
    return hashlib.sha256(json.dumps(index._manifest(), sort_keys=True).encode()).hexdigest()[:16]


def _claim_folder(index: GradientIndex, write: bool) -> None:
    """Raise if the folder holds another index; else, where ``write`` (one rank), write the
    manifest atomically: every shard then points to it."""
    manifest = index.path / _MANIFEST
    if manifest.exists():
        try:
            found = GradientIndex.open(index.path)
        except CacheError:
            found = None  # unreadable: ours to overwrite
        if found is not None and _key(found) != _key(index):
            raise ValueError(
                f"{index.path} holds another gradient index (built for model {found.model}, "
                f"factors {found.factors}, corpus {found.corpus}, {found.settings}): choose "
                "another folder or delete it"
            )
    if write:
        index.path.mkdir(parents=True, exist_ok=True)
        temporary = manifest.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(index._manifest(), indent=1))
        os.replace(temporary, manifest)


def _project_chunks(
    model: Model,
    weights: Sequence[MLPWeight],
    bases: dict[str, Projection],
    chunks: list[Chunk],
    batch_size: int,
    bar: tqdm,
) -> dict[str, Tensor]:
    """One shard's tensors: each weight's ``Π(G)`` per chunk, the chunks' texts and
    exact ``‖G‖²`` per weight."""
    device = model_device(model)
    on_device = {name: projection.to(device) for name, projection in bases.items()}
    projected = {
        name: torch.zeros(
            len(chunks), p.input_basis.shape[1], p.output_basis.shape[1], device=device
        )
        for name, p in bases.items()
    }  # {weight: [chunk rank_in rank_out]}
    squared_norms = torch.zeros(len(chunks), len(weights), dtype=torch.float64, device=device)
    for batch, found in text_gradients(model, chunks, weights, batch_size):
        rows = torch.tensor(batch.indices, device=device)
        for j, weight in enumerate(weights):
            a, g = found[weight.name]  # [batch pos d_in], [batch pos d_out]
            projected[weight.name][rows] = on_device[weight.name].texts(a, g)
            squared_norms[rows, j] = gradient_squared_norms(a, g)
        bar.update(len(batch.indices))
    tensors = {name: to_host(p) for name, p in projected.items()}
    tensors["documents"] = torch.tensor([c.document for c in chunks], dtype=torch.long)
    tensors["squared_norms"] = to_host(squared_norms)
    return tensors


def _token_chunks(
    model: Model,
    weights: Sequence[MLPWeight],
    chunks: list[Chunk],
    batch_size: int,
    bar: tqdm,
) -> dict[str, Tensor]:
    """One shard's tensors for ``basis="tokens"``: each weight's ``ā_t`` and ``g_t`` at every
    counted token (``"{weight}.inputs"`` and ``"{weight}.gradients"``), the chunk each token
    belongs to, the chunks' texts and exact ``‖G‖²`` per weight."""
    device = model_device(model)
    inputs: dict[str, list[Tensor]] = {w.name: [] for w in weights}
    gradients: dict[str, list[Tensor]] = {w.name: [] for w in weights}
    owners: list[Tensor] = []
    squared_norms = torch.zeros(len(chunks), len(weights), dtype=torch.float64, device=device)
    for batch, found in text_gradients(model, chunks, weights, batch_size):
        counted = batch.counted.to(device)  # [batch pos]
        rows = torch.tensor(batch.indices, device=device)
        owners.append(to_host(rows[:, None].expand_as(counted)[counted]))  # [token]
        for j, weight in enumerate(weights):
            a, g = found[weight.name]  # [batch pos d_in], [batch pos d_out]
            inputs[weight.name].append(to_host(a[counted]))  # [token d_in]
            gradients[weight.name].append(to_host(g[counted]))  # [token d_out]
            squared_norms[rows, j] = gradient_squared_norms(a, g)
        bar.update(len(batch.indices))
    tensors = {f"{name}.inputs": torch.cat(found) for name, found in inputs.items()}
    tensors |= {f"{name}.gradients": torch.cat(found) for name, found in gradients.items()}
    tensors["token_chunks"] = torch.cat(owners)
    tensors["documents"] = torch.tensor([c.document for c in chunks], dtype=torch.long)
    tensors["squared_norms"] = to_host(squared_norms)
    return tensors


def _token_dots(
    tensors: dict[str, Tensor], name: str, query: Query
) -> Float[Tensor, "chunk query"]:
    """``⟨P, Σ_t ā_t g_tᵀ⟩`` for every chunk of a tokens shard."""
    a, g = tensors[f"{name}.inputs"], tensors[f"{name}.gradients"]  # [token d_in], [token d_out]
    per_token = _per_token(a, g, query)  # [token query]
    scores = torch.zeros(len(tensors["documents"]), per_token.shape[1], dtype=torch.float64)
    return scores.index_add_(0, tensors["token_chunks"], per_token.double())


def _per_token(
    a: Float[Tensor, "token d_in"], g: Float[Tensor, "token d_out"], query: Query
) -> Float[Tensor, "token query"]:
    """``ā_tᵀ P g_t`` for every token and query: ``Σ_r (ā_tᵀ L)(Rᵀ g_t)`` for low-rank factors
    (``(d_in + d_out) × rank`` products a token), the dense form otherwise."""
    if isinstance(query, tuple):
        left, right = query  # [query d_in rank], [query d_out rank]
        n_queries, rank = left.shape[0], left.shape[2]
        left = left.permute(1, 0, 2).flatten(1).to(a.dtype)  # [d_in query·rank]
        right = right.permute(1, 0, 2).flatten(1).to(g.dtype)  # [d_out query·rank]
        return ((a @ left).float() * (g @ right).float()).view(-1, n_queries, rank).sum(-1)
    dense = query.dense() if isinstance(query, EigenQueries) else query  # [query d_in d_out]
    n_queries, d_out = dense.shape[0], dense.shape[2]
    flat = dense.permute(1, 0, 2).flatten(1).to(a.dtype)  # [d_in query·d_out]
    blocks = [
        ((a[i : i + _TOKEN_BLOCK] @ flat).float().view(-1, n_queries, d_out)
         * g[i : i + _TOKEN_BLOCK, None].float()).sum(-1)
        for i in range(0, len(a), _TOKEN_BLOCK)
    ]  # fmt: skip
    return torch.cat(blocks) if blocks else torch.zeros(0, n_queries)


def indexed_token_scores(
    index: GradientIndex,
    weights: Sequence[MLPWeight],
    query: Mapping[str, Query],
    documents: Sequence[int],
) -> list[Float[Tensor, " token"]] | None:
    """Each document's score split by counted token, ``Σ_w ā_tᵀ P g_t`` for one query, read
    from a tokens index rather than from a pass over the texts.

    Args:
        index: an index of ``basis="tokens"``.
        weights: the scored weights.
        query: each weight's preconditioned query (one query).
        documents: the texts wanted, as corpus indices.

    Returns:
        One ``[token]`` tensor per document, its chunks in order; ``None`` when a shard
        cannot be read (the caller then makes the pass).
    """
    wanted: dict[int, list[Tensor]] = {d: [] for d in documents}
    on_host = {w.name: _on_host(query[w.name]) for w in weights}
    for k in range(index.n_shards):
        tensors = _read_shard(index, k)
        if tensors is None:
            return None
        for row, document in enumerate(tensors["documents"].tolist()):
            if document not in wanted:
                continue
            mine = (tensors["token_chunks"] == row).nonzero().squeeze(1)  # in order
            per_weight = [
                _per_token(tensors[f"{w.name}.inputs"][mine],
                           tensors[f"{w.name}.gradients"][mine], on_host[w.name])[:, 0]
                for w in weights
            ]  # fmt: skip
            wanted[document].append(torch.stack(per_weight).double().sum(0))
    return [torch.cat(wanted[d]) if wanted[d] else torch.zeros(0) for d in documents]


def _read_shard(index: GradientIndex, k: int) -> dict[str, Tensor] | None:
    """Shard ``k`` if it exists and belongs to ``index`` (its digest checked once per process);
    ``None`` (after a warning, for a corrupt one) otherwise."""
    path = index.shard_path(k)
    if not path.exists():
        return None
    stat = path.stat()
    seen = (str(path), stat.st_size, stat.st_mtime_ns)
    try:
        if seen in _VERIFIED:
            tensors, metadata = _load_unverified(path)
        else:
            tensors, metadata = load_tensors(path, what="gradient index shard")
        if metadata.get("index") != _key(index) or metadata.get("shard") != k:
            raise CacheError(f"{path.name} belongs to another index")
    except (CacheError, FileNotFoundError, ValueError) as err:
        warnings.warn(f"rome_lens: rebuilding gradient index shard {path.name}: {err}",
                      stacklevel=3)  # fmt: skip
        path.unlink(missing_ok=True)
        return None
    _VERIFIED.add(seen)
    return tensors


def _load_unverified(path: Path) -> tuple[dict[str, Tensor], dict[str, object]]:
    """A shard already verified by this process: read without hashing its bytes again."""
    from safetensors.torch import load_file

    sidecar = json.loads(path.with_suffix(path.suffix + ".json").read_text())
    return load_file(str(path)), dict(sidecar["metadata"])


def index_scan(
    model: Model,
    factors: InfluenceFactors,
    index: GradientIndex,
    texts: Corpus,
    weights: Sequence[MLPWeight],
    layers: Sequence[int],
    queries: Mapping[str, Query],
    split: Split,
) -> tuple[Float[Tensor, "mine query layer"], Float[Tensor, " mine"], Int[Tensor, " mine"]]:
    """What a scan gives, from the index: every chunk's score for every query split by
    layer, its ``‖G‖²``, and its text, for this rank's shards.

    Args:
        model: the model (for shards that must be rebuilt).
        factors: the factors (the bases, and rebuilding).
        index: the index, already checked against the three.
        texts: the corpus (for shards that must be rebuilt).
        weights: the scored weights, all indexed.
        layers: their layers, in the scores' column order.
        queries: each weight's preconditioned query gradients, dense or in the eigenbasis.
        split: this rank's share of the shards.

    Returns:
        ``(scores [chunk query layer], squared norms [chunk], texts [chunk])``.
    """
    missing = [w.name for w in weights if w.name not in index.weights]
    if missing:
        raise ValueError(f"the gradient index holds {list(index.weights)}, not {missing}")
    tokens = index.settings.basis == "tokens"
    if tokens:
        projected = {w.name: _on_host(queries[w.name]) for w in weights}
    else:
        device = model_device(model)
        projected = {
            name: to_host(projection.to(device).queries(queries[name])).flatten(1)
            for name, projection in _bases(factors, weights, index.settings).items()
        }  # {weight: [query rank_in·rank_out]}
    n_queries = _n_queries(next(iter(projected.values())))
    column = {layer: j for j, layer in enumerate(layers)}
    scored = [index.weights.index(w.name) for w in weights]
    parts, norms, owners = [], [], []
    for tensors in _shards(model, factors, index, texts, split):
        n = len(tensors["documents"])
        scores = torch.zeros(n, n_queries, len(layers), dtype=torch.float64)
        for weight in weights:
            if tokens:
                dots = _token_dots(tensors, weight.name, projected[weight.name])
            else:  # [chunk query]
                stored = tensors[weight.name].flatten(1)
                dots = stored @ projected[weight.name].T.to(stored.dtype)  # type: ignore[union-attr]
            scores[:, :, column[weight.layer]] += dots.double()
        parts.append(scores)
        norms.append(tensors["squared_norms"][:, scored].sum(1))  # the scored weights' ‖G‖²
        owners.append(tensors["documents"])
    if not parts:  # a rank with no shard contributes nothing
        return (torch.zeros(0, n_queries, len(layers), dtype=torch.float64),
                torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long))  # fmt: skip
    return torch.cat(parts), torch.cat(norms), torch.cat(owners)


def _on_host(query: Query) -> Query:
    """The query where the shards are read."""
    if isinstance(query, tuple):
        return (to_host(query[0]), to_host(query[1]))
    if isinstance(query, EigenQueries):
        return EigenQueries(*(to_host(t) for t in (query.input_vectors, query.rotated,
                                                   query.output_vectors)))  # fmt: skip
    return to_host(query)


def _n_queries(query: Query) -> int:
    if isinstance(query, tuple):
        return query[0].shape[0]
    return (query.rotated if isinstance(query, EigenQueries) else query).shape[0]


def _shards(
    model: Model,
    factors: InfluenceFactors,
    index: GradientIndex,
    texts: Corpus,
    split: Split,
) -> Iterator[dict[str, Tensor]]:
    """This rank's shards, read in turn; a missing or corrupt one is rebuilt first."""
    for k in shard(range(index.n_shards), split):
        tensors = _read_shard(index, k)
        if tensors is None:
            chunks = texts.chunks(model, max_length=model.cfg.n_ctx)
            indexed = _indexed_weights(model, factors, index.settings.layers)
            bases = _bases(factors, indexed, index.settings)
            with tqdm(disable=True) as bar:
                _build_shard(model, indexed, bases, index, k, chunks, 8, bar)
            tensors = _read_shard(index, k)
            if tensors is None:
                raise CacheError(f"shard {k} of {index.path} could not be rebuilt")
        yield tensors
