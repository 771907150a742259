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
spurious. With ``query_rank``, ``P`` is cut to that rank (the paper's 32) and
kept as factors ``L Rᵀ``: a text then costs ``Σ_t (ā_tᵀ L)(Rᵀ g_t)`` per
query and weight, and neither ``P`` nor the text's gradient is ever formed.
With ``normalize=True`` every score is divided by the norms of both vectors,
``‖P‖`` and ``‖∇ log p(chunk)‖`` over the scored weights, chunk by chunk (a
text longer than one window sums its chunks' scores): with ``"identity"`` this
is the cosine of the two gradients, the unit-normalised dot product of TracIn
and TrackStar, which stops long or high-loss texts from outranking the rest.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence import fit_influence_factors, influence
>>> model = tiny_model()
>>> texts = ["The Eiffel Tower is in Paris.", "The Louvre is a museum.", "Berlin is in Germany."]
>>> factors = fit_influence_factors(model, texts * 4, layers=[1, 2], n_tokens=200,
...                                 cache_dir=tempfile.mkdtemp(), progress=False)
>>> result = influence(model, factors, "The Eiffel Tower is in", " Paris", texts, top_k=2,
...                    progress=False)
>>> result.to_dataframe()[["rank", "text_id"]].shape, result.text_ids[0]  # the fact itself first
((2, 2), 0)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.corpus import Batch, Chunk, Corpus, CorpusSource, bos_tokens, token_batches
from rome_lens.core.distributed import Split, all_reduce_sum, is_main, shard
from rome_lens.core.precision import model_device, to_host
from rome_lens.core.results import Result
from rome_lens.core.runtime import frozen, linear_layout, pad
from rome_lens.core.tokens import prompt_tokens, target_token_ids
from rome_lens.influence.factors import STRATEGIES, InfluenceFactors, Strategy, sequence_gradients
from rome_lens.influence.prefilter import bm25_top
from rome_lens.influence.weights import MLPWeight, mlp_weights
from rome_lens.stats.moments import next_token_loss

__all__ = [
    "SPURIOUS_RATIO",
    "InfluenceResult",
    "TextScores",
    "influence",
    "influence_many",
    "low_rank",
    "preconditioned_gradients",
    "query_gradients",
    "score_texts",
]

Preconditioned = Tensor | tuple[Tensor, Tensor]  # [query d_in d_out], or low-rank factors (L, R)
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
    prefilter: int | None = None,
    layers: Sequence[int] | None = None,
    weights: Sequence[str] | None = None,
    strategy: Strategy | None = None,
    damping: float = 0.1,
    query_rank: int | None = None,
    normalize: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
) -> InfluenceResult:
    """The ``top_k`` texts of ``corpus`` that most raise ``p(completion | prompt)``.

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`.
        prompt: the query's prompt.
        completion: its completion (a leading space is added as the tokenizer expects).
        corpus: the training texts: strings, a ``.txt``/``.jsonl`` path or a :class:`Corpus`.
        top_k: how many texts to return.
        prefilter: score only the texts BM25 ranks in the top ``prefilter`` for the
            query (``None``: every text).
        layers: score these MLP layers only (``None``: every layer of the factors).
        weights: score these of ``"W_in"``, ``"W_gate"``, ``"W_out"`` only (``None``: the
            factors' weights).
        strategy: the curvature approximation (``None``: the factors').
        damping: λ as a share of the mean eigenvalue.
        query_rank: cut each preconditioned query gradient to this rank (``None``: full).
        normalize: divide each score by the query's and the text chunk's gradient norms
            (with ``"identity"``: the gradients' cosine).
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group
            (``None``: when one is initialised).

    Returns:
        The top texts, their scores, and the splits by layer and by token.
    """
    (result,) = influence_many(
        model, factors, [(prompt, completion)], corpus, top_k=top_k, prefilter=prefilter,
        layers=layers, weights=weights, strategy=strategy, damping=damping, query_rank=query_rank,
        normalize=normalize, batch_size=batch_size, progress=progress, distributed=distributed,
    )  # fmt: skip
    return result


def influence_many(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    corpus: CorpusSource | Corpus,
    *,
    top_k: int = 20,
    prefilter: int | None = None,
    layers: Sequence[int] | None = None,
    weights: Sequence[str] | None = None,
    strategy: Strategy | None = None,
    damping: float = 0.1,
    query_rank: int | None = None,
    normalize: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
) -> list[InfluenceResult]:
    """:func:`influence` for several ``(prompt, completion)`` queries in one pass over the texts.

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`.
        queries: ``(prompt, completion)`` pairs.
        corpus: the training texts.
        top_k: how many texts to return per query.
        prefilter: score only the union of each query's BM25 top ``prefilter`` texts.
        layers: score these MLP layers only (``None``: every layer of the factors).
        weights: score these of ``"W_in"``, ``"W_gate"``, ``"W_out"`` only (``None``: the
            factors' weights).
        strategy: the curvature approximation (``None``: the factors').
        damping: λ as a share of the mean eigenvalue.
        query_rank: cut each preconditioned query gradient to this rank.
        normalize: divide each score by the query's and the text chunk's gradient norms.
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group and merge
            (``None``: when one is initialised; see :mod:`rome_lens.core.distributed`).

    Returns:
        One result per query, in order.
    """
    started = time.perf_counter()
    chosen: str = strategy or factors.strategy
    _check(model, factors, queries, top_k, prefilter, chosen, query_rank)
    texts = Corpus.read(corpus)
    if texts.documents is None or not texts.documents:
        raise ValueError("corpus must hold texts to score, got an empty or sampled corpus")
    documents = list(texts.documents)
    layers = list(factors.layers) if layers is None else sorted(set(layers))
    missing = [layer for layer in layers if layer not in factors.layers]
    if missing or not layers:
        raise ValueError(f"the factors cover layers {factors.layers}, not {missing or layers}")
    fitted = sorted({name.rsplit(".", 1)[-1] for name in factors.names})
    scored = mlp_weights(model, layers, fitted if weights is None else weights)
    unfitted = [w.name for w in scored if w.name not in factors.names]
    if unfitted:
        raise ValueError(f"the factors hold {factors.names}, not {unfitted}: fit them too")
    preconditioned = _preconditioned_queries(
        model, factors, scored, queries, chosen, damping, query_rank
    )
    ids = list(range(len(documents)))
    if prefilter is not None:
        kept = bm25_top(documents, [f"{p} {c.strip()}" for p, c in queries], prefilter)
        ids = sorted({i for row in kept for i in row})
    chunks = Corpus(tuple(documents[i] for i in ids), texts.name).chunks(
        model, max_length=model.cfg.n_ctx
    )
    split = Split.of(distributed)
    local, squared_norms, owners = _scan(
        model, scored, chunks, preconditioned, layers, batch_size, progress, split
    )
    if normalize:
        local /= squared_norms.clamp_min(1e-30).sqrt()[:, None, None]
        local /= _query_norms(preconditioned).to(local.device)[None, :, None]
    totals = torch.zeros(len(ids), len(queries), dtype=torch.float64)
    totals.index_add_(0, owners, local.sum(-1))
    totals = all_reduce_sum(totals, split)  # [text query], every text's score on every rank
    orders = [totals[:, q].argsort(descending=True)[:top_k].tolist() for q in range(len(queries))]
    tops = torch.zeros(len(queries), len(orders[0]), len(layers), dtype=torch.float64)
    for q, order in enumerate(orders):  # the top texts' layer splits, from the ranks that hold them
        place = torch.full((len(ids),), -1, dtype=torch.long)
        place[order] = torch.arange(len(order))
        rank_of = place[owners]
        held = rank_of >= 0
        tops[q].index_add_(0, rank_of[held], local[held, q])
    tops = all_reduce_sum(tops, split)
    results = []
    for q, (prompt, completion) in enumerate(queries):
        order = orders[q]
        top_ids = [ids[i] for i in order]
        token_scores, str_tokens = _token_scores(
            model,
            scored,
            [documents[i] for i in top_ids],
            {n: _dense(_one(p, q)) for n, p in preconditioned.items()},
        )
        results.append(
            InfluenceResult(
                prompt=prompt,
                completion=completion,
                strategy=chosen,
                layers=layers,
                text_ids=top_ids,
                texts=[documents[i] for i in top_ids],
                scores=totals[order, q],
                layer_scores=tops[q],
                token_scores=token_scores,
                str_tokens=str_tokens,
                all_ids=ids,
                all_scores=totals[:, q],
                fingerprint=factors.fingerprint,
                seconds=time.perf_counter() - started,
                normalized=normalize,
            )
        )
    return results


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
    damping: float = 0.1,
    query_rank: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
) -> TextScores:
    """Every text's score under several curvature approximations, from one pass over the texts.

    Comparing strategies costs one forward and backward pass per text, not one
    per strategy: the queries of every strategy are scored together. Dividing
    a strategy's scores by ``text_norms[:, None] * query_norms[strategy][None]``
    gives what ``normalize=True`` gives (for ``"identity"``, the gradients' cosine).

    Args:
        model: the model the factors were fitted on (not changed).
        factors: from :func:`~rome_lens.influence.fit_influence_factors`, or several
            fits of the same weights (an EK-FAC fit and a diagonal one): each strategy
            uses the first that supports it.
        queries: ``(prompt, completion)`` pairs.
        corpus: the training texts.
        strategies: the curvature approximations to score with.
        damping: λ as a share of the mean eigenvalue.
        query_rank: cut each preconditioned query gradient to this rank.
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group (``None``:
            when one is initialised).

    Returns:
        The scores ``[text query]`` by strategy, and the norms.
    """
    fits = [factors] if isinstance(factors, InfluenceFactors) else list(factors)
    if not strategies or not fits:
        raise ValueError("name at least one strategy and one set of factors")
    if len({(tuple(f.layers), tuple(f.names)) for f in fits}) > 1:
        raise ValueError(
            "the factors must cover the same weights, got " + ", ".join(map(repr, fits))
        )
    chosen = {}
    for strategy in strategies:
        usable = [f for f in fits if strategy in STRATEGIES and f.supports(strategy)]
        chosen[strategy] = usable[0] if usable else fits[0]
        _check(model, chosen[strategy], queries, 1, None, strategy, query_rank)
    texts = Corpus.read(corpus)
    if texts.documents is None or not texts.documents:
        raise ValueError("corpus must hold texts to score, got an empty or sampled corpus")
    layers = list(fits[0].layers)
    fitted = sorted({name.rsplit(".", 1)[-1] for name in fits[0].names})
    scored = mlp_weights(model, layers, fitted)
    each = {
        strategy: _preconditioned_queries(
            model, chosen[strategy], scored, queries, strategy, damping, query_rank
        )
        for strategy in strategies
    }
    joined = {w.name: _join([each[s][w.name] for s in strategies]) for w in scored}
    chunks = texts.chunks(model, max_length=model.cfg.n_ctx)
    split = Split.of(distributed)
    local, squared, owners = _scan(
        model, scored, chunks, joined, layers, batch_size, progress, split
    )
    totals = torch.zeros(len(texts.documents), len(strategies) * len(queries), dtype=torch.float64)
    totals.index_add_(0, owners, local.sum(-1))
    norms = torch.zeros(len(texts.documents), dtype=torch.float64).index_add_(0, owners, squared)
    totals, norms = all_reduce_sum(totals, split), all_reduce_sum(norms, split)
    parts = totals.split(len(queries), dim=1)
    return TextScores(
        scores=dict(zip(strategies, parts, strict=True)),
        text_norms=norms.sqrt(),
        query_norms={s: to_host(_query_norms(each[s])) for s in strategies},  # with the scores
    )


def _join(pieces: list[Preconditioned]) -> Preconditioned:
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
        found = sequence_gradients(model, tokens, counted, weights, log_likelihood)
    return {name: torch.einsum("bti,bto->bio", a, g) for name, (a, g) in found.items()}


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
    model: Model,
    factors: InfluenceFactors,
    weights: list[MLPWeight],
    queries: Sequence[tuple[str, str]],
    strategy: str,
    damping: float,
    query_rank: int | None,
) -> dict[str, Preconditioned]:
    """Every query's preconditioned gradient, dense or as rank-``query_rank`` factors.

    With ``query_rank`` the queries go through in groups of ``_QUERY_GROUP``, each
    cut to its factors before the next, so that memory holds
    ``query × rank × (d_in + d_out)`` numbers per weight, never every query's
    dense ``d_in × d_out`` gradient at once.
    """
    group = len(queries) if query_rank is None else _QUERY_GROUP
    parts: dict[str, list[Preconditioned]] = {}
    for start in range(0, len(queries), group):
        gradients = query_gradients(model, weights, queries[start : start + group])
        for name in list(gradients):
            p = _precondition(factors, name, gradients.pop(name), strategy, damping)
            parts.setdefault(name, []).append(p if query_rank is None else low_rank(p, query_rank))
    return {name: _join(pieces) for name, pieces in parts.items()}


def _one(p: Preconditioned, q: int) -> Preconditioned:
    """Query ``q`` alone (a batch of one)."""
    return (p[0][q : q + 1], p[1][q : q + 1]) if isinstance(p, tuple) else p[q : q + 1]


def _scan(
    model: Model,
    weights: list[MLPWeight],
    chunks: list[Chunk],
    preconditioned: dict[str, Preconditioned],
    layers: list[int],
    batch_size: int,
    progress: bool,
    split: Split,
) -> tuple[Float[Tensor, "mine query layer"], Float[Tensor, " mine"], Int[Tensor, " mine"]]:
    """For this rank's share of the chunks: every chunk's score for every query, split by
    layer, its ``‖∇ log p(chunk)‖²``, and the document it belongs to."""
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
    with bar, frozen(model), linear_layout(model):
        for batch in token_batches(model, chunks, batch_size):

            def log_likelihood(logits: Tensor, batch: Batch = batch) -> Tensor:
                return -next_token_loss(logits, batch.tokens, batch.real, "empirical", None)

            found = sequence_gradients(model, batch.tokens, batch.counted, weights, log_likelihood)
            rows = torch.tensor(batch.indices, device=device)
            for weight in weights:
                a, g = found[weight.name]
                dots = _dots(a, g, preconditioned[weight.name])
                scores[rows, :, column[weight.layer]] += dots.double()
                squared_norms[rows] += _squared_norms(a, g)
            bar.update(len(batch.indices))
    return to_host(scores), to_host(squared_norms), owners  # one move, after the last batch


def _query_norms(preconditioned: dict[str, Preconditioned]) -> Float[Tensor, " query"]:
    """``‖P‖`` of each query over all the scored weights."""
    return torch.stack([_squared_norm(p) for p in preconditioned.values()]).sum(0).sqrt()


def _squared_norms(
    a: Float[Tensor, "batch pos d_in"], g: Float[Tensor, "batch pos d_out"]
) -> Float[Tensor, " batch"]:
    """``‖Σ_t ā_t g_tᵀ‖²`` per text, from the two Gram matrices (no gradient formed)."""
    a, g = a.double(), g.double()
    return (torch.einsum("bti,bsi->bts", a, a) * torch.einsum("bto,bso->bts", g, g)).sum((1, 2))


def _squared_norm(p: Preconditioned) -> Float[Tensor, " query"]:
    """``‖P‖²`` per query, from dense P or from its factors (``tr(LᵀL RᵀR)``)."""
    if isinstance(p, tuple):
        left, right = p[0].double(), p[1].double()
        return (left.mT @ left * (right.mT @ right)).sum((1, 2))
    return p.double().flatten(1).square().sum(1)


def _dots(
    a: Float[Tensor, "batch pos d_in"], g: Float[Tensor, "batch pos d_out"], p: Preconditioned
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
    return p[0] @ p[1].mT if isinstance(p, tuple) else p


def _token_scores(
    model: Model,
    weights: list[MLPWeight],
    texts: list[str],
    preconditioned: dict[str, Tensor],
) -> tuple[list[Tensor], list[list[str]]]:
    """Each text's score split by token, ``Σ_w ā_tᵀ P g_t`` (one query)."""
    skip = len(bos_tokens(model))
    generator = torch.Generator()
    token_scores, str_tokens = [], []
    with frozen(model), linear_layout(model):
        for text in texts:
            pieces, labels = [], []
            for chunk in Corpus.read([text]).chunks(model, max_length=model.cfg.n_ctx):
                tokens = chunk.tokens[None]
                real = torch.ones_like(tokens, dtype=torch.bool)
                counted = real.clone()
                counted[:, :skip] = False

                def log_likelihood(
                    logits: Tensor, tokens: Tensor = tokens, real: Tensor = real
                ) -> Tensor:
                    return -next_token_loss(logits, tokens, real, "empirical", generator)

                found = sequence_gradients(model, tokens, counted, weights, log_likelihood)
                per_token = sum(
                    torch.einsum("ti,io,to->t", a[0], preconditioned[name][0], g[0])
                    for name, (a, g) in found.items()
                )
                pieces.append(per_token[skip:].double())  # type: ignore[index]
                labels += [model.to_single_str_token(t) for t in chunk.tokens[skip:].tolist()]
            token_scores.append(to_host(torch.cat(pieces)))
            str_tokens.append(labels)
    return token_scores, str_tokens


def _check(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    top_k: int,
    prefilter: int | None,
    strategy: str,
    query_rank: int | None,
) -> None:
    if not isinstance(factors, InfluenceFactors):
        raise TypeError(f"factors must be InfluenceFactors, got {type(factors).__name__}")
    factors.check_model(model)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    factors.eigenvalues(factors.names[0], strategy)  # raises if the factors lack it
    if not queries:
        raise ValueError("name at least one (prompt, completion) query")
    for prompt, completion in queries:
        if not isinstance(completion, str) or not completion.strip():
            raise ValueError(f"completion must be a non-empty string, got {completion!r}")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if prefilter is not None and (not isinstance(prefilter, int) or prefilter < 1):
        raise ValueError(f"prefilter must be a positive integer or None, got {prefilter!r}")
    if query_rank is not None and (not isinstance(query_rank, int) or query_rank < 1):
        raise ValueError(f"query_rank must be a positive integer or None, got {query_rank!r}")
