"""Matplotlib figures of rome_lens results, in the style of the ROME paper.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so they
work the same in scripts, tests and notebooks, where returning one displays it.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.tracing import trace_fact
>>> from rome_lens.viz.plots import plot_trace
>>> model = tiny_model()
>>> with warnings.catch_warnings(record=True):
...     trace = trace_fact(model, "The Eiffel Tower is located in", "The Eiffel Tower",
...                        samples=2, progress=False)
>>> fig = plot_trace(trace)
>>> len(fig.axes)  # three heatmaps and their colour bars
6
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rome_lens.analysis import LogitLens
from rome_lens.core.precision import to_host
from rome_lens.core.results import Result, register_view
from rome_lens.editing import WeightEdit
from rome_lens.evaluation import Evaluation, SequentialCurve
from rome_lens.stats import KeyStats, Moments
from rome_lens.tracing import AverageEffects, CausalTrace, SeveredTrace
from rome_lens.viz.html import output_path

__all__ = [
    "AxesArg",
    "axes_for",
    "figure_of",
    "plot_average_effects",
    "plot_edit",
    "plot_evaluation",
    "plot_logit_lens",
    "plot_sequential",
    "plot_severed",
    "plot_spectrum",
    "plot_trace",
    "save_figure",
]

AxesArg = Axes | Sequence[Axes] | None

_STYLE = {  # colour map and panel title per kind, as in ROME's figures
    "resid": ("Purples", "single restored layer"),
    "mlp": ("Greens", "center of interval of {w} restored MLP layers"),
    "attn": ("Reds", "center of interval of {w} restored attention layers"),
}
_COLOURS = {"resid": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` (PNG, SVG, PDF: by the suffix); a path without a suffix gets ``.png``.

    Args:
        fig: the figure.
        path: where to write it; the suffix picks the format.

    Returns:
        The path written.
    """
    path = output_path(path, ".png")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def axes_for(n: int, axes: AxesArg, width: float, height: float) -> list[Axes]:
    """The ``n`` Axes to draw into: those given, or a new figure's.

    Args:
        n: how many panels the figure has.
        axes: an Axes, a list of ``n`` of them, or ``None`` for a new figure.
        width: a new figure's width per panel, in inches.
        height: a new figure's height, in inches.

    Returns:
        The Axes.
    """
    if isinstance(axes, Axes):
        axes = [axes]
    if axes is not None:
        if len(axes) != n:
            raise ValueError(f"need {n} axes, got {len(axes)}")
        return list(axes)
    fig = Figure(figsize=(width * n, height), layout="constrained")
    return list(np.atleast_1d(fig.subplots(1, n)))


def plot_trace(trace: CausalTrace, ax: AxesArg = None) -> Figure:
    """One heatmap of P(target) per kind: tokens down, layers across, subject tokens starred.

    Args:
        trace: the result of ``trace_fact``.
        ax: one Axes per kind to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    n_pos = len(trace.str_tokens)
    panels = axes_for(len(trace.kinds), ax, 4.2, 0.35 * n_pos + 1.6)
    first, last = trace.subject_range
    labels = [
        f"{tok!r}*" if first <= i < last else repr(tok) for i, tok in enumerate(trace.str_tokens)
    ]
    for ax, kind in zip(panels, trace.kinds, strict=True):
        cmap, title = _STYLE[kind]
        grid = trace.kind_scores(kind).numpy()
        image = ax.pcolormesh(grid, cmap=cmap, vmin=trace.corrupted_prob)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(n_pos) + 0.5, labels, fontsize=8)
        ax.set_xlabel(title.format(w=trace.window))
        ax.set_title(f"Restoring {kind} after corrupting the subject", fontsize=9)
        bar = ax.figure.colorbar(image, ax=ax)
        bar.set_label(f"p({trace.target_str!r})", fontsize=8)
    fig = panels[0].figure
    assert isinstance(fig, Figure)
    return fig


def plot_severed(severed: SeveredTrace, ax: AxesArg = None) -> Figure:
    """Bars of the indirect effect of each layer's residual state, with and without the path.

    Args:
        severed: the result of ``trace_severed``.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (ax,) = axes_for(1, ax, 7.0, 3.0)
    layers = np.arange(len(severed.scores))
    base = severed.corrupted_prob
    ax.bar(layers - 0.2, severed.scores.numpy() - base, 0.4, label="effect of single state")
    ax.bar(
        layers + 0.2,
        severed.severed_scores.numpy() - base,
        0.4,
        label=f"with {severed.severed} severed",
        color=_COLOURS[severed.severed],
    )
    token = severed.str_tokens[severed.token]
    ax.set_title(f"Indirect effect at token {token!r}", fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("indirect effect")
    ax.legend(fontsize=8)
    fig = ax.figure
    assert isinstance(fig, Figure)
    return fig


def plot_average_effects(result: AverageEffects, ax: AxesArg = None) -> Figure:
    """Mean indirect effect by layer for each token group, with 95% confidence bands.

    Args:
        result: the result of ``average_causal_effects``.
        ax: one Axes per kind to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    panels = axes_for(len(result.kinds), ax, 4.5, 3.2)
    layers = np.arange(result.mean.shape[2])
    for k, (ax, kind) in enumerate(zip(panels, result.kinds, strict=True)):
        for g, group in enumerate(result.groups):
            mean, ci = result.mean[k, g].numpy(), result.ci95[k, g].numpy()
            if np.isnan(mean).all():
                continue
            (line,) = ax.plot(layers, mean, label=group)
            ax.fill_between(layers, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
        ax.set_title(f"Average indirect effect of {kind} ({result.n_facts} facts)", fontsize=9)
        ax.set_xlabel("layer")
    panels[0].set_ylabel("indirect effect on p(answer)")
    panels[-1].legend(fontsize=7)
    fig = panels[0].figure
    assert isinstance(fig, Figure)
    return fig


def plot_logit_lens(
    lens: LogitLens, ax: AxesArg = None, *, before: LogitLens | None = None
) -> Figure:
    """Rank (log scale) and probability of each target at the last token, by layer.

    ``before``, the unedited model's lens of the same prompt, is drawn dashed.

    Args:
        lens: the result of ``logit_lens``.
        ax: two Axes (rank, probability) to draw into (``None``: a new figure).
        before: the unedited model's lens of the same prompt, drawn dashed.

    Returns:
        The figure.
    """
    rank_ax, prob_ax = axes_for(2, ax, 4.6, 3.2)
    layers = np.arange(lens.n_layers)
    for t, target in enumerate(lens.targets):
        series = [(lens, "-", repr(target))]
        if before is not None and t < len(before.targets):
            series.append((before, "--", f"{target!r} before"))
        colour = None
        for source, style, label in series:
            ranks = source.target_ranks[:, t].numpy() + 1
            probs = source.target_log_probs[:, t].exp().numpy()
            (line,) = rank_ax.plot(layers, ranks, style, color=colour, label=label)
            colour = line.get_color()
            prob_ax.plot(layers, probs, style, color=colour, label=label)
    rank_ax.set_yscale("log")
    rank_ax.invert_yaxis()
    rank_ax.set_ylabel("rank at the last token (1 = top)")
    prob_ax.set_ylabel("probability at the last token")
    prob_ax.set_ylim(0, 1)
    for ax in (rank_ax, prob_ax):
        ax.set_xlabel("layer (resid_post through ln_final and W_U)")
    rank_ax.set_title(f"Logit lens: {lens.prompt!r}", fontsize=9, loc="left")
    prob_ax.legend(fontsize=8)
    fig = rank_ax.figure
    assert isinstance(fig, Figure)
    return fig


def plot_spectrum(stats: KeyStats | Moments, ax: AxesArg = None) -> Figure:
    """The eigenvalues of a second moment, largest first, on a log scale.

    Args:
        stats: key statistics or moments.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 5.0, 3.2)
    moment = stats.moment if isinstance(stats, KeyStats) else stats.second_moment
    values = to_host(torch.linalg.eigvalsh(moment.double())).numpy()[::-1]  # on its device
    panel.semilogy(np.arange(1, len(values) + 1), np.clip(values, 1e-300, None))
    hook = stats.moments.hook if isinstance(stats, KeyStats) else stats.hook
    count = stats.n_tokens if isinstance(stats, KeyStats) else stats.count
    panel.set_title(f"Eigenvalues of E[x xᵀ] at {hook} ({count:,} tokens)", fontsize=9)
    panel.set_xlabel("index (largest first)")
    panel.set_ylabel("eigenvalue")
    return figure_of(panel)


def plot_edit(edit: WeightEdit, ax: AxesArg = None) -> Figure:
    """P(new answer) on each request's prompt before and after the edit (up to 40 requests).

    Args:
        edit: any edit.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 7.0, 3.0)
    outcomes = edit.outcomes[:40]
    if not outcomes:
        norms = [float(d.norm()) for d in edit.deltas().values()]
        panel.bar(range(len(norms)), norms)
        panel.set_xticks(range(len(norms)), list(edit.deltas()), rotation=30, fontsize=7)
        panel.set_ylabel("‖ΔW‖")
        return figure_of(panel)
    x = np.arange(len(outcomes))
    panel.bar(x - 0.2, [o.p_new_before for o in outcomes], 0.4, label="before", color="0.6")
    panel.bar(x + 0.2, [o.p_new for o in outcomes], 0.4, label="after", color="tab:green")
    missed = [i for i, o in enumerate(outcomes) if not o.took]
    if missed:
        panel.scatter(
            missed,
            [outcomes[i].p_new for i in missed],
            marker="x",
            color="tab:red",
            label="did not take",
            zorder=3,
        )
    panel.set_xticks(x, [o.target_new for o in outcomes], rotation=60, fontsize=7)
    panel.set_ylabel("P(new answer)")
    took = len(edit.outcomes) - len(edit.misses)
    panel.set_title(
        f"{type(edit).__name__}: {took} of {len(edit.outcomes)} requests took", fontsize=9
    )
    panel.legend(fontsize=7)
    return figure_of(panel)


def plot_evaluation(evaluation: Evaluation, ax: AxesArg = None) -> Figure:
    """ES, PS and NS before and after editing, per method (percent).

    Args:
        evaluation: the result of ``evaluate_edits``.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 6.0, 3.2)
    summary = evaluation.summary()
    metrics = ("ES", "PS", "NS")
    width = 0.8 / (2 * len(summary))
    for m, row in enumerate(summary.itertuples()):
        for s, stage in enumerate(("pre", "post")):
            offset = (2 * m + s) * width - 0.4 + width / 2
            values = [getattr(row, f"{stage}_{metric}") for metric in metrics]
            panel.bar(
                np.arange(3) + offset,
                values,
                width,
                label=f"{row.method} {stage}",
                hatch="" if stage == "post" else "//",
                alpha=1.0 if stage == "post" else 0.5,
            )
    panel.set_xticks(np.arange(3), metrics)
    panel.set_ylabel("score (%)")
    panel.set_ylim(0, 100)
    panel.legend(fontsize=7)
    return figure_of(panel)


def plot_sequential(curve: SequentialCurve, ax: AxesArg = None) -> Figure:
    """ES, PS and NS against the number of edits applied so far.

    Args:
        curve: the result of ``sequential_edits``.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 6.0, 3.2)
    table = curve.to_dataframe()
    for column, style in (("ES", "o-"), ("PS", "s-"), ("NS", "^-"), ("NS_unedited", "^--")):
        if column in table:
            panel.plot(table["edits"], table[column], style, label=column)
    panel.set_xlabel("edits applied")
    panel.set_ylabel("score (%)")
    panel.set_ylim(0, 100)
    panel.set_title(f"Sequential {curve.method} edits", fontsize=9)
    panel.legend(fontsize=7)
    return figure_of(panel)


def figure_of(panel: Axes) -> Figure:
    """The figure an Axes belongs to.

    Args:
        panel: the Axes.

    Returns:
        Its figure.
    """
    fig = panel.figure
    assert isinstance(fig, Figure)
    return fig


for _type, _plot in (
    (CausalTrace, plot_trace),
    (SeveredTrace, plot_severed),
    (AverageEffects, plot_average_effects),
    (LogitLens, plot_logit_lens),
    (KeyStats, plot_spectrum),
    (Moments, plot_spectrum),
    (WeightEdit, plot_edit),
    (Evaluation, plot_evaluation),
    (SequentialCurve, plot_sequential),
):
    register_view(_type, "plot")(_plot)
register_view(Result, "save_figure")(save_figure)
