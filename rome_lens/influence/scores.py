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
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource, bos_tokens
from rome_lens.core.distributed import Split, all_reduce_sum
from rome_lens.core.precision import to_host
from rome_lens.core.results import Result
from rome_lens.influence.attribution import (
    RECIPES,
    attribute,
    attribution_scores,
)
from rome_lens.influence.factors import (
    STRATEGIES,
    InfluenceFactors,
    Strategy,
    text_gradients,
)
from rome_lens.influence.index import (
    EigenQueries,
    GradientIndex,
    index_scan,
    indexed_token_scores,
)
from rome_lens.influence.prefilter import bm25_top
from rome_lens.influence.scan import (
    Preconditioned,
    _check_queries,
    _checked_strategy,
    _dense,
    _join,
    _precondition,
    _preconditioned_queries,
    _query_factors,
    _query_norms,
    _read_texts,
    _scan,
    _Scoring,
    _scoring,
    _text_totals,
    low_rank,
    preconditioned_gradients,
    query_gradients,
)
from rome_lens.influence.settings import ScoreSettings, settings_from_keywords
from rome_lens.influence.training import FineTuned
from rome_lens.influence.weights import MLPWeight

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

_RRF_K = 60  # reciprocal-rank fusion's constant
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
    # other rankings' top texts (corpus indices, best first, as many as text_ids): "bm25",
    # and "fused", the reciprocal-rank fusion of this ranking with BM25's
    rankings: dict[str, list[int]] = field(default_factory=dict)

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
            for name, ids in self.rankings.items():
                row[f"{name}_rank"] = ids.index(text_id) + 1 if text_id in ids else None
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
    recipe: str | None = None,
    tuned: FineTuned | None = None,
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
            (:func:`~rome_lens.influence.index.build_gradient_index`). An index of
            ``basis="tokens"`` gives the scan's own scores; a projected one below full
            rank gives the projected gradients' (docs/influence.md measures both).
        recipe: ``"attribution"``: which of the texts ``tuned`` was trained on taught
            the completion (see :func:`influence_many`).
        tuned: the fine-tune a recipe scores.
        deprecated: the fields of ``settings`` as keywords (``damping=0.1``), as before
            ``ScoreSettings``; accepted for one release, with a ``DeprecationWarning``.

    Returns:
        The top texts, their scores, and the splits by layer and by token.
    """
    settings = settings_from_keywords(settings, deprecated, "influence")
    (result,) = influence_many(
        model, factors, [(prompt, completion)], corpus, top_k=top_k, settings=settings,
        batch_size=batch_size, progress=progress, distributed=distributed, index=index,
        recipe=recipe, tuned=tuned,
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
    recipe: str | None = None,
    tuned: FineTuned | None = None,
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
        recipe: a named attribution recipe (``"attribution"``: which of the texts
            ``tuned`` was trained on taught the answer; see
            :mod:`~rome_lens.influence.attribution`) instead of plain influence. ``model``
            is then the base model, ``factors`` fitted on the fine-tuned one, and only
            ``settings.layers`` applies; the token split is the fine-tuned model's.
        tuned: the fine-tune a recipe scores (from :func:`~rome_lens.influence.fine_tune`).
        deprecated: the fields of ``settings`` as keywords, accepted for one release
            with a ``DeprecationWarning``.

    Returns:
        One result per query, in order.
    """
    started = time.perf_counter()
    settings = settings_from_keywords(settings, deprecated, "influence_many")
    _check_queries(queries, top_k)
    if recipe is not None or tuned is not None:
        if index is not None:
            raise ValueError("a recipe scans its model states; it cannot use an index")
        return _recipe_results(
            model, factors, queries, corpus, top_k, settings, (recipe, tuned),
            (batch_size, progress, distributed, started),
        )  # fmt: skip
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
    else:  # a tokens index holds the texts' gradients exactly: it meets the scan's queries
        tokens = opened.settings.basis == "tokens"
        preconditioned = (_preconditioned_queries if tokens else _index_queries)(
            model, factors, scoring, queries
        )
        local, squared_norms, owners = index_scan(
            model, factors, opened, texts, scoring.weights, scoring.layers, preconditioned, split
        )
    if settings.normalize:
        local = _normalized(local, squared_norms, preconditioned)
    ranking = _ranking(texts, ids, queries, (local, owners, split), top_k)
    readable = opened if not split.active else None  # token scores straight from the index
    return [
        _query_result(
            model,
            factors,
            query,
            q,
            texts,
            scoring,
            preconditioned,
            ranking,
            started,
            index=readable,
        )  # fmt: skip
        for q, query in enumerate(queries)
    ]


def _recipe_results(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    corpus: CorpusSource | Corpus,
    top_k: int,
    settings: ScoreSettings,
    asked: tuple[str | None, FineTuned | None],
    run: tuple[int, bool, bool | None, float],
) -> list[InfluenceResult]:
    """:func:`influence_many` for an attribution recipe: the recipe's combined scores, split
    by layer, and the fine-tuned model's token split of the top texts."""
    name, tuned = _recipe(asked[0], asked[1], settings)
    batch_size, progress, distributed, started = run
    texts = _read_texts(corpus)
    found = attribute(
        model, factors, queries, texts, tuned, {name: RECIPES[name]},
        layers=settings.layers, batch_size=batch_size, progress=progress,
        distributed=distributed,
    )  # fmt: skip
    ids = list(range(len(texts.documents or ())))
    ranking = _ranking(texts, ids, queries, (found.local[name], found.owners, found.split), top_k)
    scoring = found.scoring._replace(
        settings=replace(settings, normalize=RECIPES[name].normalize), strategy=name
    )
    preconditioned = found.preconditioned[name]
    with tuned.applied(model):
        return [
            _query_result(
                model, factors, query, q, texts, scoring, preconditioned, ranking, started
            )
            for q, query in enumerate(queries)
        ]


def _recipe(
    recipe: str | None, tuned: FineTuned | None, settings: ScoreSettings
) -> tuple[str, FineTuned]:
    """The recipe's name and fine-tune, once both are given and the settings fit a recipe."""
    if recipe is None:
        raise ValueError(f"tuned= is what a recipe scores: name one of {sorted(RECIPES)}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or None, got {recipe!r}")
    if not isinstance(tuned, FineTuned):
        raise ValueError(
            f"recipe={recipe!r} scores a fine-tuned model against its base: pass the base "
            f"model and tuned= (from fine_tune), got tuned={tuned!r}"
        )
    extra = [
        f.name for f in fields(ScoreSettings)
        if f.name != "layers" and getattr(settings, f.name) != f.default
    ]  # fmt: skip
    if extra:
        raise ValueError(
            f"recipe={recipe!r} sets how texts are scored itself; of the settings only layers "
            f"apply, got {extra}"
        )
    return recipe, tuned


def _ranking(
    texts: Corpus,
    ids: list[int],
    queries: Sequence[tuple[str, str]],
    scanned: tuple[Float[Tensor, "mine query layer"], Int[Tensor, " mine"], Split],
    top_k: int,
) -> _Ranking:
    """The scanned texts' totals, each query's top texts with their layer split, and the
    other rankings' tops, from this rank's chunk scores ``(local, owners, split)``."""
    local, owners, split = scanned
    totals = _text_totals(local, owners, len(ids), split)
    orders = _top_orders(totals, top_k)
    tops = _top_layer_scores(local, owners, orders, len(ids), split)
    others = _other_rankings(texts, ids, queries, totals, top_k)
    return _Ranking(ids, totals, orders, tops, others)


class _Ranking(NamedTuple):
    """Every scanned text's total score, and each query's top texts with their layer split."""

    ids: list[int]  # the scanned texts' indices in the corpus
    totals: Float[Tensor, "scanned query"]  # every scanned text's score for every query
    orders: list[list[int]]  # each query's top texts, as rows of totals, best first
    tops: Float[Tensor, "query top layer"]  # their scores split by layer
    others: list[dict[str, list[int]]]  # each query's BM25 and fused tops (corpus indices)


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


def _other_rankings(
    texts: Corpus,
    ids: list[int],
    queries: Sequence[tuple[str, str]],
    totals: Float[Tensor, "scanned query"],
    top_k: int,
) -> list[dict[str, list[int]]]:
    """Each query's top texts by BM25 and by the reciprocal-rank fusion of BM25 with the
    scores (``Σ 1 / (60 + rank)``, Cormack et al. 2009), among the scanned texts."""
    documents = texts.documents or ()
    scanned = [documents[i] for i in ids]
    words = [f"{p} {c.strip()}" for p, c in queries]
    lexical = bm25_top(scanned, words, len(scanned))  # rows of totals, best first
    out = []
    for q, order in enumerate(lexical):
        by_words = torch.empty(len(ids), dtype=torch.float64)
        by_words[torch.tensor(order)] = torch.arange(1, len(order) + 1, dtype=torch.float64)
        by_scores = totals[:, q].argsort(descending=True).argsort().double() + 1
        fused = (1 / (_RRF_K + by_scores) + 1 / (_RRF_K + by_words)).argsort(descending=True)
        out.append({
            "bm25": [ids[i] for i in order[:top_k]],
            "fused": [ids[i] for i in fused[:top_k].tolist()],
        })  # fmt: skip
    return out


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
    index: GradientIndex | None = None,
) -> InfluenceResult:
    """Query ``q``'s result: its top texts, their splits by layer and by token (read from
    ``index`` when it holds the tokens, else from a pass over the top texts)."""
    documents = texts.documents or ()
    order = ranking.orders[q]
    top_ids = [ranking.ids[i] for i in order]
    mine = {n: _one(p, q) for n, p in preconditioned.items()}
    indexed = None
    if index is not None and index.settings.basis == "tokens":
        indexed = indexed_token_scores(index, scoring.weights, mine, top_ids)
    token_scores, str_tokens = _token_scores(
        model, scoring.weights, [documents[i] for i in top_ids], mine, indexed=indexed
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
        rankings=ranking.others[q],
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
    recipe: str | None = None,
    tuned: FineTuned | None = None,
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
        recipe: a named attribution recipe (``"attribution"``) instead of the
            strategies: ``scores`` then holds ``{recipe: [text query]}``, already
            normalised as the recipe asks (its norms are ones). ``model`` is the base
            model, ``factors`` fitted on the fine-tuned one; of ``settings`` only
            ``layers`` applies (see :mod:`~rome_lens.influence.attribution`).
        tuned: the fine-tune a recipe scores (from :func:`~rome_lens.influence.fine_tune`).
        deprecated: ``damping`` or ``query_rank`` as keywords, accepted for one release
            with a ``DeprecationWarning``.

    Returns:
        The scores ``[text query]`` by strategy, and the norms.
    """
    settings = settings_from_keywords(
        settings, deprecated, "score_texts", accepted=("damping", "query_rank")
    )
    if recipe is not None or tuned is not None:
        return _recipe_text_scores(
            model, factors, queries, corpus, settings, (recipe, tuned), strategies,
            (batch_size, progress, distributed),
        )  # fmt: skip
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


def _recipe_text_scores(
    model: Model,
    factors: InfluenceFactors | Sequence[InfluenceFactors],
    queries: Sequence[tuple[str, str]],
    corpus: CorpusSource | Corpus,
    settings: ScoreSettings,
    asked: tuple[str | None, FineTuned | None],
    strategies: Sequence[Strategy],
    run: tuple[int, bool, bool | None],
) -> TextScores:
    """:func:`score_texts` for an attribution recipe."""
    name, tuned = _recipe(asked[0], asked[1], settings)
    if tuple(strategies) != ("ekfac",):
        raise ValueError(f"recipe={name!r} chooses its curvature; drop strategies={strategies}")
    if not isinstance(factors, InfluenceFactors):
        raise ValueError("a recipe takes one InfluenceFactors, fitted on the fine-tuned model")
    batch_size, progress, distributed = run
    found = attribution_scores(
        model, factors, queries, corpus, tuned, {name: RECIPES[name]},
        layers=settings.layers, batch_size=batch_size, progress=progress,
        distributed=distributed,
    )  # fmt: skip
    n_texts, n_queries = found[name].shape
    return TextScores(
        scores=found,
        text_norms=torch.ones(n_texts, dtype=torch.float64),
        query_norms={name: torch.ones(n_queries, dtype=torch.float64)},
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


def _token_scores(
    model: Model,
    weights: list[MLPWeight],
    texts: list[str],
    preconditioned: Mapping[str, Preconditioned],
    batch_size: int = 8,
    indexed: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[list[str]]]:
    """Each text's score split by token, ``Σ_w ā_tᵀ P g_t`` (one query): ``indexed`` where
    a tokens index gave them, else from the texts' chunks in batches as the scan reads them."""
    skip = len(bos_tokens(model))
    chunks = [chunk for d, text in enumerate(texts) for chunk in _text_chunks(model, text, d)]
    pieces: dict[int, Tensor] = {}  # chunk -> its non-BOS tokens' scores
    batches = [] if indexed is not None else text_gradients(model, chunks, weights, batch_size)
    for batch, found in batches:
        per_token = sum(
            _per_token(a, g, preconditioned[name]) for name, (a, g) in found.items()
        )  # [batch pos]
        for row, i in enumerate(batch.indices):
            pieces[i] = to_host(per_token[row, skip : len(chunks[i].tokens)].double())  # type: ignore[index]
    token_scores, str_tokens = [], []
    for d in range(len(texts)):
        mine = [i for i, chunk in enumerate(chunks) if chunk.document == d]
        if indexed is not None:
            token_scores.append(indexed[d])
        else:
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
