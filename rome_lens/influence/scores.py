"""Influence scores: which training texts, had the model trained on them more, would most
raise the probability of a completion (Grosse et al. 2023, Eqs. 24–31).

The query function is ``f = log p(completion | prompt)``, summed over the
completion's tokens. Its gradient ``∇f`` is preconditioned once per query,
``P = (G + λI)⁻¹ ∇f`` with ``G`` the factors' approximation of the curvature:

* ``"ekfac"``: in the Kronecker eigenbasis, divide by the refitted Λ;
* ``"kfac"``: the same with ``Λ_A ⊗ Λ_S``;
* ``"diagonal"``: divide entry by entry by ``E[G²]``;
* ``"identity"``: no preconditioning (the plain gradient dot product);

with damping ``λ = damping × mean(Λ)`` (0.1, as the paper). A training text's
score is ``⟨P, ∇ log p(text)⟩``, summed over the weights: positive when
training on the text would raise ``f``. It is never materialised as a full
gradient: each weight's per-text gradient ``Σ_t ā_t g_tᵀ`` is formed and
dotted with every query's ``P`` for one batch of texts at a time. The split by
layer (Eq. 30) is kept for every text, the split by token (Eq. 31,
``Σ_w ā_tᵀ P g_t``) for the top texts; a text whose token scores are
concentrated (``‖c‖₂ / ‖c‖₁ > 2/3``) is flagged, as the paper does, as likely
spurious. How texts are scored travels as one
:class:`~rome_lens.influence.settings.ScoreSettings`; the run options
(``batch_size``, ``progress``, ``distributed``) stay keywords. With
``query_rank``, ``P`` is cut to that rank (the paper's 32) and kept as factors
``L Rᵀ``: a text then costs ``Σ_t (ā_tᵀ L)(Rᵀ g_t)`` per query and weight,
and neither ``P`` nor the text's gradient is ever formed.
With ``normalize=True`` every score is divided by the norms of both vectors,
``‖P‖`` and ``‖∇ log p(chunk)‖`` over the scored weights, chunk by chunk (a
text longer than one window sums its chunks' scores): with ``"identity"`` this
is the cosine of the two gradients, the unit-normalised dot product of TracIn
and TrackStar, which stops long or high-loss texts from outranking the rest.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence import ScoreSettings, fit_influence_factors, influence
>>> model = tiny_model()
>>> texts = ["The Eiffel Tower is in Paris.", "The Louvre is a museum.", "Berlin is in Germany."]
>>> factors = fit_influence_factors(model, texts * 4, layers=[1, 2], n_tokens=200,
...                                 cache_dir=tempfile.mkdtemp(), progress=False)
>>> result = influence(model, factors, "The Eiffel Tower is in", " Paris", texts, top_k=2,
...                    progress=False)
>>> result.to_dataframe()[["rank", "text_id"]].shape, result.text_ids[0]  # the fact itself first
((2, 2), 0)
>>> cosine = influence(model, factors, "The Eiffel Tower is in", " Paris", texts, top_k=2,
...                    settings=ScoreSettings(strategy="identity", normalize=True),
...                    progress=False)
>>> cosine.strategy, cosine.normalized, bool(cosine.scores.abs().max() <= 1)
('identity', True, True)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource, bos_tokens
from rome_lens.core.distributed import Split, all_reduce_sum, is_main, shard
from rome_lens.core.precision import model_device, to_host
from rome_lens.core.results import Result
from rome_lens.core.runtime import frozen, linear_layout, pad
from rome_lens.core.tokens import prompt_tokens, target_token_ids
from rome_lens.influence.factors import (
    STRATEGIES,
    InfluenceFactors,
    Strategy,
    gradient_squared_norms,
    sequence_gradients,
    text_gradients,
)
from rome_lens.influence.index import EigenQueries, GradientIndex, index_scan
from rome_lens.influence.prefilter import bm25_top
from rome_lens.influence.settings import ScoreSettings, settings_from_keywords
from rome_lens.influence.weights import MLPWeight, mlp_weights

__all__ = [
    "SPURIOUS_RATIO",
    "InfluenceResult",
    "ScoreSettings",
    "TextScores",
    "influence",
    "influence_many",
    "low_rank",
    "preconditioned_gradients",
    "query_gradients",
    "score_texts",
]

Scanned = Tensor | tuple[Tensor, Tensor]  # [query d_in d_out], or low-rank factors (L, R)
Preconditioned = Scanned | EigenQueries  # or X in the eigenbasis (scoring against an index)
_TOKEN_FORM_LIMIT = 32  # positions × queries up to which the token form is the faster
_QUERY_GROUP = 16  # queries whose dense gradients are held at once when cutting them to low rank
SPURIOUS_RATIO = 2 / 3  # token scores with ‖c‖₂/‖c‖₁ above this are concentrated (Grosse et al.)


@dataclass
class InfluenceResult(Result):
    """The training texts that most raise a completion's probability, with their splits."""

    kind = "influence"
    prompt: str  # the query's prompt
    completion: str  # its completion
    strategy: str  # the curvature approximation
    layers: list[int]  # the MLP layers whose weights were scored
    text_ids: list[int]  # the top texts' indices in the corpus, best first
    texts: list[str]  # the top texts
    scores: Float[Tensor, " top"]  # their influence scores
    layer_scores: Float[Tensor, "top layer"]  # each score split by layer (Eq. 30)
    token_scores: list[Tensor]  # each top text's score split by token (Eq. 31, never normalised)
    str_tokens: list[list[str]]  # each top text's tokens (BOS excluded)
    all_ids: list[int]  # every text scored (all, or those the prefilter kept)
    all_scores: Float[Tensor, " scanned"]  # their scores
    fingerprint: str = ""  # model_fingerprint of the model
    seconds: float = 0.0  # the scan's time
    normalized: bool = False  # scores divided by both gradients' norms (cosine for "identity")

    @property
    def concentration(self) -> list[float]:
        """``‖c‖₂ / ‖c‖₁`` of each top text's token scores."""
        return [
            float(c.norm() / c.abs().sum()) if float(c.abs().sum()) > 0 else 0.0
            for c in self.token_scores
        ]

    @property
    def spurious(self) -> list[bool]:
        """Whether each top text's score comes from a few tokens (ratio above 2/3)."""
        return [ratio > SPURIOUS_RATIO for ratio in self.concentration]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per top text: rank, id, text, score, per-layer scores, concentration."""
        rows = []
        for i, text_id in enumerate(self.text_ids):
            row = {"rank": i + 1, "text_id": text_id, "text": self.texts[i]}
            row |= {"score": float(self.scores[i]), "spurious": self.spurious[i]}
            row["concentration"] = self.concentration[i]
            row |= {
                f"layer_{layer}": float(self.layer_scores[i, j])
                for j, layer in enumerate(self.layers)
            }
            rows.append(row)
        return pd.DataFrame(rows)


def influence(
    model: Model,
    factors: InfluenceFactors,
    prompt: str,
    completion: str,
    corpus: CorpusSource | Corpus,
    *,
    top_k: int = 20,
    settings: ScoreSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
    index: GradientIndex | str | os.PathLike[str] | None = None,
    **deprecated: Any,
) -> InfluenceResult:
    """The ``top_k`` texts of ``corpus`` that most raise ``p(completion | prompt)``.

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`.
        prompt: the query's prompt.
        completion: its completion (a leading space is added as the tokenizer expects).
        corpus: the training texts: strings, a ``.txt``/``.jsonl`` path or a :class:`Corpus`.
        top_k: how many texts to return.
        settings: how the texts are scored: layers, weights, strategy, damping,
            query rank, normalisation, prefilter (``None``: ``ScoreSettings()``).
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group
            (``None``: when one is initialised).
        index: score against a gradient index of ``corpus`` (a
            :class:`~rome_lens.influence.index.GradientIndex` or its folder) instead of
            scanning it: matrix products, no pass over the texts
            (:func:`~rome_lens.influence.index.build_gradient_index`). Below full rank
            its scores are those of the projected gradients, not the scan's (see
            docs/influence.md for how far they agree); the token scores stay exact.
        deprecated: the fields of ``settings`` as keywords (``damping=0.1``), as before
            ``ScoreSettings``; accepted for one release, with a ``DeprecationWarning``.

    Returns:
        The top texts, their scores, and the splits by layer and by token.
    """
    settings = settings_from_keywords(settings, deprecated, "influence")
    (result,) = influence_many(
        model, factors, [(prompt, completion)], corpus, top_k=top_k, settings=settings,
        batch_size=batch_size, progress=progress, distributed=distributed, index=index,
    )  # fmt: skip
    return result


def influence_many(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    corpus: CorpusSource | Corpus,
    *,
    top_k: int = 20,
    settings: ScoreSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
    index: GradientIndex | str | os.PathLike[str] | None = None,
    **deprecated: Any,
) -> list[InfluenceResult]:
    """:func:`influence` for several ``(prompt, completion)`` queries in one pass over the texts.

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`.
        queries: ``(prompt, completion)`` pairs.
        corpus: the training texts.
        top_k: how many texts to return per query.
        settings: how the texts are scored (``None``: ``ScoreSettings()``); its
            ``prefilter`` keeps the union of each query's BM25 top texts.
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group and merge
            (``None``: when one is initialised; see :mod:`rome_lens.core.distributed`).
        index: score against a gradient index of ``corpus`` (or its folder) instead of
            scanning it; the index's ranks split its shards as they split texts.
        deprecated: the fields of ``settings`` as keywords, accepted for one release
            with a ``DeprecationWarning``.

    Returns:
        One result per query, in order.
    """
    started = time.perf_counter()
    settings = settings_from_keywords(settings, deprecated, "influence_many")
    _check_queries(queries, top_k)
    scoring = _scoring(model, factors, settings)
    texts = _read_texts(corpus)
    opened = _opened_index(index, model, factors, texts, scoring)
    ids = _prefiltered(texts, queries, settings.prefilter)
    split = Split.of(distributed)
    preconditioned: Mapping[str, Preconditioned]
    if opened is None:
        scanned = _preconditioned_queries(model, factors, scoring, queries)
        chunks = _chunks(model, texts, ids)
        local, squared_norms, owners = _scan(
            model, scoring, chunks, scanned, batch_size, progress, split
        )
        preconditioned = scanned
    else:
        preconditioned = _index_queries(model, factors, scoring, queries)
        local, squared_norms, owners = index_scan(
            model, factors, opened, texts, scoring.weights, scoring.layers, preconditioned, split
        )
    if settings.normalize:
        local = _normalized(local, squared_norms, preconditioned)
    totals = _text_totals(local, owners, len(ids), split)
    orders = _top_orders(totals, top_k)
    tops = _top_layer_scores(local, owners, orders, len(ids), split)
    ranking = _Ranking(ids, totals, orders, tops)
    return [
        _query_result(model, factors, query, q, texts, scoring, preconditioned, ranking, started)
        for q, query in enumerate(queries)
    ]


class _Scoring(NamedTuple):
    """What a scan scores: the settings, the curvature approximation and the weights."""

    settings: ScoreSettings  # as given
    strategy: str  # the settings' strategy, or the factors'
    layers: list[int]  # the MLP layers scored, in the factors' order when not chosen
    weights: list[MLPWeight]  # their weights that are scored


class _Ranking(NamedTuple):
    """Every scanned text's total score, and each query's top texts with their layer split."""

    ids: list[int]  # the scanned texts' indices in the corpus
    totals: Float[Tensor, "scanned query"]  # every scanned text's score for every query
    orders: list[list[int]]  # each query's top texts, as rows of totals, best first
    tops: Float[Tensor, "query top layer"]  # their scores split by layer


def _check_queries(queries: Sequence[tuple[str, str]], top_k: int) -> None:
    """Raise, naming the bad value, unless every query is a usable ``(prompt, completion)``."""
    if not queries:
        raise ValueError("name at least one (prompt, completion) query")
    for prompt, completion in queries:
        if not isinstance(completion, str) or not completion.strip():
            raise ValueError(f"completion must be a non-empty string, got {completion!r}")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")


def _checked_strategy(model: Model, factors: InfluenceFactors, strategy: str | None) -> str:
    """The strategy to precondition with (``None``: the factors'), once ``factors`` are known
    to be fitted on ``model`` and to serve it."""
    if not isinstance(factors, InfluenceFactors):
        raise TypeError(f"factors must be InfluenceFactors, got {type(factors).__name__}")
    factors.check_model(model)
    strategy = strategy or factors.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    factors.eigenvalues(factors.names[0], strategy)  # raises if the factors lack it
    return strategy


def _scoring(model: Model, factors: InfluenceFactors, settings: ScoreSettings) -> _Scoring:
    """The strategy, layers and weights ``settings`` score, checked against the factors."""
    strategy = _checked_strategy(model, factors, settings.strategy)
    layers = list(factors.layers) if settings.layers is None else list(settings.layers)
    missing = [layer for layer in layers if layer not in factors.layers]
    if missing or not layers:
        raise ValueError(f"the factors cover layers {factors.layers}, not {missing or layers}")
    fitted = sorted({name.rsplit(".", 1)[-1] for name in factors.names})
    weights = mlp_weights(model, layers, fitted if settings.weights is None else settings.weights)
    unfitted = [w.name for w in weights if w.name not in factors.names]
    if unfitted:
        raise ValueError(f"the factors hold {factors.names}, not {unfitted}: fit them too")
    return _Scoring(settings, strategy, layers, weights)


def _read_texts(corpus: CorpusSource | Corpus) -> Corpus:
    """The texts to score, read once; a sampled or empty corpus has none to score."""
    texts = Corpus.read(corpus)
    if texts.documents is None or not texts.documents:
        raise ValueError("corpus must hold texts to score, got an empty or sampled corpus")
    return texts


def _opened_index(
    index: GradientIndex | str | os.PathLike[str] | None,
    model: Model,
    factors: InfluenceFactors,
    texts: Corpus,
    scoring: _Scoring,
) -> GradientIndex | None:
    """The index to score against, checked against the model, factors, corpus and settings."""
    if index is None:
        return None
    opened = index if isinstance(index, GradientIndex) else GradientIndex.open(index)
    opened.check(model, factors, texts)
    settings = scoring.settings
    built = opened.settings
    if built.basis == "whitened" and (built.strategy, built.damping) != (
        scoring.strategy, settings.damping
    ):  # fmt: skip
        raise ValueError(
            f"the index is whitened for strategy={built.strategy!r}, damping={built.damping}; "
            f"the query asks for strategy={scoring.strategy!r}, damping={settings.damping}"
        )
    if settings.prefilter is not None:
        raise ValueError(
            f"settings.prefilter={settings.prefilter} cannot be used with an index, which scores "
            "every text at once: drop one of them"
        )
    return opened


def _prefiltered(
    texts: Corpus, queries: Sequence[tuple[str, str]], prefilter: int | None
) -> list[int]:
    """The texts worth a gradient pass: every one, or the union of the queries' BM25 tops."""
    documents = list(texts.documents or ())
    if prefilter is None:
        return list(range(len(documents)))
    kept = bm25_top(documents, [f"{p} {c.strip()}" for p, c in queries], prefilter)
    return sorted({i for row in kept for i in row})


def _chunks(model: Model, texts: Corpus, ids: list[int]) -> list[Chunk]:
    """The texts ``ids`` in windows of the model's context; a chunk knows its text's row."""
    documents = texts.documents or ()
    chosen = Corpus(tuple(documents[i] for i in ids), texts.name)
    return chosen.chunks(model, max_length=model.cfg.n_ctx)


def _normalized(
    local: Float[Tensor, "mine query layer"],
    squared_norms: Float[Tensor, " mine"],
    preconditioned: Mapping[str, Preconditioned],
) -> Float[Tensor, "mine query layer"]:
    """Chunk scores divided by both gradients' norms (in place): the cosine for identity."""
    local /= squared_norms.clamp_min(1e-30).sqrt()[:, None, None]
    local /= _query_norms(preconditioned).to(local.device)[None, :, None]
    return local


def _text_totals(
    local: Float[Tensor, "mine query layer"], owners: Int[Tensor, " mine"], n_texts: int,
    split: Split,
) -> Float[Tensor, "text query"]:  # fmt: skip
    """Every text's score for every query: its chunks' and layers' summed, on every rank."""
    totals = torch.zeros(n_texts, local.shape[1], dtype=torch.float64)
    totals.index_add_(0, owners, local.sum(-1))
    return all_reduce_sum(totals, split)


def _top_orders(totals: Float[Tensor, "text query"], top_k: int) -> list[list[int]]:
    """Each query's ``top_k`` texts, as rows of ``totals``, best first."""
    return [totals[:, q].argsort(descending=True)[:top_k].tolist() for q in range(totals.shape[1])]


def _top_layer_scores(
    local: Float[Tensor, "mine query layer"], owners: Int[Tensor, " mine"],
    orders: list[list[int]], n_texts: int, split: Split,
) -> Float[Tensor, "query top layer"]:  # fmt: skip
    """The top texts' scores split by layer, gathered from the ranks that hold them."""
    tops = torch.zeros(len(orders), len(orders[0]), local.shape[2], dtype=torch.float64)
    for q, order in enumerate(orders):
        place = torch.full((n_texts,), -1, dtype=torch.long)
        place[order] = torch.arange(len(order))
        rank_of = place[owners]
        held = rank_of >= 0
        tops[q].index_add_(0, rank_of[held], local[held, q])
    return all_reduce_sum(tops, split)


def _query_result(
    model: Model,
    factors: InfluenceFactors,
    query: tuple[str, str],
    q: int,
    texts: Corpus,
    scoring: _Scoring,
    preconditioned: Mapping[str, Preconditioned],
    ranking: _Ranking,
    started: float,
) -> InfluenceResult:
    """Query ``q``'s result: its top texts, their splits by layer and by token."""
    documents = texts.documents or ()
    order = ranking.orders[q]
    top_ids = [ranking.ids[i] for i in order]
    token_scores, str_tokens = _token_scores(
        model,
        scoring.weights,
        [documents[i] for i in top_ids],
        {n: _one(p, q) for n, p in preconditioned.items()},
    )
    return InfluenceResult(
        prompt=query[0],
        completion=query[1],
        strategy=scoring.strategy,
        layers=scoring.layers,
        text_ids=top_ids,
        texts=[documents[i] for i in top_ids],
        scores=ranking.totals[order, q],
        layer_scores=ranking.tops[q],
        token_scores=token_scores,
        str_tokens=str_tokens,
        all_ids=ranking.ids,
        all_scores=ranking.totals[:, q],
        fingerprint=factors.fingerprint,
        seconds=time.perf_counter() - started,
        normalized=scoring.settings.normalize,
    )


class TextScores(NamedTuple):
    """Every text's score for every query under several strategies, and the norms to
    normalise them (:func:`score_texts`)."""

    scores: dict[str, Float[Tensor, "text query"]]  # by strategy
    text_norms: Float[Tensor, " text"]  # ‖∇ log p(text)‖ (chunks' squares summed)
    query_norms: dict[str, Float[Tensor, " query"]]  # ‖P‖ of each query, by strategy


def score_texts(
    model: Model,
    factors: InfluenceFactors | Sequence[InfluenceFactors],
    queries: Sequence[tuple[str, str]],
    corpus: CorpusSource | Corpus,
    *,
    strategies: Sequence[Strategy] = ("ekfac",),
    settings: ScoreSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
    **deprecated: Any,
) -> TextScores:
    """Every text's score under several curvature approximations, from one pass over the texts.

    Comparing strategies costs one forward and backward pass per text, not one
    per strategy: the queries of every strategy are scored together. Dividing
    a strategy's scores by ``text_norms[:, None] * query_norms[strategy][None]``
    gives what ``ScoreSettings(normalize=True)`` gives (for ``"identity"``, the
    gradients' cosine).

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`, or several
            fits of the same weights (an EK-FAC fit and a diagonal one): each strategy
            uses the first that supports it.
        queries: ``(prompt, completion)`` pairs.
        corpus: the training texts.
        strategies: the curvature approximations to score with.
        settings: the layers, weights, damping and query rank (``None``:
            ``ScoreSettings()``); its strategy, normalisation and prefilter must stay
            unset, as ``strategies``, the norms and every text's score replace them.
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group (``None``:
            when one is initialised).
        deprecated: ``damping`` or ``query_rank`` as keywords, accepted for one release
            with a ``DeprecationWarning``.

    Returns:
        The scores ``[text query]`` by strategy, and the norms.
    """
    settings = settings_from_keywords(
        settings, deprecated, "score_texts", accepted=("damping", "query_rank")
    )
    _check_text_settings(settings)
    _check_queries(queries, 1)
    chosen = _factors_by_strategy(model, factors, strategies)
    texts = _read_texts(corpus)
    scoring = _scoring(model, chosen[strategies[0]], settings)
    each = {
        strategy: _preconditioned_queries(model, fit, scoring._replace(strategy=strategy), queries)
        for strategy, fit in chosen.items()
    }
    joined = {w.name: _join([each[s][w.name] for s in strategies]) for w in scoring.weights}
    chunks = texts.chunks(model, max_length=model.cfg.n_ctx)
    split = Split.of(distributed)
    local, squared, owners = _scan(model, scoring, chunks, joined, batch_size, progress, split)
    n_texts = len(texts.documents or ())
    totals = _text_totals(local, owners, n_texts, split)
    norms = torch.zeros(n_texts, dtype=torch.float64).index_add_(0, owners, squared)
    parts = totals.split(len(queries), dim=1)
    return TextScores(
        scores=dict(zip(strategies, parts, strict=True)),
        text_norms=all_reduce_sum(norms, split).sqrt(),
        query_norms={s: to_host(_query_norms(each[s])) for s in strategies},  # with the scores
    )


def _check_text_settings(settings: ScoreSettings) -> None:
    """Raise if ``settings`` ask :func:`score_texts` for what it gives another way."""
    replaced = {
        "strategy": "strategies=",
        "normalize": "its text_norms and query_norms",
        "prefilter": "scoring every text",
    }
    for name, instead in replaced.items():
        value = getattr(settings, name)
        if value not in (None, False):
            raise ValueError(
                f"score_texts takes no settings.{name} (got {value!r}): it uses {instead}"
            )


def _factors_by_strategy(
    model: Model,
    factors: InfluenceFactors | Sequence[InfluenceFactors],
    strategies: Sequence[Strategy],
) -> dict[str, InfluenceFactors]:
    """For each strategy, the first of the fits that supports it (all cover the same weights)."""
    fits = [factors] if isinstance(factors, InfluenceFactors) else list(factors)
    if not strategies or not fits:
        raise ValueError("name at least one strategy and one set of factors")
    if len({(tuple(f.layers), tuple(f.names)) for f in fits}) > 1:
        raise ValueError(
            "the factors must cover the same weights, got " + ", ".join(map(repr, fits))
        )
    chosen: dict[str, InfluenceFactors] = {}
    for strategy in strategies:
        usable = [f for f in fits if strategy in STRATEGIES and f.supports(strategy)]
        chosen[strategy] = usable[0] if usable else fits[0]
        _checked_strategy(model, chosen[strategy], strategy)
    return chosen


def _join(pieces: list[Scanned]) -> Scanned:
    """Several batches of queries (groups, or strategies) as one."""
    if isinstance(pieces[0], tuple):
        return (torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))
    return torch.cat(pieces)  # type: ignore[arg-type]


def query_gradients(
    model: Model, weights: Sequence[MLPWeight], queries: Sequence[tuple[str, str]]
) -> dict[str, Float[Tensor, "query d_in d_out"]]:
    """Each query's ``∇ log p(completion | prompt)`` for every weight (non-BOS tokens).

    Args:
        model: the model.
        weights: the weights.
        queries: ``(prompt, completion)`` pairs.

    Returns:
        ``{weight: [query d_in d_out]}``.
    """
    found = _query_factors(model, weights, queries)
    return {name: torch.einsum("bti,bto->bio", a, g) for name, (a, g) in found.items()}


def _query_factors(
    model: Model, weights: Sequence[MLPWeight], queries: Sequence[tuple[str, str]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each query's gradient as its factors, ``∇f = Σ_t ā_t g_tᵀ``: ``{weight: (ā, g)}``,
    ``[query pos d_in]`` and ``[query pos d_out]``."""
    sequences, reads, answers = [], [], []
    for q, (prompt, completion) in enumerate(queries):
        head = prompt_tokens(model, prompt)[0]
        answer = target_token_ids(model, prompt, completion)
        full = torch.cat([head, torch.tensor(answer, device=head.device)])
        if len(full) > model.cfg.n_ctx:
            raise ValueError(
                f"prompt and completion have {len(full)} tokens, more than the model's "
                f"n_ctx={model.cfg.n_ctx}: shorten them"
            )
        sequences.append(full)
        reads += [(q, p) for p in range(len(head) - 1, len(full) - 1)]
        answers += answer
    tokens, mask = pad(sequences, 0, "right")
    counted = mask.bool()
    skip = len(bos_tokens(model))
    counted[:, :skip] = False
    rows = torch.tensor([r for r, _ in reads])
    positions = torch.tensor([p for _, p in reads])
    targets = torch.tensor(answers)

    def log_likelihood(logits: Tensor) -> Tensor:
        log_probs = logits[rows, positions].float().log_softmax(-1)
        return log_probs.gather(-1, targets[:, None].to(log_probs.device)).sum()

    with frozen(model), linear_layout(model):
        return sequence_gradients(model, tokens, counted, weights, log_likelihood)


def preconditioned_gradients(
    factors: InfluenceFactors,
    gradients: dict[str, Tensor],
    strategy: str,
    damping: float = 0.1,
    query_rank: int | None = None,
) -> dict[str, Float[Tensor, "query d_in d_out"]]:
    """``(G + λI)⁻¹ ∇f`` for every weight and query (see the module docstring).

    Args:
        factors: the fitted factors.
        gradients: ``{weight: [query d_in d_out]}`` query gradients.
        strategy: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        damping: λ as a share of the mean eigenvalue.
        query_rank: cut each result to this rank (``None``: full rank).

    Returns:
        ``{weight: [query d_in d_out]}``.
    """
    out = {}
    for name, gradient in gradients.items():
        p = _precondition(factors, name, gradient, strategy, damping)
        if query_rank is not None:
            left, right = low_rank(p, query_rank)
            p = left @ right.mT
        out[name] = p
    return out


def low_rank(
    matrices: Float[Tensor, "query d_in d_out"], rank: int
) -> tuple[Float[Tensor, "query d_in rank"], Float[Tensor, "query d_out rank"]]:
    """The best rank-``rank`` factors ``L Rᵀ`` of each matrix (the truncated SVD's product).

    The top singular vectors of the narrow side come from the eigenvectors of the
    smaller Gram matrix, in float64: ``M ≈ (M V) Vᵀ`` with ``V`` the top
    eigenvectors of ``MᵀM`` (or ``U (Mᵀ U)ᵀ`` from ``M Mᵀ``). On 16 matrices of
    ``W_out``'s shape in the default model this is 1.5× faster than a full SVD,
    and the products agree to 3e-6 (``bench/bench_influence.py --only lowrank``).

    Args:
        matrices: ``[query d_in d_out]``.
        rank: the rank kept.

    Returns:
        ``(L, R)``.
    """
    m = matrices.double()
    tall = m.shape[-2] >= m.shape[-1]
    gram = m.mT @ m if tall else m @ m.mT  # [query small small]
    top = torch.linalg.eigh(gram).eigenvectors[..., -rank:].flip(-1)  # [query small rank]
    left, right = (m @ top, top) if tall else (top, m.mT @ top)
    return left.to(matrices.dtype), right.to(matrices.dtype)


def _precondition(
    factors: InfluenceFactors, name: str, gradient: Tensor, strategy: str, damping: float
) -> Tensor:
    if strategy == "identity":
        return gradient
    device = gradient.device  # one weight's factors on the device at a time
    values = factors.eigenvalues(name, strategy).to(device)
    if strategy == "diagonal":
        return gradient / (values + damping * values.mean())
    q_a, q_s = factors.input_vectors[name].to(device), factors.output_vectors[name].to(device)
    rotated = q_a.T @ gradient @ q_s
    return q_a @ (rotated / (values + damping * values.mean())) @ q_s.T


def _preconditioned_queries(
    model: Model, factors: InfluenceFactors, scoring: _Scoring, queries: Sequence[tuple[str, str]]
) -> dict[str, Scanned]:
    """Every query's preconditioned gradient, dense or as rank-``query_rank`` factors.

    With ``query_rank`` the queries go through in groups of ``_QUERY_GROUP``, each
    cut to its factors before the next, so that memory holds
    ``query × rank × (d_in + d_out)`` numbers per weight, never every query's
    dense ``d_in × d_out`` gradient at once.
    """
    strategy, damping = scoring.strategy, scoring.settings.damping
    query_rank = scoring.settings.query_rank
    group = len(queries) if query_rank is None else _QUERY_GROUP
    parts: dict[str, list[Scanned]] = {}
    for start in range(0, len(queries), group):
        gradients = query_gradients(model, scoring.weights, queries[start : start + group])
        for name in list(gradients):
            p = _precondition(factors, name, gradients.pop(name), strategy, damping)
            parts.setdefault(name, []).append(p if query_rank is None else low_rank(p, query_rank))
    return {name: _join(pieces) for name, pieces in parts.items()}


def _index_queries(
    model: Model, factors: InfluenceFactors, scoring: _Scoring, queries: Sequence[tuple[str, str]]
) -> dict[str, Tensor | EigenQueries]:
    """Every query's preconditioned gradient for scoring against an index: EK-FAC and K-FAC
    in their eigenbasis (:class:`~rome_lens.influence.index.EigenQueries`), rotated from the
    gradient's factors, ``X = Σ_t (Q_Aᵀ ā_t)(Q_Sᵀ g_t)ᵀ / (Λ + λ)``; the others dense."""
    strategy, damping = scoring.strategy, scoring.settings.damping
    query_rank = scoring.settings.query_rank
    found = _query_factors(model, scoring.weights, queries)
    out: dict[str, Tensor | EigenQueries] = {}
    for name in list(found):
        a, g = found.pop(name)
        if strategy not in ("ekfac", "kfac"):
            p = _precondition(factors, name, torch.einsum("bti,bto->bio", a, g), strategy, damping)
            out[name] = p if query_rank is None else _dense(low_rank(p, query_rank))
            continue
        device = a.device
        q_a, q_s = factors.input_vectors[name].to(device), factors.output_vectors[name].to(device)
        values = factors.eigenvalues(name, strategy).to(device)
        rotated = torch.einsum("bti,bto->bio", a @ q_a, g @ q_s) / (
            values + damping * values.mean()
        )
        if query_rank is not None:  # Q_A and Q_S are orthogonal: cutting X cuts P
            left, right = low_rank(rotated, query_rank)
            rotated = left @ right.mT
        out[name] = EigenQueries(q_a, rotated, q_s)
    return out


def _one(p: Preconditioned, q: int) -> Preconditioned:
    """Query ``q`` alone (a batch of one)."""
    if isinstance(p, EigenQueries):
        return p.select(q)
    return (p[0][q : q + 1], p[1][q : q + 1]) if isinstance(p, tuple) else p[q : q + 1]


def _scan(
    model: Model,
    scoring: _Scoring,
    chunks: list[Chunk],
    preconditioned: dict[str, Scanned],
    batch_size: int,
    progress: bool,
    split: Split,
) -> tuple[Float[Tensor, "mine query layer"], Float[Tensor, " mine"], Int[Tensor, " mine"]]:
    """For this rank's share of the chunks: every chunk's score for every query, split by
    layer, its ``‖∇ log p(chunk)‖²``, and the document it belongs to."""
    weights, layers = scoring.weights, scoring.layers
    mine = shard(range(len(chunks)), split)
    owners = torch.tensor([chunks[i].document for i in mine], dtype=torch.long)
    chunks = [chunks[i] for i in mine]
    progress = progress and is_main(split)
    first = next(iter(preconditioned.values()))
    n_queries = (first[0] if isinstance(first, tuple) else first).shape[0]
    device = model_device(model)
    scores = torch.zeros(len(chunks), n_queries, len(layers), dtype=torch.float64, device=device)
    squared_norms = torch.zeros(len(chunks), dtype=torch.float64, device=device)  # ‖∇ log p‖²
    column = {layer: j for j, layer in enumerate(layers)}
    bar = tqdm(total=len(chunks), desc="scanning texts", unit="text", disable=not progress)
    with bar:
        for batch, found in text_gradients(model, chunks, weights, batch_size):
            rows = torch.tensor(batch.indices, device=device)
            for weight in weights:
                a, g = found[weight.name]
                dots = _dots(a, g, preconditioned[weight.name])
                scores[rows, :, column[weight.layer]] += dots.double()
                squared_norms[rows] += gradient_squared_norms(a, g)
            bar.update(len(batch.indices))
    return to_host(scores), to_host(squared_norms), owners  # one move, after the last batch


def _query_norms(preconditioned: Mapping[str, Preconditioned]) -> Float[Tensor, " query"]:
    """``‖P‖`` of each query over all the scored weights."""
    return torch.stack([_squared_norm(p) for p in preconditioned.values()]).sum(0).sqrt()


def _squared_norm(p: Preconditioned) -> Float[Tensor, " query"]:
    """``‖P‖²`` per query, from dense P or from its factors (``tr(LᵀL RᵀR)``)."""
    if isinstance(p, EigenQueries):  # ‖Q_A X Q_Sᵀ‖ = ‖X‖
        return p.rotated.double().flatten(1).square().sum(1)
    if isinstance(p, tuple):
        left, right = p[0].double(), p[1].double()
        return (left.mT @ left * (right.mT @ right)).sum((1, 2))
    return p.double().flatten(1).square().sum(1)


def _dots(
    a: Float[Tensor, "batch pos d_in"], g: Float[Tensor, "batch pos d_out"], p: Scanned
) -> Float[Tensor, "batch query"]:
    """``⟨P, Σ_t ā_t g_tᵀ⟩`` for every text of a batch and every query.

    Three forms give the same numbers; the cheapest depends on the shapes
    (``bench/bench_influence.py`` times them): low-rank factors never form a
    ``d_in × d_out`` matrix; for few queries over short texts ``Σ_t g_tᵀ Pᵀ ā_t``
    (token by token) is cheapest; otherwise each text's gradient, once.
    """
    if isinstance(p, tuple):  # Σ_t (ā_tᵀ L)(Rᵀ g_t)
        left, right = p
        return torch.einsum(
            "btqr,btqr->bq", torch.einsum("bti,qir->btqr", a, left),
            torch.einsum("bto,qor->btqr", g, right),
        )  # fmt: skip
    if a.shape[1] * p.shape[0] <= _TOKEN_FORM_LIMIT:
        return torch.einsum("btqo,bto->bq", torch.einsum("bti,qio->btqo", a, p), g)
    per_text = torch.bmm(a.mT, g).flatten(1)  # [batch d_in·d_out], one batch at a time
    return per_text @ p.flatten(1).T


def _dense(p: Preconditioned) -> Float[Tensor, "query d_in d_out"]:
    if isinstance(p, EigenQueries):
        return p.dense()
    return p[0] @ p[1].mT if isinstance(p, tuple) else p


def _token_scores(
    model: Model,
    weights: list[MLPWeight],
    texts: list[str],
    preconditioned: Mapping[str, Preconditioned],
    batch_size: int = 8,
) -> tuple[list[Tensor], list[list[str]]]:
    """Each text's score split by token, ``Σ_w ā_tᵀ P g_t`` (one query), the texts' chunks
    in batches as the scan reads them."""
    skip = len(bos_tokens(model))
    chunks = [chunk for d, text in enumerate(texts) for chunk in _text_chunks(model, text, d)]
    pieces: dict[int, Tensor] = {}  # chunk -> its non-BOS tokens' scores
    for batch, found in text_gradients(model, chunks, weights, batch_size):
        per_token = sum(
            _per_token(a, g, preconditioned[name]) for name, (a, g) in found.items()
        )  # [batch pos]
        for row, i in enumerate(batch.indices):
            pieces[i] = to_host(per_token[row, skip : len(chunks[i].tokens)].double())  # type: ignore[index]
    token_scores, str_tokens = [], []
    for d in range(len(texts)):
        mine = [i for i, chunk in enumerate(chunks) if chunk.document == d]
        token_scores.append(torch.cat([pieces[i] for i in mine]) if mine else torch.zeros(0))
        str_tokens.append([
            model.to_single_str_token(t) for i in mine for t in chunks[i].tokens[skip:].tolist()
        ])  # fmt: skip
    return token_scores, str_tokens


def _per_token(
    a: Float[Tensor, "batch pos d_in"], g: Float[Tensor, "batch pos d_out"], p: Preconditioned
) -> Float[Tensor, "batch pos"]:
    """``ā_tᵀ P g_t`` at every position, for one query's ``P`` in any of its forms."""
    if isinstance(p, EigenQueries):  # rotate the tokens rather than P back
        return torch.einsum(
            "bti,io,bto->bt", a @ p.input_vectors, p.rotated[0], g @ p.output_vectors
        )
    return torch.einsum("bti,io,bto->bt", a, _dense(p)[0].to(a.device), g)


def _text_chunks(model: Model, text: str, document: int) -> list[Chunk]:
    """``text`` in windows of the model's context, as the ``document``-th text (none if empty)."""
    if not text:
        return []
    return [
        Chunk(document, chunk.start, chunk.tokens)
        for chunk in Corpus.read([text]).chunks(model, max_length=model.cfg.n_ctx)
    ]
