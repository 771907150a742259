"""The settings of an influence scan: what is scored and how, apart from how the run goes.

:class:`ScoreSettings` holds the scoring math (which weights, which curvature
approximation, its damping, the query's rank, normalisation, the prefilter):
change one and the scores change. How the run goes (``batch_size``,
``progress``, ``distributed``) stays a keyword of each function, with one
meaning everywhere in rome_lens. The settings used to be keywords of their own;
:func:`settings_from_keywords` still accepts them, with a ``DeprecationWarning``.

>>> from rome_lens.influence import ScoreSettings
>>> settings = ScoreSettings(strategy="identity", layers=(2, 1), query_rank=32)
>>> settings.layers, settings.damping
((1, 2), 0.1)
>>> ScoreSettings(damping=-1.0)
Traceback (most recent call last):
    ...
ValueError: damping must be a finite number >= 0, got -1.0
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rome_lens.influence.factors import STRATEGIES, Strategy
from rome_lens.influence.weights import WEIGHT_KINDS

__all__ = ["ScoreSettings", "settings_from_keywords"]


@dataclass(frozen=True)
class ScoreSettings:
    """How texts are scored by :func:`~rome_lens.influence.influence`,
    :func:`~rome_lens.influence.influence_many` and :func:`~rome_lens.influence.score_texts`.

    Every field changes the scores; none changes how the run goes. Sequences are
    kept as tuples, so that settings compare and hash by value.
    """

    layers: tuple[int, ...] | None = None
    """The MLP layers whose weights are scored, ascending (``None``: every layer of the
    factors)."""
    weights: tuple[str, ...] | None = None
    """Which of ``"W_in"``, ``"W_gate"``, ``"W_out"`` are scored (``None``: those the factors
    were fitted for)."""
    strategy: Strategy | None = None
    """The curvature approximation: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``
    (``None``: the one the factors were fitted for)."""
    damping: float = 0.1
    """λ as a share of the mean eigenvalue, ``λ = damping × mean(Λ)`` (0.1, as Grosse et al.)."""
    query_rank: int | None = None
    """Cut each preconditioned query gradient to this rank (the paper's 32; ``None``: full)."""
    normalize: bool = False
    """Divide each score by the query's and the text chunk's gradient norms (with
    ``"identity"``: the gradients' cosine)."""
    prefilter: int | None = None
    """Score only the texts BM25 ranks in each query's top ``prefilter`` (``None``: every
    text)."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            self._set("layers", _checked_layers(self.layers))
        if self.weights is not None:
            self._set("weights", _checked_weights(self.weights))
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, int | float):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        for name in ("query_rank", "prefilter"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")

    def _set(self, name: str, value: object) -> None:
        """Store a field's normalised value (the dataclass is frozen to everyone else)."""
        object.__setattr__(self, name, value)


def settings_from_keywords(
    settings: ScoreSettings | None,
    keywords: Mapping[str, object],
    caller: str,
    accepted: Sequence[str] | None = None,
) -> ScoreSettings:
    """The settings of a call, also when given the old way, as keywords of the function.

    Scoring settings were keywords of ``influence``, ``influence_many`` and
    ``score_texts`` (``damping=0.1``, ``strategy="identity"``, ...). They are
    accepted for one release: the call warns once, with a ``DeprecationWarning``
    that shows the ``ScoreSettings`` to pass instead, and scores as that would.

    Args:
        settings: the ``settings=`` of the call (``None``: not given).
        keywords: the other keywords the call received.
        caller: the function's name, for the messages.
        accepted: the settings the function took as keywords (``None``: every field).

    Returns:
        ``settings``, or the default settings, or those the keywords describe.

    Raises:
        TypeError: a keyword that is no setting, or settings given both ways.
    """
    if not keywords:
        return ScoreSettings() if settings is None else settings
    fields = accepted or [field.name for field in dataclasses.fields(ScoreSettings)]
    unknown = [name for name in keywords if name not in fields]
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if settings is not None:
        raise TypeError(
            f"{caller}() takes the scoring settings as settings= or as keywords, not both: "
            f"move {sorted(keywords)} into the ScoreSettings"
        )
    replacement = ScoreSettings(**keywords)  # type: ignore[arg-type]
    given = ", ".join(f"{name}={value!r}" for name, value in keywords.items())
    warnings.warn(
        f"{caller}({given}) is deprecated and will be removed in the next release: pass "
        f"settings=ScoreSettings({given}) (from rome_lens.influence import ScoreSettings)",
        DeprecationWarning,
        stacklevel=3,
    )
    return replacement


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_layers(layers: object) -> tuple[int, ...]:
    """The layers as an ascending tuple, each once; raises naming a value that is no layer."""
    if isinstance(layers, str) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a sequence of layer indices or None, got {layers!r}")
    chosen = list(layers)
    bad = [layer for layer in chosen if not _is_int(layer) or layer < 0]
    if bad or not chosen:
        raise ValueError(
            f"layers must name at least one layer, each an integer >= 0, got {chosen!r}"
        )
    return tuple(sorted(set(chosen)))


def _checked_weights(weights: object) -> tuple[str, ...]:
    """The weight kinds as a tuple; raises naming a kind that is none of the MLP's."""
    if isinstance(weights, str) or not hasattr(weights, "__iter__"):
        raise ValueError(f"weights must be a sequence of weight kinds or None, got {weights!r}")
    chosen = list(weights)
    if not chosen or any(kind not in WEIGHT_KINDS for kind in chosen):
        raise ValueError(f"weights must name some of {WEIGHT_KINDS}, got {chosen}")
    return tuple(chosen)
