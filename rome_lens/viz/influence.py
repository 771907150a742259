"""Widgets and figures for influence functions.

* :func:`influence_widget`: the top texts with their scores, each text coloured
  token by token by its share of the score (circuitsvis ``ColoredTokens``, a
  slider picks the text), the split of each score by layer, and the
  distribution of all scores;
* :func:`plot_influence`: the scores' distribution, its tail on log–log axes
  (Grosse et al. find a power law there);
* :func:`plot_factors`: the spread of the fitted eigenvalues, weight by weight.

>>> import torch
>>> from rome_lens.influence import InfluenceResult
>>> from rome_lens.viz.influence import influence_widget
>>> result = InfluenceResult("Paris is the capital of", " France", "ekfac", [0], [1, 0],
...     ["France's capital is Paris.", "Cats sleep."], torch.tensor([2.0, 0.1]),
...     torch.tensor([[2.0], [0.1]]), [torch.tensor([0.5, 1.5]), torch.tensor([0.1])],
...     [["France", "'s capital is Paris."], ["Cats sleep."]], [0, 1], torch.tensor([0.1, 2.0]))
>>> widget = influence_widget(result)
>>> widget.to_dataframe()["text_id"].tolist(), 'class="influence-heatmap' in widget.html()
([1, 0], True)
"""

from __future__ import annotations

import html
import io

import numpy as np
import torch
from matplotlib.figure import Figure

from rome_lens.core.results import register_view
from rome_lens.influence import FineTuned, InfluenceFactors, InfluenceResult
from rome_lens.viz.html import CircuitsvisPart, Widget, code, placeholder
from rome_lens.viz.plots import AxesArg, axes_for, figure_of
from rome_lens.viz.svg import Heatmap, heatmap_panels

__all__ = [
    "factors_widget",
    "fine_tuned_widget",
    "influence_widget",
    "plot_factors",
    "plot_fine_tuned",
    "plot_influence",
]


def influence_widget(result: InfluenceResult) -> Widget:
    """The top texts, coloured by token; the split by layer; the distribution of scores.

    Args:
        result: the result of :func:`rome_lens.influence.influence`.

    Returns:
        The widget; its table has one row per top text.
    """
    table = result.to_dataframe()
    rows = "".join(
        f"<tr><td>{r.rank}</td><td>{r.text_id}</td><td>{r.score:.4g}</td>"
        f"<td>{'spurious' if r.spurious else ''}</td>"
        f"<td>{_marks(result, result.text_ids[i])}</td>"
        f"<td>{html.escape(_snippet(str(r.text)))}</td></tr>"
        for i, r in enumerate(table.itertuples())
    )
    parts = [
        f"<p>Which texts, had the model trained on them more, would most raise "
        f"p({code(result.completion)} | {code(result.prompt)}): {result.strategy.upper()} on "
        f"the MLPs of layers {_layers(result.layers)}, {len(result.all_ids):,} texts scored.</p>",
        '<table class="influence-top"><tr><th>rank</th><th>text</th><th>score</th>'
        f"<th></th><th>also top by</th><th>start of the text</th></tr>{rows}</table>",
        _rankings_table(result),
        "<h3>Each top text coloured by each token's share of its score</h3>"
        '<p class="note">Drag the slider to pick a text; hover a token for its value. A text '
        "whose score comes from a few tokens (‖c‖₂/‖c‖₁ > 2/3) is marked spurious.</p>"
        + placeholder(0),
        "<h3>The split of each score by layer</h3>",
        f'<div class="scroll">{_layer_heatmap(result)}</div>',
        "<h3>The distribution of scores</h3>",
        _distribution_svg(result),
    ]
    frames = [
        {"tokens": tokens, "values": scores.float(), "minValue": -_bound(scores),
         "maxValue": _bound(scores)}
        for tokens, scores in zip(result.str_tokens, result.token_scores, strict=True)
    ]  # fmt: skip
    labels = [f"rank {i + 1} (text {t})" for i, t in enumerate(result.text_ids)]
    part = CircuitsvisPart("ColoredTokens", frames, labels, 0, slider_label="text")
    return Widget("Influence", "".join(parts), [part], table, _summary(result))


def factors_widget(factors: InfluenceFactors) -> Widget:
    """The eigenvalue spread of each weight's factors (figure and table).

    Args:
        factors: fitted influence factors.

    Returns:
        The widget; its table has one row per weight.
    """
    body = (
        f"<p>{html.escape(repr(factors))}, fitted on {html.escape(factors.corpus)} in "
        f"{factors.seconds:.0f} s.</p>{_svg(plot_factors(factors))}"
    )
    return Widget("Influence factors", body, [], factors.to_dataframe(), [])


def plot_influence(result: InfluenceResult, ax: AxesArg = None) -> Figure:
    """The scores from largest to smallest, on log–log axes (positive and negative apart).

    Args:
        result: the result of :func:`rome_lens.influence.influence`.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 5.5, 3.4)
    scores = result.all_scores.double().numpy()
    for sign, style, label in ((1, "o-", "positive scores"), (-1, "s--", "negative (|score|)")):
        values = np.sort(scores[scores * sign > 0] * sign)[::-1]
        if len(values):
            panel.loglog(np.arange(1, len(values) + 1), values, style, markersize=3, label=label)
    panel.set_xlabel("rank")
    panel.set_ylabel("influence score")
    panel.set_title(f"{len(scores):,} texts, {result.strategy}", fontsize=9)
    panel.legend(fontsize=8)
    return figure_of(panel)


def plot_factors(factors: InfluenceFactors, ax: AxesArg = None) -> Figure:
    """Each weight's largest, mean and smallest curvature eigenvalue, by weight.

    Args:
        factors: fitted influence factors.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 7.0, 3.2)
    strategy = "ekfac" if factors.supports("ekfac") else "kfac"
    stats = [factors.eigenvalues(name, strategy) for name in factors.names]
    x = np.arange(len(stats))
    for values, style, label in (
        ([float(v.max()) for v in stats], "o-", "largest"),
        ([float(v.mean()) for v in stats], "s-", "mean"),
        ([max(float(v.min()), 1e-30) for v in stats], "^--", "smallest"),
    ):
        panel.semilogy(x, values, style, markersize=3, label=label)
    panel.set_xticks(x, [n.replace("blocks.", "").replace(".mlp.", " ") for n in factors.names],
                     rotation=70, fontsize=6)  # fmt: skip
    panel.set_ylabel(f"{strategy} eigenvalue")
    panel.legend(fontsize=7)
    return figure_of(panel)


_RANKING_NAMES = {"bm25": "BM25", "fused": "fused"}


def _marks(result: InfluenceResult, text_id: int) -> str:
    """Which other rankings also put the text in their top, and where."""
    return ", ".join(
        f"{_RANKING_NAMES.get(name, name)} #{ids.index(text_id) + 1}"
        for name, ids in result.rankings.items()
        if text_id in ids
    )


def _rankings_table(result: InfluenceResult) -> str:
    """The top texts of each ranking side by side: gradient, BM25 (words alone) and their
    reciprocal-rank fusion, each cell marked by the other rankings that share it."""
    if not result.rankings:
        return ""
    columns = {"gradient": result.text_ids} | dict(result.rankings)
    head = "".join(f"<th>{_RANKING_NAMES.get(n, n)}</th>" for n in columns)
    rows = []
    for i in range(max(len(ids) for ids in columns.values())):
        cells = []
        for name, ids in columns.items():
            if i >= len(ids):
                cells.append("<td></td>")
                continue
            others = [_RANKING_NAMES.get(o, o) for o, other in columns.items()
                      if o != name and ids[i] in other]  # fmt: skip
            shared = f' <span class="note">(also {", ".join(others)})</span>' if others else ""
            cells.append(f"<td>text {ids[i]}{shared}</td>")
        rows.append(f"<tr><td>{i + 1}</td>{''.join(cells)}</tr>")
    return (
        "<h3>Three rankings of the same texts</h3>"
        '<p class="note">The gradient ranking above; BM25 ranks by the query\'s words alone; '
        "the fusion adds 1/(60 + rank) of both (reciprocal-rank fusion).</p>"
        f'<table class="influence-rankings"><tr><th>rank</th>{head}</tr>{"".join(rows)}</table>'
    )


def _summary(result: InfluenceResult) -> list[str]:
    if not result.text_ids:
        return []
    spurious = sum(result.spurious)
    top = result.texts[0]
    layer = result.layers[int(result.layer_scores[0].argmax())]
    return [
        f"<b>Influence.</b> The text that most raises p({code(result.completion)}) is text "
        f"{result.text_ids[0]}, {code(_snippet(top, 60))} (score {float(result.scores[0]):.3g}; "
        f"its largest share from layer {layer}); {spurious} of the top {len(result.text_ids)} "
        "look spurious."
    ]


def _layer_heatmap(result: InfluenceResult) -> str:
    values = result.layer_scores.double()
    low, high = float(values.min()), float(values.max())
    panel = Heatmap(
        title="score by layer (rows: top texts)",
        values=values.tolist(),
        low=min(low, 0.0),
        high=max(high, 1e-30),
        colour=(120, 60, 170),
        hover=[
            [
                f"text {t}, layer {layer}: {float(values[i, j]):.4g}"
                for j, layer in enumerate(result.layers)
            ]
            for i, t in enumerate(result.text_ids)
        ],  # fmt: skip
        css_class="influence-heatmap",
    )
    svg = heatmap_panels(
        [panel],
        [f"rank {i + 1}" for i in range(len(result.text_ids))],
        column_labels=[f"layer {layer}" for layer in result.layers],
        colour_label="score from the layer's MLP weights",
        css_class="heatmaps influence-layers",
    )
    return svg


def _distribution_svg(result: InfluenceResult) -> str:
    return _svg(plot_influence(result))


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return f'<div class="scroll figure">{text[text.index("<svg") :]}</div>'


def _bound(scores: torch.Tensor) -> float:
    return max(float(scores.abs().max()), 1e-30) if len(scores) else 1.0


def _snippet(text: str, length: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= length else flat[: length - 1] + "…"


def _layers(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)


def fine_tuned_widget(tuned: FineTuned) -> Widget:
    """The loss of each epoch of a fine-tuning run (figure and table).

    Args:
        tuned: the result of :func:`rome_lens.influence.fine_tune`.

    Returns:
        The widget; its table has one row per epoch.
    """
    names = ", ".join(f"<code>{html.escape(name)}</code>" for name in tuned.weights)
    body = (
        f"<p>{len(tuned.weights)} weights trained on {html.escape(tuned.corpus)} in "
        f"{tuned.seconds:.0f} s: {names}.</p>{_svg(plot_fine_tuned(tuned))}"
    )
    return Widget("Fine-tuning", body, [], tuned.to_dataframe(), [])


def plot_fine_tuned(tuned: FineTuned, ax: AxesArg = None) -> Figure:
    """The mean next-token loss of each epoch.

    Args:
        tuned: the result of :func:`rome_lens.influence.fine_tune`.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 4.5, 3.0)
    panel.plot(range(1, len(tuned.losses) + 1), tuned.losses, "o-", markersize=3)
    panel.set_xlabel("epoch")
    panel.set_ylabel("mean next-token loss")
    return figure_of(panel)


register_view(FineTuned, "widget")(fine_tuned_widget)
register_view(FineTuned, "plot")(plot_fine_tuned)
register_view(InfluenceResult, "widget")(influence_widget)
register_view(InfluenceResult, "plot")(plot_influence)
register_view(InfluenceFactors, "widget")(factors_widget)
register_view(InfluenceFactors, "plot")(plot_factors)
