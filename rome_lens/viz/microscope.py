"""Widgets and figures for LLM-Microscope's results.

* :func:`token_layer_widget`: a (layer × token) heatmap of token nonlinearity
  or the logit lens's loss, tokens along the bottom, hover for values, and
  circuitsvis ``ColoredTokens`` of one layer at a time (a slider picks it);
* :func:`contextualization_widget`: the text coloured by each token's
  contextualization (circuitsvis), the scores as a heatmap row, and the
  adapter's weights over depths;
* :func:`linearity_widget`: each block's linearity, with and without the
  residual stream, as a line chart;
* :func:`geometry_widget`: anisotropy and intrinsic dimension by depth.

Each result's ``widget()`` and ``plot()`` call these (registered below).

>>> import torch
>>> from rome_lens.analysis import LayerLinearity
>>> from rome_lens.viz.microscope import linearity_widget
>>> result = LayerLinearity(torch.tensor([0.99, 0.98]), torch.tensor([0.4, 0.6]), 500, "demo")
>>> widget = linearity_widget(result)
>>> 'class="linearity"' in widget.html(bundle=False), widget.summary[0][:25]
(True, '<b>Layer linearity.</b> O')
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from rome_lens.analysis import (
    ContextAdapter,
    Contextualization,
    Geometry,
    IntermediatePredictions,
    LayerLinearity,
    LinearMaps,
    TokenNonlinearity,
)
from rome_lens.core.results import register_view
from rome_lens.viz.html import CircuitsvisPart, Widget, code, placeholder
from rome_lens.viz.plots import AxesArg, axes_for, figure_of
from rome_lens.viz.svg import PALETTE, Heatmap, Series, heatmap_panels, line_chart

__all__ = [
    "adapter_widget",
    "contextualization_widget",
    "geometry_widget",
    "linearity_widget",
    "plot_adapter",
    "plot_contextualization",
    "plot_geometry",
    "plot_linearity",
    "plot_token_layer",
    "token_layer_widget",
]

_ORANGE = (230, 110, 20)
_BLUE = (40, 90, 200)


def token_layer_widget(
    result: TokenNonlinearity | IntermediatePredictions, *, layer: int | None = None
) -> Widget:
    """A (layer × token) heatmap of nonlinearity or of the lens's loss, and a token strip.

    Args:
        result: token nonlinearity or intermediate predictions.
        layer: the layer the token strip shows first (default: the last).

    Returns:
        The widget; its table has one row per (layer, token).
    """
    if isinstance(result, TokenNonlinearity):
        values, title, what = result.errors, "Token nonlinearity", "nonlinearity"
        note = (
            "‖A*ₗ x̂ − ŷ‖ for each token at each block, with maps fitted on "
            f"{html.escape(result.reference)}; the mean square over the reference is "
            "1 − linearity. Darker: the block acts less linearly on the token."
        )
        hover = [[f"{v:.3f}" for v in row] for row in values.tolist()]
    else:
        values, title, what = result.losses, "Intermediate predictions", "loss"
        note = (
            "−log p(token | prefix) read after each layer through the final norm and the "
            "unembedding (the logit lens); hover a cell for that layer's top-1 guess."
        )
        hover = [
            [f"loss {v:.2f}, top-1 {result.top_tokens[layer][t]!r}" for t, v in enumerate(row)]
            for layer, row in enumerate(values.tolist())
        ]
    n_layers, n_tokens = values.shape
    if layer is not None and not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise ValueError(f"layer {layer!r} is out of range: the result has {n_layers} layers")
    high = float(values[torch.isfinite(values)].max()) if n_tokens else 1.0
    panel = Heatmap(
        title=f"{title} (layer × token)",
        values=values.tolist(),
        low=0.0,
        high=max(high, 1e-9),
        colour=_ORANGE,
        hover=[
            [f"{result.str_tokens[t]!r}, layer {i}: {hover[i][t]}" for t in range(n_tokens)]
            for i in range(n_layers)
        ],
        css_class="token-heatmap",
    )
    svg = heatmap_panels(
        [panel],
        [f"layer {i}" for i in range(n_layers)],
        column_labels=[repr(t) for t in result.str_tokens],
        colour_label=what,
    )
    frames = [
        {"tokens": result.str_tokens, "values": values[i].float(), "minValue": 0.0,
         "maxValue": max(high, 1e-9)}
        for i in range(n_layers)
    ]  # fmt: skip
    labels = [f"layer {i}" for i in range(n_layers)]
    part = CircuitsvisPart(
        "ColoredTokens", frames, labels, n_layers - 1 if layer is None else layer
    )
    body = (
        f"<p>{code(result.text[:200] + ('…' if len(result.text) > 200 else ''))}</p>"
        f'<div class="scroll">{svg}</div><p class="caption">{note}</p>'
        f"<h3>The text coloured by one layer's {what}</h3>{placeholder(0)}"
    )
    return Widget(title, body, [part], result.to_dataframe(), _token_layer_summary(result))


def _token_layer_summary(result: TokenNonlinearity | IntermediatePredictions) -> list[str]:
    if isinstance(result, TokenNonlinearity):
        per_layer = result.errors.mean(1)
        layer = int(per_layer.argmax())
        per_token = result.errors.mean(0)
        token = int(per_token.argmax())
        return [
            f"<b>Token nonlinearity.</b> Block {layer} is the least linear on this text "
            f"(mean error {float(per_layer[layer]):.2f}); the token it treats least linearly "
            f"overall is {code(result.str_tokens[token])}."
        ]
    final = result.losses[-1]
    half = (result.losses <= final[None] + math.log(2)).float().argmax(0)  # within 2× of p
    return [
        f"<b>Intermediate predictions.</b> The output's mean loss is {float(final.mean()):.2f}; "
        f"the median token reaches within a factor 2 of its final probability at layer "
        f"{int(half.median())}."
    ]


def contextualization_widget(result: Contextualization) -> Widget:
    """The text coloured by each token's contextualization, and the adapter's depth weights.

    Args:
        result: the result of :func:`rome_lens.analysis.context`.

    Returns:
        The widget; its table has one row per token.
    """
    scores = result.scores
    finite = scores[torch.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    # Strong context is a *low* score: colour by how far below the worst each token is.
    strength = torch.where(torch.isfinite(scores), high - scores, torch.zeros_like(scores))
    panel = Heatmap(
        title="Contextualization C (lower: more context; grey: no full prefix)",
        values=[scores.tolist()],
        low=low,
        high=max(high, low + 1e-9),
        colour=_BLUE,
        hover=[
            [
                f"{t!r}: C = {s:.3f}" if math.isfinite(s) else f"{t!r}: no full prefix"
                for t, s in zip(result.str_tokens, scores.tolist(), strict=True)
            ]
        ],
        css_class="context-heatmap",
    )
    svg = heatmap_panels(
        [panel],
        ["C"],
        column_labels=[repr(t) for t in result.str_tokens],
        colour_label="prefix cross-entropy (nats)",
    )
    weights = line_chart(
        [Series("pooling weight", result.depth_weights.tolist(), PALETTE[0])],
        x_label="depth (0: embeddings; l + 1: after block l)",
        y_label="weight",
        width=560,
        height=240,
        css_class="depth-weights",
    )
    part = CircuitsvisPart(
        "ColoredTokens",
        [{"tokens": result.str_tokens, "values": strength.float(), "minValue": 0.0,
          "maxValue": max(high - low, 1e-9)}],
    )  # fmt: skip
    body = (
        f"<p>How well each token's residual streams let a decoder ({result.decoder}) "
        f"rebuild the {result.prefix_length} tokens before it. The strip is coloured by "
        "how much context a token holds (darker: more, i.e. a lower C).</p>"
        f'{placeholder(0)}<div class="scroll">{svg}</div>'
        f"<h3>The adapter's weights over depths</h3>{weights}"
    )
    order = torch.argsort(scores.nan_to_num(float("inf")))
    best = [code(result.str_tokens[int(i)]) for i in order[: min(3, len(finite))]]
    summary = [
        f"<b>Contextualization.</b> The tokens that hold the most context here are "
        f"{', '.join(best) or 'none (the text is shorter than the prefix)'}; the adapter "
        f"draws most on depth {int(result.depth_weights.argmax())}."
    ]
    return Widget("Contextualization", body, [part], result.to_dataframe(), summary)


def linearity_widget(result: LayerLinearity | LinearMaps) -> Widget:
    """Each block's linearity score, with and without the residual stream.

    Args:
        result: layer linearity, or fitted maps (their reference scores).

    Returns:
        The widget; its table has one row per block.
    """
    if isinstance(result, LinearMaps):
        result = result.layer_linearity()
    chart = line_chart(
        [
            Series("with the residual (Y)", result.linearity.tolist(), PALETTE[0]),
            Series(
                "without it (Y − X)",
                result.linearity_without_residual.tolist(),
                PALETTE[1],
                dashed=True,
            ),
        ],  # fmt: skip
        x_label="block",
        y_label="linearity score",
        y_range=(0, 1),
        y_tick_labels={0.0: "0", 0.25: "0.25", 0.5: "0.5", 0.75: "0.75", 1.0: "1"},
        css_class="linearity",
    )
    body = (
        f"<p>1 − ‖XA − Y‖² for consecutive residual streams X, Y over {result.n_tokens:,} "
        f"tokens of {html.escape(result.corpus)} (centred, Frobenius-normalised, A by "
        f"least squares).</p>{chart}"
    )
    summary = [
        f"<b>Layer linearity.</b> Over {result.n_tokens:,} tokens the blocks score "
        f"{float(result.linearity.min()):.3f}–{float(result.linearity.max()):.3f} with the "
        f"residual stream and {float(result.linearity_without_residual.min()):.2f}–"
        f"{float(result.linearity_without_residual.max()):.2f} without it."
    ]
    return Widget("Layer linearity", body, [], result.to_dataframe(), summary)


def geometry_widget(result: Geometry) -> Widget:
    """Anisotropy and intrinsic dimension of the residual stream by depth.

    Args:
        result: the result of :func:`rome_lens.analysis.representation_geometry`.

    Returns:
        The widget; its table has one row per depth.
    """
    aniso = line_chart(
        [Series("anisotropy", result.anisotropy.tolist(), PALETTE[2])],
        x_label="depth", y_label="λ_max / Σλ", width=520, height=240, css_class="anisotropy",
    )  # fmt: skip
    dims = result.intrinsic_dimension
    parts = [f"<p>{result.n_tokens:,} tokens of {html.escape(result.corpus)}.</p>"]
    parts.append('<div class="row">' + aniso)
    if bool(torch.isfinite(dims).any()):
        parts.append(
            line_chart(
                [Series("TwoNN dimension", dims.nan_to_num(0).tolist(), PALETTE[3])],
                x_label="depth",
                y_label="intrinsic dimension",
                width=520,
                height=240,
                css_class="intrinsic-dimension",
            )  # fmt: skip
        )
    parts.append("</div>")
    finite = dims[torch.isfinite(dims)]
    summary = [
        f"<b>Geometry.</b> Anisotropy peaks at depth {int(result.anisotropy.argmax())} "
        f"({float(result.anisotropy.max()):.2f})"
        + (
            f"; the intrinsic dimension ranges {float(finite.min()):.1f}–{float(finite.max()):.1f}."
            if len(finite)
            else "."
        )
    ]
    return Widget("Representation geometry", "".join(parts), [], result.to_dataframe(), summary)


def adapter_widget(adapter: ContextAdapter) -> Widget:
    """The adapter's training loss and its weights over depths.

    Args:
        adapter: a trained contextualization adapter.

    Returns:
        The widget; its table has one row per training step.
    """
    loss = line_chart(
        [Series("training loss", adapter.losses, PALETTE[0])],
        x_label="step", y_label="prefix cross-entropy", width=520, height=240,
        css_class="adapter-loss",
    )  # fmt: skip
    weights = line_chart(
        [Series("pooling weight", adapter.depth_weights.tolist(), PALETTE[1])],
        x_label="depth", y_label="weight", width=520, height=240, css_class="depth-weights",
    )  # fmt: skip
    body = f"<p>{html.escape(repr(adapter))}, trained on {html.escape(adapter.corpus)}.</p>"
    body += f'<div class="row">{loss}{weights}</div>'
    return Widget("Contextualization adapter", body, [], adapter.to_dataframe(), [])


def plot_token_layer(
    result: TokenNonlinearity | IntermediatePredictions, ax: AxesArg = None
) -> Figure:
    """The (layer × token) heatmap of nonlinearity or of the lens's loss.

    Args:
        result: token nonlinearity or intermediate predictions.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    values = result.errors if isinstance(result, TokenNonlinearity) else result.losses
    n_layers, n_tokens = values.shape
    (panel,) = axes_for(1, ax, max(6.0, 0.28 * n_tokens + 2), 0.18 * n_layers + 1.8)
    image = panel.pcolormesh(values.numpy(), cmap="Oranges")
    panel.invert_yaxis()
    panel.set_xticks(np.arange(n_tokens) + 0.5, [repr(t) for t in result.str_tokens],
                     rotation=60, ha="right", fontsize=7)  # fmt: skip
    panel.set_ylabel("layer")
    label = "nonlinearity" if isinstance(result, TokenNonlinearity) else "−log p (logit lens)"
    panel.figure.colorbar(image, ax=panel, label=label)
    return figure_of(panel)


def plot_contextualization(result: Contextualization, ax: AxesArg = None) -> Figure:
    """Each token's contextualization score as bars (lower: more context).

    Args:
        result: the result of :func:`rome_lens.analysis.context`.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    n = len(result.str_tokens)
    (panel,) = axes_for(1, ax, max(6.0, 0.28 * n + 2), 3.2)
    panel.bar(np.arange(n), result.scores.nan_to_num(0).numpy(), color="tab:blue")
    panel.set_xticks(np.arange(n), [repr(t) for t in result.str_tokens], rotation=60, ha="right",
                     fontsize=7)  # fmt: skip
    panel.set_ylabel("C (prefix cross-entropy)")
    panel.set_title(
        f"Contextualization ({result.decoder} decoder; lower: more context)", fontsize=9
    )
    return figure_of(panel)


def plot_linearity(result: LayerLinearity | LinearMaps, ax: AxesArg = None) -> Figure:
    """Each block's linearity, with and without the residual stream.

    Args:
        result: layer linearity, or fitted maps.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 6.0, 3.2)
    layers = np.arange(len(result.linearity))
    panel.plot(layers, result.linearity.numpy(), "o-", label="with the residual")
    panel.plot(layers, result.linearity_without_residual.numpy(), "s--", label="without it")
    panel.set_ylim(0, 1.02)
    panel.set_xlabel("block")
    panel.set_ylabel("linearity score")
    panel.legend(fontsize=8)
    return figure_of(panel)


def plot_geometry(result: Geometry, ax: AxesArg = None) -> Figure:
    """Anisotropy (left axis) and intrinsic dimension (right axis) by depth.

    Args:
        result: the result of :func:`rome_lens.analysis.representation_geometry`.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 6.0, 3.2)
    depths = np.arange(len(result.anisotropy))
    panel.plot(depths, result.anisotropy.numpy(), "o-", color="tab:green", label="anisotropy")
    panel.set_xlabel("depth (0: embeddings)")
    panel.set_ylabel("anisotropy")
    if bool(torch.isfinite(result.intrinsic_dimension).any()):
        twin = panel.twinx()
        twin.plot(depths, result.intrinsic_dimension.numpy(), "s--", color="tab:purple")
        twin.set_ylabel("intrinsic dimension (TwoNN)")
    return figure_of(panel)


def plot_adapter(adapter: ContextAdapter, ax: AxesArg = None) -> Figure:
    """The adapter's training loss by step.

    Args:
        adapter: a trained contextualization adapter.
        ax: the Axes to draw into (``None``: a new figure).

    Returns:
        The figure.
    """
    (panel,) = axes_for(1, ax, 6.0, 3.2)
    panel.plot(adapter.losses)
    panel.set_xlabel("step")
    panel.set_ylabel("prefix cross-entropy")
    return figure_of(panel)


_VIEWS: Sequence[tuple[type, Any, Any]] = (
    (TokenNonlinearity, token_layer_widget, plot_token_layer),
    (IntermediatePredictions, token_layer_widget, plot_token_layer),
    (Contextualization, contextualization_widget, plot_contextualization),
    (LayerLinearity, linearity_widget, plot_linearity),
    (LinearMaps, linearity_widget, plot_linearity),
    (Geometry, geometry_widget, plot_geometry),
    (ContextAdapter, adapter_widget, plot_adapter),
)
for _type, _widget, _plot in _VIEWS:
    register_view(_type, "widget")(_widget)
    register_view(_type, "plot")(_plot)


# The names before 0.3, in British spelling: kept as aliases (see the CHANGELOG).
contextualisation_widget = contextualization_widget
plot_contextualisation = plot_contextualization
