"""The results of causal tracing: one trace, a severed trace, and effects averaged over facts.

Each is a :class:`~rome_lens.core.results.Result`: ``to_dataframe()``,
``plot()``, ``widget()``, ``save(path)``/``load(path)``.

A trace only says where a fact is stored when the model knows the fact and
the noise on the subject makes it forget: :attr:`CausalTrace.problems` says
when either fails (the clean probability is under 0.1, or corruption lowers
it by less than 0.05), and :func:`~rome_lens.tracing.trace_fact` warns.

>>> import torch
>>> from rome_lens.tracing.results import CausalTrace
>>> scores = torch.tensor([[[0.02, 0.02], [0.02, 0.05], [0.03, 0.04]]])  # (kind, token, layer)
>>> trace = CausalTrace(prompt="Paris is", subject="Paris", kinds=("mlp",), scores=scores,
...                     clean_prob=0.04, corrupted_prob=0.02, str_tokens=["<s>", "Paris", " is"],
...                     subject_range=(1, 2), target_token=7, target_str=" France",
...                     noise_scale=0.1, seed=0, samples=2, window=1)
>>> (trace.peak("mlp").str_token, trace.peak("mlp").layer)
('Paris', 1)
>>> len(trace.problems)  # p = 0.04 is too low, and the noise lowers it by only 0.02
2
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pandas as pd
from jaxtyping import Float, Int
from torch import Tensor

from rome_lens.core.results import Result, register_type

__all__ = [
    "MIN_CLEAN_PROB",
    "MIN_DROP",
    "TOKEN_GROUPS",
    "AverageEffects",
    "CausalTrace",
    "SeveredTrace",
    "TracePeak",
    "UnreliableTraceWarning",
]

MIN_CLEAN_PROB = 0.1  # below this the model does not know the answer it is traced on
MIN_DROP = 0.05  # corruption must lower the answer's probability by at least this much
TOKEN_GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


class UnreliableTraceWarning(UserWarning):
    """A trace that cannot show where a fact is stored (see :attr:`CausalTrace.problems`)."""


@register_type("trace_peak")
@dataclass(frozen=True)
class TracePeak:
    """The (token, layer) whose restoration brings back the most probability."""

    kind: str
    """"resid", "mlp" or "attn"."""
    token: int
    """Position in the prompt."""
    str_token: str
    """That token as text."""
    layer: int
    """The layer (the window's centre for "mlp" and "attn")"""
    score: float
    """Probability of the target with this state restored."""
    indirect_effect: float
    """Score minus the corrupted probability."""


@dataclass
class CausalTrace(Result):
    """The result of :func:`~rome_lens.tracing.trace_fact`: one score per (kind, token, layer)."""

    kind = "causal_trace"
    prompt: str
    """The traced prompt."""
    subject: str
    """The substring whose embeddings were noised."""
    kinds: tuple[str, ...]
    """The kinds of state restored, in the order of `scores`."""
    scores: Float[Tensor, "kind pos layer"]
    """P(target) with (token, layer) restored."""
    clean_prob: float
    """P(target) on the clean prompt."""
    corrupted_prob: float
    """P(target) with the subject corrupted, nothing restored."""
    str_tokens: list[str]
    """The prompt's tokens as text (BOS included)"""
    subject_range: tuple[int, int]
    """[first, last + 1) subject token positions."""
    target_token: int
    """The scored token (the first token of the answer)"""
    target_str: str
    """That token as text."""
    noise_scale: float
    """Standard deviation of the embedding noise."""
    seed: int
    """Seed of the noise."""
    samples: int
    """Noise draws averaged per score."""
    window: int
    """Layers restored together for "mlp" and "attn"."""
    fingerprint: str = ""
    """model_fingerprint of the traced model."""

    def indirect_effect(self) -> Float[Tensor, "kind pos layer"]:
        """How much probability each restoration brings back: ``scores - corrupted_prob``."""
        return self.scores - self.corrupted_prob

    def kind_scores(self, kind: str) -> Float[Tensor, "pos layer"]:
        """The (token, layer) grid of one kind."""
        if kind not in self.kinds:
            raise ValueError(f"kind {kind!r} was not traced; this trace has {self.kinds}")
        return self.scores[self.kinds.index(kind)]

    def peak(self, kind: str) -> TracePeak:
        """The (token, layer) with the largest score for ``kind``."""
        grid = self.kind_scores(kind)
        token, layer = divmod(int(grid.argmax()), grid.shape[1])
        score = float(grid[token, layer])
        return TracePeak(
            kind, token, self.str_tokens[token], layer, score, score - self.corrupted_prob
        )

    @property
    def problems(self) -> list[str]:
        """Why this trace cannot show where the fact is stored (empty when it can)."""
        return trace_problems(self.target_str, self.clean_prob, self.corrupted_prob)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (kind, token, layer)."""
        first, last = self.subject_range
        rows = [
            {
                "kind": kind,
                "token": t,
                "str_token": self.str_tokens[t],
                "layer": layer,
                "is_subject": first <= t < last,
                "score": float(self.scores[k, t, layer]),
                "indirect_effect": float(self.scores[k, t, layer]) - self.corrupted_prob,
            }
            for k, kind in enumerate(self.kinds)
            for t in range(len(self.str_tokens))
            for layer in range(self.scores.shape[2])
        ]
        return pd.DataFrame(rows)


@dataclass
class SeveredTrace(Result):
    """The result of :func:`~rome_lens.tracing.trace_severed`, one score per layer at one token."""

    kind = "severed_trace"
    prompt: str
    """The traced prompt."""
    subject: str
    """The substring whose embeddings were noised."""
    severed: str
    """The kind whose outputs stay corrupted at `token` in every later layer."""
    token: int
    """The position restored."""
    str_tokens: list[str]
    """The prompt's tokens as text."""
    subject_range: tuple[int, int]
    """[first, last + 1) subject token positions."""
    scores: Float[Tensor, " layer"]
    """Restore resid_post at (token, layer)"""
    severed_scores: Float[Tensor, " layer"]
    """The same, with `severed` frozen corrupted."""
    clean_prob: float
    """P(target) on the clean prompt."""
    corrupted_prob: float
    """P(target) with the subject corrupted."""
    target_token: int
    """The scored token."""
    target_str: str
    """That token as text."""
    noise_scale: float
    """Standard deviation of the embedding noise."""
    seed: int
    """Seed of the noise."""
    samples: int
    """Noise draws averaged per score."""
    fingerprint: str = ""
    """model_fingerprint of the traced model."""

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer, with and without the severed path."""
        return pd.DataFrame(
            {
                "layer": range(len(self.scores)),
                "score": self.scores.tolist(),
                f"score_{self.severed}_severed": self.severed_scores.tolist(),
            }
        )


@dataclass
class AverageEffects(Result):
    """Indirect effects averaged over facts, by ROME's token groups."""

    kind = "average_effects"
    kinds: tuple[str, ...]
    """The kinds of state restored."""
    groups: tuple[str, ...]
    """ROME's token groups (TOKEN_GROUPS)"""
    mean: Float[Tensor, "kind group layer"]
    """Mean indirect effect."""
    ci95: Float[Tensor, "kind group layer"]
    """Half-width of the 95% confidence interval."""
    counts: Int[Tensor, " group"]
    """Facts that have a token in each group."""
    n_facts: int
    """Facts traced."""
    traces: list[CausalTrace] = field(repr=False)
    """Every fact's trace."""

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (kind, group, layer)."""
        rows = [
            {
                "kind": kind,
                "group": group,
                "layer": layer,
                "mean": float(self.mean[k, g, layer]),
                "ci95": float(self.ci95[k, g, layer]),
                "n": int(self.counts[g]),
            }
            for k, kind in enumerate(self.kinds)
            for g, group in enumerate(self.groups)
            for layer in range(self.mean.shape[2])
        ]
        return pd.DataFrame(rows)


def trace_problems(target: str, clean_prob: float, corrupted_prob: float) -> list[str]:
    """The reasons a trace of ``target`` cannot locate the fact (see the module docstring)."""
    problems = []
    if clean_prob < MIN_CLEAN_PROB:
        problems.append(
            f"the model gives {target!r} p = {clean_prob:.3f} on the clean prompt "
            f"(below {MIN_CLEAN_PROB}): it does not know this answer, so the trace cannot "
            "show where a fact is stored; check the target, or trace a fact the model knows"
        )
    if clean_prob - corrupted_prob < MIN_DROP:
        problems.append(
            f"corrupting the subject moves p({target!r}) only from {clean_prob:.3f} to "
            f"{corrupted_prob:.3f} (a drop under {MIN_DROP}): the answer does not depend on "
            "the subject, so restoring states cannot show where it is recalled"
        )
    return problems


def warn_if_unreliable(trace: CausalTrace | SeveredTrace) -> None:
    """Warn with :class:`UnreliableTraceWarning` for each of the trace's problems."""
    for problem in trace_problems(trace.target_str, trace.clean_prob, trace.corrupted_prob):
        warnings.warn(problem, UnreliableTraceWarning, stacklevel=3)
