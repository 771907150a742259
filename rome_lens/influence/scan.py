"""The machinery every scan over a corpus shares: query gradients, their preconditioning
and cut to rank, and the pass that dots them with every text's gradient.

:mod:`~rome_lens.influence.scores` (influence, one model) and
:mod:`~rome_lens.influence.attribution` (several model states of a fine-tune)
both build on it; the math is described in :mod:`~rome_lens.influence.scores`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource, bos_tokens
from rome_lens.core.distributed import Split, all_reduce_sum, is_main, shard
from rome_lens.core.precision import model_device, to_host
from rome_lens.core.runtime import frozen, linear_layout, pad
from rome_lens.core.tokens import prompt_tokens, target_token_ids
from rome_lens.influence.factors import (
    STRATEGIES,
    InfluenceFactors,
    gradient_squared_norms,
    sequence_gradients,
    text_gradients,
)
from rome_lens.influence.index import EigenQueries
from rome_lens.influence.settings import ScoreSettings
from rome_lens.influence.weights import MLPWeight, mlp_weights

Scanned = Tensor | tuple[Tensor, Tensor]  # [query d_in d_out], or low-rank factors (L, R)
Preconditioned = Scanned | EigenQueries  # or X in the eigenbasis (scoring against an index)
_TOKEN_FORM_LIMIT = 32  # positions × queries up to which the token form is the faster
_QUERY_GROUP = 16  # queries whose dense gradients are held at once when cutting them to low rank


class _Scoring(NamedTuple):
    """What a scan scores: the settings, the curvature approximation and the weights."""

    settings: ScoreSettings  # as given
    strategy: str  # the settings' strategy, or the factors'
    layers: list[int]  # the MLP layers scored, in the factors' order when not chosen
    weights: list[MLPWeight]  # their weights that are scored


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


def _text_totals(
    local: Float[Tensor, "mine query layer"], owners: Int[Tensor, " mine"], n_texts: int,
    split: Split,
) -> Float[Tensor, "text query"]:  # fmt: skip
    """Every text's score for every query: its chunks' and layers' summed, on every rank."""
    totals = torch.zeros(n_texts, local.shape[1], dtype=torch.float64)
    totals.index_add_(0, owners, local.sum(-1))
    return all_reduce_sum(totals, split)


def _join(pieces: list[Scanned]) -> Scanned:
    """Several batches of queries (groups, or strategies) as one."""
    if isinstance(pieces[0], tuple):
        return (torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))
    return torch.cat(pieces)  # type: ignore[arg-type]


def query_gradients(
    model: Model,
    weights: Sequence[MLPWeight],
    queries: Sequence[tuple[str, str]],
    answer_only: bool = True,
) -> dict[str, Float[Tensor, "query d_in d_out"]]:
    """Each query's ``∇ log p(completion | prompt)`` for every weight (non-BOS tokens).

    Args:
        model: the model.
        weights: the weights.
        queries: ``(prompt, completion)`` pairs.
        answer_only: the log-likelihood of the completion's tokens (the query
            function); ``False`` counts the prompt's tokens too, as a training text's
            loss does.

    Returns:
        ``{weight: [query d_in d_out]}``.
    """
    found = _query_factors(model, weights, queries, answer_only)
    return {name: torch.einsum("bti,bto->bio", a, g) for name, (a, g) in found.items()}


def _query_factors(
    model: Model,
    weights: Sequence[MLPWeight],
    queries: Sequence[tuple[str, str]],
    answer_only: bool = True,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each query's gradient as its factors, ``∇f = Σ_t ā_t g_tᵀ``: ``{weight: (ā, g)}``,
    ``[query pos d_in]`` and ``[query pos d_out]``."""
    sequences, reads, answers = [], [], []
    skip = len(bos_tokens(model))
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
        first = len(head) - 1 if answer_only else max(skip - 1, 0)  # predicts full[first + 1]
        reads += [(q, p) for p in range(first, len(full) - 1)]
        answers += full[first + 1 :].tolist()
    tokens, mask = pad(sequences, 0, "right")
    counted = mask.bool()
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
    """The preconditioned gradient ``(G + λI)⁻¹ ∇f`` of every weight and query (the
    strategies are described in :mod:`~rome_lens.influence.scores`).

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
    smaller Gram matrix: ``M ≈ (M V) Vᵀ`` with ``V`` the top eigenvectors of
    ``MᵀM`` (or ``U (Mᵀ U)ᵀ`` from ``M Mᵀ``), in the matrices' dtype (at least
    float32). On 16 matrices of ``W_out``'s shape in the default model this is
    4.2× faster than a full SVD, and the products agree to 3e-6
    (``bench/bench_influence.py --only lowrank``); in float64 the
    eigendecompositions, most of the cost of a query against a tokens index,
    would take twice as long for no gain at float32's precision.

    Args:
        matrices: ``[query d_in d_out]``.
        rank: the rank kept.

    Returns:
        ``(L, R)``.
    """
    m = matrices if matrices.dtype == torch.float64 else matrices.float()
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
    scoring: _Scoring,
    queries: Sequence[tuple[str, str]],
    answer_only: bool = True,
) -> dict[str, Scanned]:
    """Every query's preconditioned gradient, dense or as rank-``query_rank`` factors.

    With ``query_rank`` the queries go through in groups of ``_QUERY_GROUP``, each
    cut to its factors before the next, so that memory holds
    ``query × rank × (d_in + d_out)`` numbers per weight, never every query's
    dense ``d_in × d_out`` gradient at once. EK-FAC and K-FAC queries are then
    cut in the eigenbasis, where the gradient arrives from its tokens' factors
    (``X = Σ_t (Q_Aᵀ ā_t)(Q_Sᵀ g_t)ᵀ / (Λ + λ)``) and, ``Q_A`` and ``Q_S`` being
    orthogonal, cutting ``X`` cuts ``P = Q_A X Q_Sᵀ``: the factors are
    ``(Q_A L, Q_S R)``, and no dense ``d_in × d_in × d_out`` rotation is made:
    on a ``W_out`` of the default model, 0.6 rather than 4.2 GMAC per query, what
    remains being the Gram matrix of the cut.
    """
    strategy, damping = scoring.strategy, scoring.settings.damping
    query_rank = scoring.settings.query_rank
    group = len(queries) if query_rank is None else _QUERY_GROUP
    parts: dict[str, list[Scanned]] = {}
    for start in range(0, len(queries), group):
        chosen = queries[start : start + group]
        if query_rank is not None and strategy in ("ekfac", "kfac"):
            for name, piece in _eigen_low_rank(model, factors, scoring, chosen, answer_only):
                parts.setdefault(name, []).append(piece)
            continue
        gradients = query_gradients(model, scoring.weights, chosen, answer_only)
        for name in list(gradients):
            p = _precondition(factors, name, gradients.pop(name), strategy, damping)
            parts.setdefault(name, []).append(p if query_rank is None else low_rank(p, query_rank))
    return {name: _join(pieces) for name, pieces in parts.items()}


def _eigen_low_rank(
    model: Model,
    factors: InfluenceFactors,
    scoring: _Scoring,
    queries: Sequence[tuple[str, str]],
    answer_only: bool,
) -> Iterator[tuple[str, tuple[Tensor, Tensor]]]:
    """EK-FAC or K-FAC queries cut to rank in the eigenbasis: ``(Q_A L, Q_S R)`` per weight,
    with ``L Rᵀ`` the truncated SVD of the preconditioned rotated gradient ``X``."""
    damping, query_rank = scoring.settings.damping, scoring.settings.query_rank
    assert query_rank is not None
    found = _query_factors(model, scoring.weights, queries, answer_only)
    for name in list(found):
        a, g = found.pop(name)  # [query pos d_in], [query pos d_out]
        device = a.device
        q_a, q_s = factors.input_vectors[name].to(device), factors.output_vectors[name].to(device)
        values = factors.eigenvalues(name, scoring.strategy).to(device)
        rotated = torch.einsum("bti,bto->bio", a.to(q_a.dtype) @ q_a, g.to(q_s.dtype) @ q_s)
        left, right = low_rank(rotated / (values + damping * values.mean()), query_rank)
        yield name, ((q_a @ left).to(a.dtype), (q_s @ right).to(g.dtype))


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
