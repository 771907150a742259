"""How linear is each block? Layer linearity and token nonlinearity (arXiv 2405.12250, 2502.15007).

For consecutive residual streams X = h^l and Y = h^{l+1} over many tokens,
centre each column, divide each matrix by its Frobenius norm, fit A = X⁺Y by
least squares, and score ``1 − ‖XA − Y‖²_F``: the share of Y's (centred)
energy a linear map of X explains. Near 1 with the residual stream ("your
transformer is secretly linear"); much lower for the block's own contribution,
``Y − X`` in place of Y.

Token nonlinearity applies the maps A*_l fitted on a **reference corpus** of
many more tokens than ``d_model`` to each token of a text:
``‖A*_l x̂_i − ŷ_i‖₂``, where a hat is the state centred by the reference mean
and divided by the reference's root-mean-square row norm, so that the mean
squared error over the reference tokens is ``1 − linearity``. (Fitted on the
text alone, A would interpolate it exactly and give zeros.) The fitted maps
are cached per model fingerprint, corpus and token count, like key statistics.

>>> import tempfile, torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis.linearity import linearity_score, fit_linear_maps
>>> x = torch.randn(500, 8, dtype=torch.float64)
>>> round(linearity_score(x, x @ torch.randn(8, 8, dtype=torch.float64) + 3.0), 6)
1.0
>>> maps = fit_linear_maps(tiny_model(), n_tokens=400, cache_dir=tempfile.mkdtemp(),
...                        progress=False)
>>> tuple(maps.maps.shape), tuple(maps.linearity.shape)  # (layer, d, d), (layer,)
((3, 64, 64), (3,))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from rome_lens.analysis.states import States, residual_states, text_states
from rome_lens.core.backend import Model
from rome_lens.core.cache import cache_dir, cached
from rome_lens.core.corpus import Corpus, CorpusSource
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import to_host
from rome_lens.core.results import Result, layer_token_frame

__all__ = [
    "DEFAULT_REFERENCE_TOKENS",
    "LayerLinearity",
    "LinearMaps",
    "TokenNonlinearity",
    "fit_linear_maps",
    "layer_linearity",
    "linearity_score",
    "min_reference_tokens",
    "token_nonlinearity",
]

DEFAULT_REFERENCE_TOKENS = 5_000  # tokens the maps are fitted on by default


def min_reference_tokens(model: Model) -> int:
    """The fewest tokens a fit of ``d_model × d_model`` maps accepts: twice ``d_model``.

    Args:
        model: the model.

    Returns:
        ``2 × d_model``.
    """
    return 2 * model.cfg.d_model


@dataclass
class LayerLinearity(Result):
    """The linearity score of every block, with and without the residual stream."""

    kind = "layer_linearity"
    linearity: Float[Tensor, " layer"]  # 1 − ‖XA − Y‖², Y = h^{l+1}
    linearity_without_residual: Float[Tensor, " layer"]  # the same with Y − X for Y
    n_tokens: int  # tokens the scores are over
    corpus: str  # where the text came from
    fingerprint: str = ""  # model_fingerprint of the model

    def to_dataframe(self) -> pd.DataFrame:
        """One row per block."""
        return pd.DataFrame(
            {
                "layer": range(len(self.linearity)),
                "linearity": self.linearity.tolist(),
                "linearity_without_residual": self.linearity_without_residual.tolist(),
            }
        )


@dataclass
class LinearMaps(Result):
    """Each block's best linear map between normalised residual streams, fitted on a corpus."""

    kind = "linear_maps"
    maps: Float[Tensor, "layer d_model d_model"]  # A*_l, from normalised h^l to normalised h^{l+1}
    means: Float[Tensor, "depth d_model"]  # mean state at each depth over the reference
    scales: Float[Tensor, " depth"]  # root-mean-square norm of the centred states
    linearity: Float[Tensor, " layer"]  # the fit's score on the reference
    linearity_without_residual: Float[Tensor, " layer"]  # the same for the block's contribution
    n_tokens: int  # reference tokens
    corpus: str  # where the reference text came from
    fingerprint: str  # model_fingerprint of the model

    def to_dataframe(self) -> pd.DataFrame:
        """One row per block: the scores on the reference corpus."""
        return self.layer_linearity().to_dataframe()

    def layer_linearity(self) -> LayerLinearity:
        """The reference corpus's layer linearity."""
        return LayerLinearity(
            self.linearity,
            self.linearity_without_residual,
            self.n_tokens,
            self.corpus,
            self.fingerprint,
        )

    def errors(self, states: Float[Tensor, "depth token d_model"]) -> Float[Tensor, "layer token"]:
        """``‖A*_l x̂_i − ŷ_i‖`` of each token at each block (see the module docstring).

        Args:
            states: residual streams at every depth, as :func:`text_states` gives them.

        Returns:
            The error of every (block, token).
        """
        means, scales, maps = (t.to(states.device) for t in (self.means, self.scales, self.maps))
        normalised = (states.double() - means[:, None]) / scales[:, None, None]
        predicted = torch.einsum("ltd,lde->lte", normalised[:-1], maps.double())
        return (predicted - normalised[1:]).norm(dim=-1).float()


@dataclass
class TokenNonlinearity(Result):
    """How far each token's step through each block is from the block's best linear map."""

    kind = "token_nonlinearity"
    text: str  # the text read
    str_tokens: list[str]  # its tokens (BOS excluded)
    errors: Float[Tensor, "layer token"]  # ‖A*_l x̂_i − ŷ_i‖ (reference mean square: 1 − linearity)
    reference_linearity: Float[Tensor, " layer"]  # each block's score on the reference corpus
    reference: str  # the reference corpus the maps were fitted on
    fingerprint: str = ""  # model_fingerprint of the model

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (layer, token)."""
        return layer_token_frame(self.str_tokens, nonlinearity=self.errors)


def linearity_score(x: Float[Tensor, "n d"], y: Float[Tensor, "n d"]) -> float:
    """``1 − ‖XA − Y‖²_F`` for centred, Frobenius-normalised X and Y, A by least squares.

    Args:
        x: states before the block, one row per token.
        y: states after it.

    Returns:
        The score, 1 for an exactly linear (affine) map; 1 also when Y is constant.
    """
    _, _, score = _fit(x.double(), y.double())
    return score


def layer_linearity(
    model: Model, corpus: CorpusSource | Corpus = None, **kwargs: Any
) -> LayerLinearity:
    """The linearity of every block over the tokens of a corpus (or of one text):
    :func:`fit_linear_maps`, summarised.

    Args:
        model: any TransformerLens model.
        corpus: strings (one text is a list of one), a ``.txt``/``.jsonl`` path, a
            :class:`Corpus`, or ``None`` to sample text from the model.
        **kwargs: the other arguments of :func:`fit_linear_maps` (``n_tokens``,
            ``seed``, ``batch_size``, ``cache_dir``, ``use_cache``, ``progress``).

    Returns:
        Scores with and without the residual stream, one per block.
    """
    return fit_linear_maps(model, corpus, **kwargs).layer_linearity()


def fit_linear_maps(
    model: Model,
    corpus: CorpusSource | Corpus = None,
    *,
    n_tokens: int | None = DEFAULT_REFERENCE_TOKENS,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> LinearMaps:
    """Fit every block's linear map on a reference corpus (cached per model and corpus).

    Args:
        model: any TransformerLens model.
        corpus: strings, a ``.txt``/``.jsonl`` path, a :class:`Corpus`, or ``None`` to
            sample text from the model.
        n_tokens: how many reference tokens (``None``: all of a given corpus); at
            least :func:`min_reference_tokens`.
        seed: seeds a sampled corpus.
        batch_size: windows per forward pass.
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cache.
        progress: show progress bars.

    Returns:
        The maps, the reference means and scales, and the reference's scores.

    Raises:
        ValueError: the corpus has fewer tokens than a stable fit needs.
    """
    source = Corpus.read(corpus)
    needed = min_reference_tokens(model)
    if n_tokens is not None and n_tokens < needed:
        raise ValueError(_too_few(n_tokens, needed, model))
    fingerprint = model_fingerprint(model)

    def fit() -> LinearMaps:
        states = residual_states(
            model, source, n_tokens=n_tokens, seed=seed, batch_size=batch_size,
            cache_dir=cache_dir, progress=progress,
        )  # fmt: skip
        if states.n_tokens < needed:
            raise ValueError(_too_few(states.n_tokens, needed, model))
        return _fit_states(states, fingerprint)

    return cached(
        cache_dir_for(cache_dir) / f"maps-{fingerprint}-{source.id(seed)}-{n_tokens}.st",
        fit,
        load=lambda path: LinearMaps.load(path, model=model),
        save=lambda path, maps: maps.save(path),
        use_cache=use_cache,
    )


def token_nonlinearity(
    model: Model,
    text: str,
    *,
    maps: LinearMaps | None = None,
    reference: CorpusSource | Corpus = None,
    n_reference_tokens: int = DEFAULT_REFERENCE_TOKENS,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> TokenNonlinearity:
    """How nonlinear each block is for each token of ``text``.

    Args:
        model: any TransformerLens model.
        text: the text (read in windows of ``n_ctx`` tokens if longer).
        maps: maps fitted by :func:`fit_linear_maps`; ``None`` fits (or loads) them
            on ``reference``.
        reference: the reference corpus (``None``: text sampled from the model).
        n_reference_tokens: reference tokens, when fitting.
        seed: seeds a sampled reference corpus, when fitting.
        batch_size: windows per forward pass, when fitting.
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cached fit, when fitting.
        progress: show progress bars.

    Returns:
        The error of every (block, token).
    """
    if maps is None:
        maps = fit_linear_maps(
            model, reference, n_tokens=n_reference_tokens, seed=seed, batch_size=batch_size,
            cache_dir=cache_dir, use_cache=use_cache, progress=progress,
        )  # fmt: skip
    else:
        maps.check_model(model)
    states = text_states(model, text)
    return TokenNonlinearity(
        text=text,
        str_tokens=[model.to_single_str_token(t) for t in states.tokens.tolist()],
        errors=to_host(maps.errors(states.states)),  # one move, to be shown
        reference_linearity=maps.linearity,
        reference=f"{maps.corpus} ({maps.n_tokens:,} tokens)",
        fingerprint=maps.fingerprint,
    )


def cache_dir_for(root: str | os.PathLike[str] | None) -> Path:
    """The folder the Microscope caches into, inside the rome_lens cache.

    Args:
        root: the rome_lens cache folder (default: see :mod:`rome_lens.core.cache`).

    Returns:
        The folder.
    """
    return cache_dir(root) / "microscope"


def _fit_states(states: States, fingerprint: str) -> LinearMaps:
    data = states.states.double()  # [depth token d]
    means = data.mean(dim=1)
    centred = data - means[:, None]
    scales = centred.norm(dim=(1, 2)) / centred.shape[1] ** 0.5
    maps, scores, without = [], [], []
    for layer in range(data.shape[0] - 1):
        x, y = data[layer], data[layer + 1]
        a, _, score = _fit(x, y)
        maps.append(a)
        scores.append(score)
        without.append(_fit(x, y - x)[2])
    return LinearMaps(
        maps=torch.stack(maps).float(),
        means=means,
        scales=scales,
        linearity=torch.tensor(scores, dtype=torch.float64),
        linearity_without_residual=torch.tensor(without, dtype=torch.float64),
        n_tokens=states.n_tokens,
        corpus=states.corpus,
        fingerprint=fingerprint,
    )


def _fit(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """A = X⁺Y on centred, normalised X and Y (float64), the residual, and the score."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    x_norm, y_norm = xc.norm(), yc.norm()
    if float(y_norm) == 0.0:
        return x.new_zeros(x.shape[1], y.shape[1]), yc, 1.0
    xn, yn = xc / x_norm, yc / y_norm
    if xn.device.type == "cpu":
        a = torch.linalg.lstsq(xn, yn, driver="gelsd").solution
    else:  # CUDA's lstsq has only "gels", which needs X of full rank; this is gelsd's answer
        a = torch.linalg.pinv(xn) @ yn
    residual = xn @ a - yn
    return a, residual, float(1 - residual.square().sum())


def _too_few(found: int, needed: int, model: Model) -> str:
    return (
        f"the reference corpus has {found:,} tokens, but fitting {model.cfg.d_model}×"
        f"{model.cfg.d_model} linear maps stably needs at least {needed:,} "
        f"(2 × d_model, d_model = {model.cfg.d_model}); pass a larger corpus or n_tokens"
    )
