"""Attribution: which of the texts a model was fine-tuned on taught it a fact.

Influence asks which texts, trained on more, would raise an answer's
probability; attribution asks which text *taught* it. FTRACE (arXiv
2205.11482) and TrackStar (arXiv 2410.17413) find plain gradient influence
behind BM25 at the second question, and name what narrows the gap. Each is an
option of :class:`AttributionSettings`, scored on a model fine-tuned by
:func:`~rome_lens.influence.training.fine_tune` (a :class:`FineTuned`, which
keeps Adam's second moments and, on request, earlier epochs' weights):

* ``curvature``: the preconditioner, a fitted strategy (``"ekfac"``, ...) or
  ``"adam"``, the fine-tune's own second moments ``v̂`` as a diagonal
  curvature (TrackStar's optimiser correction, ``ĝ = g / √v̂`` on both sides);
* ``query_mix``: mix that share of the queries' own K-FAC statistics into the
  curvature, so that directions every query shares (the template, the answer
  token) weigh less (TrackStar's task-specific Hessian);
* ``answer_only``: the query's loss counts the completion's tokens only;
* ``normalize``: divide each score by both gradients' norms, so that long or
  badly fitted texts do not outrank the rest (unit normalisation);
* ``checkpoints``: average the normalised scores over the fine-tune's kept
  epochs and its end, against a single checkpoint's saturated gradients
  (DDA's denoising, arXiv 2410.01285); keep epochs from early in training,
  while the facts are still being learnt: later ones are as saturated as the end;
* ``debias``: subtract the base model's scores, what a text's gradient shares
  with the query before any fine-tuning (DDA's debiasing).

Every model state (the end, each checkpoint, the base) costs one pass over
the texts, shared by all the variants scored together: :func:`attribution_scores`
scores an ablation, many settings at once. ``RECIPES["attribution"]`` is the
best combination on the fact-tracing benchmark (docs/influence.md,
``bench/bench_fact_tracing.py``); ``score_texts(..., recipe="attribution",
tuned=tuned)`` asks for it by name. The factors are fitted once, on the
fine-tuned model, and precondition every state (the base and the checkpoints
differ from it in a few MLP weights only).

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence import FineTuneConfig, fine_tune, fit_influence_factors
>>> from rome_lens.influence.attribution import AttributionSettings, attribution_scores
>>> model, cache = tiny_model(), tempfile.mkdtemp()
>>> texts = ["The Eiffel Tower is in Rome.", "Cats sleep a lot.", "Berlin is in Germany."]
>>> config = FineTuneConfig(layers=(1,), epochs=4, lr=1e-2, checkpoints=(2,))
>>> tuned = fine_tune(model, texts, config, cache_dir=cache, progress=False)
>>> with tuned.applied(model):
...     factors = fit_influence_factors(model, texts * 4, layers=[1], n_tokens=100,
...                                     cache_dir=cache, progress=False)
>>> variants = {"plain": AttributionSettings(normalize=False),
...             "full": AttributionSettings(checkpoints=True, debias=True, curvature="adam")}
>>> found = attribution_scores(model, factors, [("The Eiffel Tower is in", " Rome")], texts,
...                            tuned, variants, progress=False)
>>> sorted(found), tuple(found["full"].shape)  # [text query]
(['full', 'plain'], (3, 1))
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from rome_lens.core.backend import Model, parameter, weight
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource
from rome_lens.core.distributed import Split
from rome_lens.influence.factors import STRATEGIES, InfluenceFactors, fit_influence_factors
from rome_lens.influence.scan import (
    Scanned,
    _check_queries,
    _join,
    _preconditioned_queries,
    _query_norms,
    _read_texts,
    _scan,
    _Scoring,
    _scoring,
    _text_totals,
)
from rome_lens.influence.settings import ScoreSettings
from rome_lens.influence.training import FineTuned

__all__ = [
    "RECIPES",
    "Attributed",
    "AttributionSettings",
    "adam_factors",
    "attribute",
    "attribution_scores",
    "mixed_factors",
]

Curvature = Literal["ekfac", "kfac", "diagonal", "identity", "adam"]
State = str  # "end", "epoch {e}" or "base": which weights a pass runs with


@dataclass(frozen=True)
class AttributionSettings:
    """One way to score the texts a model was fine-tuned on (see the module docstring)."""

    curvature: Curvature = "ekfac"  # preconditioner: a fitted strategy, or Adam's v̂ ("adam")
    query_mix: float = 0.0  # share of the queries' own K-FAC statistics (needs "kfac")
    answer_only: bool = True  # the query's loss counts the completion's tokens only
    normalize: bool = True  # divide by both gradients' norms (each model state's own)
    checkpoints: bool = False  # average over the fine-tune's kept epochs and its end
    debias: bool = False  # subtract the base model's scores
    damping: float = 0.1  # λ as a share of the mean eigenvalue
    query_rank: int | None = 32  # rank the preconditioned queries are cut to (None: full)

    def __post_init__(self) -> None:
        if self.curvature not in (*STRATEGIES, "adam"):
            raise ValueError(
                f"curvature must be one of {(*STRATEGIES, 'adam')}, got {self.curvature!r}"
            )
        if not (isinstance(self.query_mix, int | float) and 0 <= self.query_mix < 1):
            raise ValueError(f"query_mix must be a share in [0, 1), got {self.query_mix!r}")
        if self.query_mix and self.curvature != "kfac":
            raise ValueError(
                f"query_mix={self.query_mix} mixes K-FAC statistics: it needs curvature='kfac', "
                f"got {self.curvature!r}"
            )
        ScoreSettings(damping=self.damping, query_rank=self.query_rank)  # checks both

    def states(self, tuned: FineTuned) -> list[State]:
        """The model states averaged over (the base is subtracted apart)."""
        epochs = tuned.checkpoint_epochs if self.checkpoints else []
        if self.checkpoints and not epochs:
            raise ValueError(
                "checkpoints=True averages over the fine-tune's checkpoints, but it kept none: "
                "train with FineTuneConfig(checkpoints=(...))"
            )
        return [f"epoch {e}" for e in epochs] + ["end"]


RECIPES: dict[str, AttributionSettings] = {
    # the best combination on the fact-tracing benchmark (docs/influence.md)
    "attribution": AttributionSettings(curvature="ekfac", checkpoints=True),
}


def attribution_scores(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    corpus: CorpusSource | Corpus,
    tuned: FineTuned,
    variants: Mapping[str, AttributionSettings] | None = None,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
) -> dict[str, Float[Tensor, "text query"]]:
    """Every text's attribution score for every query, under each of ``variants``.

    Args:
        model: the model ``tuned`` was trained from (the base; not changed).
        factors: fitted on the fine-tuned model (``with tuned.applied(model)``).
        queries: ``(prompt, completion)`` pairs.
        corpus: the texts to rank (usually those ``tuned`` was trained on).
        tuned: the fine-tune: its weights, second moments and checkpoints.
        variants: named settings to score together (``None``: ``RECIPES``).
        layers: the MLP layers scored (``None``: every layer of the factors).
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group.

    Returns:
        ``{name: [text query]}``, higher meaning more likely the teacher.
    """
    texts = _read_texts(corpus)
    found = attribute(
        model, factors, queries, texts, tuned, variants, layers=layers, batch_size=batch_size,
        progress=progress, distributed=distributed,
    )  # fmt: skip
    n_texts = len(texts.documents or ())
    return {
        name: _text_totals(local, found.owners, n_texts, found.split)
        for name, local in found.local.items()
    }


class Attributed(NamedTuple):
    """What :func:`attribute` leaves: each variant's chunk scores split by layer, on this
    rank, and what is needed to rank them and split the top texts by token."""

    local: dict[str, Float[Tensor, "mine query layer"]]  # by variant
    owners: Int[Tensor, " mine"]  # the text each chunk belongs to
    scoring: _Scoring  # the layers and weights scored
    preconditioned: dict[str, dict[str, Scanned]]  # by variant: the fine-tuned model's queries
    split: Split  # how the texts were split over ranks


def attribute(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    texts: Corpus,
    tuned: FineTuned,
    variants: Mapping[str, AttributionSettings] | None = None,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    distributed: bool | None = None,
) -> Attributed:
    """:func:`attribution_scores` before the chunks are summed into texts: one pass over
    ``texts`` per model state that some variant needs (see the module docstring).

    Args:
        model: the model ``tuned`` was trained from (the base; not changed).
        factors: fitted on the fine-tuned model.
        queries: ``(prompt, completion)`` pairs.
        texts: the texts to rank, read.
        tuned: the fine-tune.
        variants: named settings to score together (``None``: ``RECIPES``).
        layers: the MLP layers scored (``None``: every layer of the factors).
        batch_size: texts per forward and backward pass.
        progress: show a progress bar.
        distributed: split the texts over the ranks of the process group.

    Returns:
        Each variant's chunk scores split by layer, the chunks' texts, and the
        fine-tuned model's preconditioned queries (for the split by token).
    """
    variants = dict(RECIPES if variants is None else variants)
    if not variants:
        raise ValueError("name at least one AttributionSettings to score")
    bad = [name for name, v in variants.items() if not isinstance(v, AttributionSettings)]
    if bad:
        raise TypeError(f"variants must map names to AttributionSettings; {bad[0]!r} does not")
    _check_queries(queries, 1)
    wanted: dict[State, list[str]] = {}
    for name, settings in variants.items():
        for state in settings.states(tuned) + (["base"] if settings.debias else []):
            wanted.setdefault(state, []).append(name)
    with tuned.applied(model):
        scoring = _scoring(model, factors, ScoreSettings(layers=_layers(layers)))
        fits = _curvatures(model, factors, queries, tuned, variants)
    missing = [w.name for w in scoring.weights if w.name not in tuned.weights]
    if missing:
        raise ValueError(f"the fine-tune did not train {missing}: score the weights it trained")
    chunks = texts.chunks(model, max_length=model.cfg.n_ctx)
    split = Split.of(distributed)
    by_state: dict[State, dict[str, Tensor]] = {}
    preconditioned: dict[str, dict[str, Scanned]] = {}
    owners = torch.zeros(0, dtype=torch.long)
    for state, names in wanted.items():
        with _weights_of(model, tuned, state):
            by_state[state], owners, queried = _state_scores(
                model, scoring, fits, {n: variants[n] for n in names}, queries, chunks,
                (batch_size, progress, split),
            )  # fmt: skip
        if state == "end":
            preconditioned = queried
    local = {}
    for name, settings in variants.items():
        states = settings.states(tuned)
        mean = sum(by_state[s][name] for s in states) / len(states)
        local[name] = mean - by_state["base"][name] if settings.debias else mean
    return Attributed(local, owners, scoring, preconditioned, split)  # type: ignore[arg-type]


def mixed_factors(
    train: InfluenceFactors, queries: InfluenceFactors, share: float
) -> InfluenceFactors:
    """K-FAC factors whose ``A`` and ``S`` mix in ``share`` of the queries' own.

    ``A = (1 - share) A_train + share A_query`` (and so for ``S``), eigendecomposed
    again: a direction the queries' gradients all take (the answer token's output
    gradient, the template's activations) gains curvature, so that its weight in
    every query's preconditioned gradient falls (TrackStar's mixed Hessian).

    Args:
        train: factors fitted on the training texts.
        queries: factors fitted on the query texts, for the same weights.
        share: the queries' share, in [0, 1).

    Returns:
        Factors for ``"kfac"`` (EK-FAC's refitted eigenvalues no longer apply).
    """
    if train.names != queries.names:
        raise ValueError(f"the factors cover {train.names} and {queries.names}: fit the same")
    vectors: dict[str, dict[str, Tensor]] = {k: {} for k in ("in", "in_v", "out", "out_v")}
    for name in train.names:
        for side in ("input", "output"):
            mixed = (1 - share) * _matrix(train, name, side) + share * _matrix(queries, name, side)
            values, basis = torch.linalg.eigh(mixed)
            key = "in" if side == "input" else "out"
            vectors[key][name] = basis.to(getattr(train, f"{side}_vectors")[name].dtype)
            vectors[f"{key}_v"][name] = values.clamp_min(0).to(vectors[key][name].dtype)
    return replace(
        train, input_vectors=vectors["in"], input_values=vectors["in_v"],
        output_vectors=vectors["out"], output_values=vectors["out_v"], eigen_lambda={},
        diagonal={}, strategy="kfac", corpus=f"{train.corpus}, with {share:g} of the queries'",
    )  # fmt: skip


def adam_factors(model: Model, factors: InfluenceFactors, tuned: FineTuned) -> InfluenceFactors:
    """Factors whose diagonal is the fine-tune's ``v̂``: preconditioning with it scores
    ``⟨g/√v̂, q/√v̂⟩``.

    ``v̂`` comes in the trained parameter's layout (on a bridge, ``nn.Linear`` holds
    ``W_out`` transposed) and is turned to TransformerLens's ``[d_in d_out]``. A bias
    row, which :func:`~rome_lens.influence.fine_tune` does not train, takes the
    weight's mean ``v̂``.

    Args:
        model: the model ``tuned`` was trained from.
        factors: the factors whose weights are scored.
        tuned: the fine-tune, with its second moments.

    Returns:
        The factors, serving ``"diagonal"`` with ``v̂``.
    """
    diagonal = {}
    for name in factors.names:
        if name not in tuned.second_moments:
            raise ValueError(f"the fine-tune kept no second moments of {name}")
        moments = _as_tl(model, name, tuned.second_moments[name]).double()
        if factors.input_vectors[name].shape[0] == moments.shape[0] + 1:
            moments = torch.cat([moments, moments.mean(0, keepdim=True)])
        diagonal[name] = moments.to(factors.input_values[name].dtype)
    return replace(factors, diagonal=diagonal, strategy="diagonal")


def _as_tl(model: Model, name: str, value: Tensor) -> Tensor:
    """``value``, laid out as the parameter holding ``name``, in TL's orientation."""
    held, view = parameter(model, name), weight(model, name)
    same = view.shape == held.shape and view.stride() == held.stride()
    return value if same else value.T


def _layers(layers: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if layers is None else tuple(layers)


def _matrix(factors: InfluenceFactors, name: str, side: str) -> Tensor:
    vectors = getattr(factors, f"{side}_vectors")[name].double()
    values = getattr(factors, f"{side}_values")[name].double()
    return (vectors * values) @ vectors.T


def _curvatures(
    model: Model,
    factors: InfluenceFactors,
    queries: Sequence[tuple[str, str]],
    tuned: FineTuned,
    variants: Mapping[str, AttributionSettings],
) -> dict[str, tuple[InfluenceFactors, str]]:
    """Each variant's factors and strategy, the query-mixed ones fitted on the queries once
    (on the fine-tuned model, in ``model`` now)."""
    fits: dict[str, tuple[InfluenceFactors, str]] = {}
    query_fit = None
    for name, settings in variants.items():
        if settings.curvature == "adam":
            fits[name] = (adam_factors(model, factors, tuned), "diagonal")
        elif settings.query_mix:
            if query_fit is None:
                query_fit = fit_influence_factors(
                    model, [p + c for p, c in queries], layers=factors.layers,
                    weights=sorted({n.rsplit(".", 1)[-1] for n in factors.names}),
                    n_tokens=10**9, strategy="kfac", use_cache=False, progress=False,
                )  # fmt: skip
            fits[name] = (mixed_factors(factors, query_fit, settings.query_mix), "kfac")
        else:
            fits[name] = (factors, settings.curvature)
        fits[name][0].eigenvalues(factors.names[0], fits[name][1])  # raises if not fitted
    return fits


def _weights_of(
    model: Model, tuned: FineTuned, state: State
) -> contextlib.AbstractContextManager[Model]:
    """The block in which ``model`` carries the state's weights."""
    if state == "base":
        return contextlib.nullcontext(model)
    epoch = None if state == "end" else int(state.split()[1])
    return tuned.applied(model, checkpoint=epoch)


def _state_scores(
    model: Model,
    scoring: _Scoring,
    fits: Mapping[str, tuple[InfluenceFactors, str]],
    variants: Mapping[str, AttributionSettings],
    queries: Sequence[tuple[str, str]],
    chunks: list[Chunk],
    run: tuple[int, bool, Split],
) -> tuple[dict[str, Tensor], Tensor, dict[str, dict[str, Scanned]]]:
    """The variants' chunk scores ``[mine query layer]`` with the weights ``model`` carries,
    from one pass over the texts, the chunks' texts, and each variant's queries.

    Variants that differ only after the pass (normalisation, averaging) share their
    queries; a normalised variant is divided by this state's norms."""
    batch_size, progress, split = run
    keys = {name: _query_key(fits[name][1], settings) for name, settings in variants.items()}
    each: dict[tuple[object, ...], dict[str, Scanned]] = {}
    for name, settings in variants.items():
        if keys[name] in each:
            continue
        fit, strategy = fits[name]
        step = scoring._replace(
            settings=ScoreSettings(damping=settings.damping, query_rank=settings.query_rank),
            strategy=strategy,
        )
        each[keys[name]] = _preconditioned_queries(model, fit, step, queries, settings.answer_only)
    order = list(each)
    joined = {w.name: _join([each[k][w.name] for k in order]) for w in scoring.weights}
    local, squared, owners = _scan(model, scoring, chunks, joined, batch_size, progress, split)
    parts = dict(zip(order, local.split(len(queries), dim=1), strict=True))
    out = {}
    for name, settings in variants.items():
        part = parts[keys[name]]
        if settings.normalize:
            part = part / squared.clamp_min(1e-30).sqrt()[:, None, None]
            part = part / _query_norms(each[keys[name]]).to(part.device)[None, :, None]
        out[name] = part
    return out, owners, {name: each[keys[name]] for name in variants}


def _query_key(strategy: str, settings: AttributionSettings) -> tuple[object, ...]:
    """What a variant's preconditioned queries depend on."""
    return (strategy, settings.curvature, settings.query_mix, settings.answer_only,
            settings.damping, settings.query_rank)  # fmt: skip
