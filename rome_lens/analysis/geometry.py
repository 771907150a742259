"""The shape of the representations at each depth: anisotropy and intrinsic dimension.

* **Anisotropy** is ``λ_max / Σλ`` of the centred covariance of the residual
  stream: near 0 when variance spreads over many directions, near 1 when one
  direction dominates.
* **Intrinsic dimension** is TwoNN's (Facco et al. 2017): for each point, the
  ratio ``μ = r₂ / r₁`` of its distances to its second and first nearest
  neighbours follows ``P(μ ≤ x) = 1 − x^{−d}`` on a d-dimensional manifold, so
  ``d`` is the slope of ``−log(1 − F(μ))`` against ``log μ`` through the origin.
  Distances are computed a block of rows at a time with a top-k, so memory is
  ``block × n``, never ``n × n``. ``fit_fraction`` keeps the smallest ratios:
  0.9 is Facco et al.'s (drop the 10% largest), 0.2 is LLM-Microscope's.

>>> import torch
>>> from rome_lens.analysis.geometry import anisotropy_of, two_nn_dimension
>>> generator = torch.Generator().manual_seed(0)
>>> basis = torch.linalg.qr(torch.randn(64, 5, generator=generator)).Q  # a 5-d plane in 64-d
>>> points = torch.randn(2000, 5, generator=generator) @ basis.T
>>> round(two_nn_dimension(points))
5
>>> round(anisotropy_of(torch.randn(1000, 4, generator=generator) * torch.tensor([10, 1, 1, 1])), 2)
0.97
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.analysis.states import residual_states
from rome_lens.core.backend import Model
from rome_lens.core.corpus import Corpus, CorpusSource
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.results import Result

__all__ = [
    "Geometry",
    "anisotropy",
    "anisotropy_of",
    "intrinsic_dimension",
    "representation_geometry",
    "two_nn_dimension",
]

_EPS = 1e-8  # distances below this count as duplicates (as in LLM-Microscope)


@dataclass
class Geometry(Result):
    """Anisotropy and intrinsic dimension of the residual stream at each depth."""

    kind = "representation_geometry"
    anisotropy: Float[Tensor, " depth"]  # λ_max / Σλ of the centred covariance
    intrinsic_dimension: Float[Tensor, " depth"]  # TwoNN; nan where not computed
    n_tokens: int  # tokens (points) per depth
    corpus: str  # where the text came from
    fit_fraction: float  # share of the smallest ratios TwoNN fitted
    fingerprint: str = ""  # model_fingerprint of the model

    def to_dataframe(self) -> pd.DataFrame:
        """One row per depth (0: the embeddings; l + 1: after block l)."""
        return pd.DataFrame(
            {
                "depth": range(len(self.anisotropy)),
                "anisotropy": self.anisotropy.tolist(),
                "intrinsic_dimension": self.intrinsic_dimension.tolist(),
            }
        )


def anisotropy_of(points: Float[Tensor, "n d"]) -> float:
    """``λ_max / Σλ`` of the centred covariance of ``points``.

    Args:
        points: one row per point.

    Returns:
        The anisotropy, in (0, 1].
    """
    x = points.double()
    centred = x - x.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred)
    return float(eigenvalues[-1] / eigenvalues.sum())


def two_nn_dimension(
    points: Float[Tensor, "n d"], *, fit_fraction: float = 0.9, block: int = 1024
) -> float:
    """TwoNN's intrinsic dimension of ``points`` (see the module docstring).

    Args:
        points: one row per point; at least 3.
        fit_fraction: the share of the smallest ratios ``r₂/r₁`` fitted.
        block: rows whose distances are computed at once (memory: ``block × n``).

    Returns:
        The estimated dimension.
    """
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"fit_fraction must be in (0, 1], got {fit_fraction}")
    x = points.double()
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"TwoNN needs at least 3 points, got {n}")
    x = x - x.mean(0)
    x = x / x.norm(dim=1).mean()  # scale-free; only the duplicate threshold sees it
    first, second = _two_nearest(x, block)
    bad = first < _EPS
    ratio = torch.where(bad, torch.full_like(first, -1.0), second / first.clamp(min=_EPS))
    ratio = ratio.sort().values
    useless = int((ratio <= 1 + _EPS).sum())
    kept = ratio[useless:]
    m = kept.shape[0]
    empirical = torch.arange(1 + useless, m + 1 + useless, dtype=torch.float64, device=x.device)
    empirical = empirical / (m + useless)
    used = min(math.floor(m * fit_fraction), m - 1)
    log_ratio = torch.log(kept)[:used]
    log_tail = -torch.log(1 - empirical)[:used]
    return float((log_ratio * log_tail).sum() / (log_ratio * log_ratio).sum())


def _two_nearest(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Each row's distances to its nearest and second-nearest other rows.

    A block's squared distances come from one matrix product; the three nearest
    candidates are then measured exactly (a difference, not ``|a|² − 2a·b + |b|²``),
    so duplicates have distance 0, not the product's rounding error.
    """
    n = x.shape[0]
    squared = (x * x).sum(1)
    first, second = x.new_empty(n), x.new_empty(n)
    candidates = min(3, n - 1)
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=x.device)
        d2 = squared[rows, None] - 2 * x[rows] @ x.T + squared[None, :]
        d2[torch.arange(len(rows), device=x.device), rows] = math.inf
        nearest = d2.topk(candidates, dim=1, largest=False).indices  # [rows candidates]
        exact = (x[rows, None, :] - x[nearest]).norm(dim=-1).sort(dim=1).values
        first[rows], second[rows] = exact[:, 0], exact[:, 1]
    return first, second


def representation_geometry(
    model: Model,
    corpus: CorpusSource | Corpus = None,
    *,
    n_tokens: int = 2_048,
    fit_fraction: float = 0.9,
    dimension: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Geometry:
    """Anisotropy and intrinsic dimension of the residual stream at every depth.

    Nothing of its own is cached, so it takes no ``use_cache``: the measures are
    recomputed from the states each call, and only a sampled corpus is kept in the
    cache folder (by :meth:`rome_lens.core.corpus.Corpus.chunks`, as for every
    function that samples one).

    Args:
        model: any TransformerLens model.
        corpus: strings, a ``.txt``/``.jsonl`` path, a :class:`Corpus`, or ``None`` to
            sample text from the model.
        n_tokens: tokens (points) to read.
        fit_fraction: TwoNN's share of the smallest ratios.
        dimension: compute the intrinsic dimension (anisotropy alone is cheaper).
        seed: seeds a sampled corpus.
        batch_size: windows per forward pass.
        cache_dir: the rome_lens cache folder (where a sampled corpus is kept).
        progress: show progress bars.

    Returns:
        Both measures at every depth.
    """
    states = residual_states(
        model, corpus, n_tokens=n_tokens, seed=seed, batch_size=batch_size,
        cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    depths = range(states.states.shape[0])
    aniso = torch.tensor([anisotropy_of(states.states[d]) for d in depths])
    dims = torch.full((len(depths),), math.nan, dtype=torch.float64)
    if dimension:
        for d in tqdm(depths, desc="intrinsic dimension", disable=not progress):
            dims[d] = two_nn_dimension(states.states[d], fit_fraction=fit_fraction)
    return Geometry(
        anisotropy=aniso,
        intrinsic_dimension=dims,
        n_tokens=states.n_tokens,
        corpus=states.corpus,
        fit_fraction=fit_fraction,
        fingerprint=model_fingerprint(model),
    )


def anisotropy(
    model: Model, corpus: CorpusSource | Corpus = None, **kwargs: object
) -> Float[Tensor, " depth"]:
    """The anisotropy of the residual stream at every depth: the share of its centred
    covariance's variance along the top direction, ``λ_max / Σλ``.

    Args:
        model: any TransformerLens model.
        corpus: the texts, as :func:`representation_geometry` takes them.
        **kwargs: the other arguments of :func:`representation_geometry`.

    Returns:
        One value per depth, in (0, 1]: near 1 when the states share one direction.
    """
    return representation_geometry(model, corpus, dimension=False, **kwargs).anisotropy  # type: ignore[arg-type]


def intrinsic_dimension(
    model: Model, corpus: CorpusSource | Corpus = None, **kwargs: object
) -> Float[Tensor, " depth"]:
    """TwoNN's intrinsic dimension of the residual stream at every depth (Facco et al.
    2017), from the ratios of each state's second to first nearest-neighbour distance.

    Args:
        model: any TransformerLens model.
        corpus: the texts (see :func:`representation_geometry`).
        **kwargs: what else :func:`representation_geometry` takes, except ``dimension``.

    Returns:
        One dimension per depth; far below ``d_model`` for states on a thin manifold.
    """
    return representation_geometry(model, corpus, **kwargs).intrinsic_dimension  # type: ignore[arg-type]
