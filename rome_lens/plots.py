"""Matplotlib figures of rome_lens results, in the style of the ROME paper.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so they
work the same in scripts, tests and notebooks, where returning one displays it.

>>> import rome_lens
>>> from rome_lens.plots import plot_trace
>>> model = rome_lens.tiny_model()
>>> trace = rome_lens.trace_fact(model, "The Eiffel Tower is located in", "The Eiffel Tower",
...                              samples=2, progress=False)
>>> fig = plot_trace(trace)
>>> len(fig.axes)  # three heatmaps and their colour bars
6
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from rome_lens.lens import LogitLens
    from rome_lens.tracing import AverageEffects, CausalTrace, SeveredTrace

__all__ = ["plot_average_effects", "plot_logit_lens", "plot_severed", "plot_trace", "save_figure"]

_STYLE = {  # colour map and panel title per kind, as in ROME's figures
    "resid": ("Purples", "single restored layer"),
    "mlp": ("Greens", "center of interval of {w} restored MLP layers"),
    "attn": ("Reds", "center of interval of {w} restored attention layers"),
}
_COLOURS = {"resid": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` (PNG, SVG, PDF: by the suffix); a path without a suffix gets ``.png``."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _panels(n: int, axes: list[Axes] | None, width: float, height: float) -> list[Axes]:
    if axes is not None:
        if len(axes) != n:
            raise ValueError(f"need {n} axes, got {len(axes)}")
        return list(axes)
    fig = Figure(figsize=(width * n, height), layout="constrained")
    return list(np.atleast_1d(fig.subplots(1, n)))


def plot_trace(trace: CausalTrace, *, axes: list[Axes] | None = None) -> Figure:
    """One heatmap of P(target) per kind: tokens down, layers across, subject tokens starred."""
    n_pos = len(trace.str_tokens)
    panels = _panels(len(trace.kinds), axes, 4.2, 0.35 * n_pos + 1.6)
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


def plot_severed(severed: SeveredTrace, *, ax: Axes | None = None) -> Figure:
    """Bars of the indirect effect of each layer's residual state, with and without the path."""
    (ax,) = _panels(1, None if ax is None else [ax], 7.0, 3.0)
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


def plot_average_effects(result: AverageEffects, *, axes: list[Axes] | None = None) -> Figure:
    """Mean indirect effect by layer for each token group, with 95% confidence bands."""
    panels = _panels(len(result.kinds), axes, 4.5, 3.2)
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
    lens: LogitLens, *, before: LogitLens | None = None, axes: list[Axes] | None = None
) -> Figure:
    """Rank (log scale) and probability of each target at the last token, by layer.

    ``before``, the unedited model's lens of the same prompt, is drawn dashed.
    """
    rank_ax, prob_ax = _panels(2, axes, 4.6, 3.2)
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
