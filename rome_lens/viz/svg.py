"""Inline SVG for widgets: heatmaps with colour bars, and line charts with real axes.

Widgets draw with SVG written here rather than images, so a page stays one
small offline file, every cell carries its value on hover (a ``<title>``), and
a test can count what was drawn. Sizes are in CSS pixels and no text is
smaller than :data:`FONT` - 1 pixels.

>>> from rome_lens.viz.svg import Series, line_chart, nice_ticks
>>> nice_ticks(0.016, 0.398)
[0.1, 0.2, 0.3]
>>> svg = line_chart([Series("p", [0.1, 0.5, 0.9])], x_label="layer", y_label="probability")
>>> svg.count("<circle"), 'class="tick"' in svg  # three points, and one in the legend
(4, True)
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FONT",
    "Heatmap",
    "Series",
    "heatmap_panels",
    "line_chart",
    "mix",
    "nice_ticks",
]

FONT = 13  # px, the body text of every SVG
SMALL = 12  # px, tick labels
MIN_BAR_WIDTH = 160  # px, the narrowest colour bar: three tick labels fit under it
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_ids = itertools.count()  # gradient ids, unique on a page


@dataclass(frozen=True)
class Heatmap:
    """One panel of :func:`heatmap_panels`: a grid of values and how to colour it."""

    title: str  # above the panel
    values: list[list[float]]  # [row][column]
    low: float  # drawn white
    high: float  # drawn in `colour`
    colour: tuple[int, int, int]  # RGB of the highest value
    hover: list[list[str]]  # [row][column] hover text of each cell
    css_class: str = "heatmap"  # class of the panel's <g>, for tests and styling
    data: str = ""  # extra attributes of the panel's <g>


@dataclass(frozen=True)
class Series:
    """One line of :func:`line_chart`."""

    label: str  # in the legend
    values: list[float]  # one per x position
    colour: str = PALETTE[0]  # stroke colour
    dashed: bool = False  # dashed line and hollow square markers (e.g. "before")


def mix(low: tuple[int, int, int], high: tuple[int, int, int], t: float) -> str:
    """The colour ``t`` of the way from ``low`` to ``high`` (clamped to [0, 1]), as CSS.

    Args:
        low: RGB at ``t = 0``.
        high: RGB at ``t = 1``.
        t: where between them.

    Returns:
        ``rgb(r,g,b)``.
    """
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(a + (b - a) * t) for a, b in zip(low, high, strict=True))
    return f"rgb({r},{g},{b})"


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values strictly inside ``[low, high]``, about ``count`` of them.

    Args:
        low: the axis's lower end.
        high: the axis's upper end.
        count: how many ticks to aim for.

    Returns:
        The ticks, ascending (the ends are labelled separately).
    """
    if not high > low:
        return []
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(low / step + 1e-9) * step
    ticks = []
    value = first
    while value < high - 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def heatmap_panels(
    panels: Sequence[Heatmap],
    row_labels: Sequence[str],
    *,
    bold_rows: Sequence[int] = (),
    column_ticks: Sequence[int] = (),
    tick_title: str = "layer",
    column_labels: Sequence[str] | None = None,
    colour_label: str = "",
    width: int = 1240,
    css_class: str = "heatmaps",
) -> str:
    """Heatmaps side by side sharing row labels, each with a horizontal colour bar under it.

    Args:
        panels: the heatmaps, left to right; all have the same rows and columns.
        row_labels: one label per row, drawn once on the left.
        bold_rows: rows whose labels are bold and underlined (e.g. the subject).
        column_ticks: columns that get a tick label above each panel.
        tick_title: what the column ticks count, written left of them.
        column_labels: a label per column, written slanted under the grid (e.g. the
            tokens of a text); the cells are then wide enough for them and the SVG
            as wide as it needs (put it in a scrolling box).
        colour_label: what the colour bars measure, e.g. ``"p(' Paris')"``.
        width: the SVG's width in pixels when there are no column labels; the cells
            share what the row labels leave.
        css_class: the SVG's class.

    Returns:
        The ``<svg>`` element.
    """
    n_rows, n_cols = len(row_labels), len(panels[0].values[0])
    label_width = 8 + 8 * max(len(label) for label in row_labels)
    gap = 28
    if column_labels is None:
        room = width - label_width - gap * len(panels)
        cell_w = max(6, min(28, room // (n_cols * len(panels))))
        under = 0
    else:
        cell_w = 18
        under = 12 + int(0.87 * 7 * max(len(label) for label in column_labels))
    cell_h = 22
    top, bar_gap, bar_h = 44, 12 + under, 10
    grid_h = n_rows * cell_h
    height = top + grid_h + bar_gap + bar_h + 40
    parts = []
    for row, label in enumerate(row_labels):
        y = top + row * cell_h + cell_h / 2 + FONT / 3
        bold = row in bold_rows
        style = ' font-weight="bold" text-decoration="underline"' if bold else ""
        parts.append(
            f'<text x="{label_width - 6}" y="{y:.1f}" text-anchor="end" font-size="{FONT}"'
            f"{style}>{html.escape(label)}</text>"
        )
    if column_ticks:
        parts.append(
            f'<text x="{label_width - 6}" y="{top - 6}" text-anchor="end" '
            f'font-size="{SMALL}" font-style="italic">{html.escape(tick_title)}</text>'
        )
    x0 = label_width
    for panel in panels:
        panel_w = n_cols * cell_w
        parts.append(_panel(panel, x0, top, cell_w, cell_h, column_ticks))
        if column_labels is not None:
            parts.append(_slanted(column_labels, x0, top + grid_h + 6, cell_w))
        bar_w = max(panel_w, MIN_BAR_WIDTH)  # room for the tick labels of a narrow panel
        parts.append(_colour_bar(panel, x0, top + grid_h + bar_gap, bar_w, bar_h, colour_label))
        x0 += max(bar_w, _text_width(colour_label)) + gap
    return (
        f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{x0}" '
        f'height="{height}" role="img">{"".join(parts)}</svg>'
    )


def _text_width(text: str) -> int:
    """A generous estimate of a label's width at the small font size, in pixels."""
    return math.ceil(0.62 * SMALL * len(text))


def _slanted(labels: Sequence[str], x0: float, y: float, cell_w: int) -> str:
    parts = []
    for i, label in enumerate(labels):
        x = x0 + i * cell_w + cell_w / 2 + 4
        parts.append(
            f'<text class="column-label" x="{x:.1f}" y="{y:.1f}" font-size="{SMALL}" '
            f'text-anchor="end" transform="rotate(-60 {x:.1f} {y:.1f})">'
            f"{html.escape(label)}</text>"
        )
    return "".join(parts)


def _panel(
    panel: Heatmap, x0: float, top: float, cell_w: int, cell_h: int, ticks: Sequence[int]
) -> str:
    parts = [
        f'<text x="{x0}" y="{top - 26}" font-size="{FONT}" font-weight="bold">'
        f"{html.escape(panel.title)}</text>"
    ]
    for column in ticks:
        x = x0 + column * cell_w + cell_w / 2
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{top - 6}" text-anchor="middle" '
            f'font-size="{SMALL}">{column}</text>'
        )
    span = panel.high - panel.low if panel.high > panel.low else 1.0
    for row, values in enumerate(panel.values):
        for column, value in enumerate(values):
            missing = not math.isfinite(value)
            fill = (
                "#d9d9d9"
                if missing
                else mix((255, 255, 255), panel.colour, (value - panel.low) / span)
            )
            parts.append(
                f'<rect class="cell" data-row="{row}" data-column="{column}" '
                f'data-value="{value:.6g}" x="{x0 + column * cell_w}" y="{top + row * cell_h}" '
                f'width="{cell_w - 1}" height="{cell_h - 1}" fill="{fill}">'
                f"<title>{html.escape(panel.hover[row][column])}</title></rect>"
            )
    return f'<g class="{panel.css_class}" {panel.data}>{"".join(parts)}</g>'


def _colour_bar(panel: Heatmap, x0: float, y: float, width: float, height: int, label: str) -> str:
    gradient_id = f"colour-bar-{next(_ids)}"
    low, high = panel.low, panel.high
    stop = mix((255, 255, 255), panel.colour, 1.0)
    parts = [
        f'<defs><linearGradient id="{gradient_id}"><stop offset="0" stop-color="#fff"/>'
        f'<stop offset="1" stop-color="{stop}"/></linearGradient></defs>',
        f'<rect x="{x0}" y="{y}" width="{width}" height="{height}" fill="url(#{gradient_id})" '
        'stroke="#999" stroke-width="0.5"/>',
    ]
    span = high - low if high > low else 1.0
    count = max(1, int(width // 90))
    inner = [t for t in nice_ticks(low, high, count) if 0.12 < (t - low) / span < 0.88]
    ticks = [low, *inner, high]
    for i, value in enumerate(ticks):
        x = x0 + width * (value - low) / span
        anchor = "start" if i == 0 else "end" if i == len(ticks) - 1 else "middle"
        parts.append(
            f'<line x1="{x:.1f}" y1="{y + height}" x2="{x:.1f}" y2="{y + height + 4}" '
            'stroke="#555"/>'
            f'<text class="tick" x="{x:.1f}" y="{y + height + 16}" text-anchor="{anchor}" '
            f'font-size="{SMALL}">{_format(value, span)}</text>'
        )
    centred = _text_width(label) <= width
    parts.append(
        f'<text x="{x0 + width / 2 if centred else x0:.1f}" y="{y + height + 32}" '
        f'text-anchor="{"middle" if centred else "start"}" '
        f'font-size="{SMALL}">{html.escape(label)}</text>'
    )
    return f'<g class="colorbar">{"".join(parts)}</g>'


def line_chart(
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    y_range: tuple[float, float] | None = None,
    invert_y: bool = False,
    y_tick_labels: dict[float, str] | None = None,
    width: int = 600,
    height: int = 280,
    css_class: str = "chart",
) -> str:
    """Lines over integer x positions (layers), with ticks on both axes and the legend outside.

    Args:
        series: the lines; dashed ones get hollow square markers, solid ones filled circles,
            so they differ without colour.
        x_label: the x axis's title.
        y_label: the y axis's title.
        log_y: a log10 y axis (values must be positive).
        y_range: the y axis's ends (default: the data's).
        invert_y: draw the smallest value at the top (ranks: 1 is best).
        y_tick_labels: labels for chosen y values (default: round numbers).
        width: the SVG's width in pixels, legend included.
        height: the SVG's height in pixels.
        css_class: the SVG's class.

    Returns:
        The ``<svg>`` element.
    """
    legend_w = 20 + 8 * max(len(s.label) for s in series)
    left, right, top, bottom = 80, legend_w + 16, 12, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(s.values) for s in series)

    def fy(value: float) -> float:
        return math.log10(value) if log_y else value

    values = [fy(v) for s in series for v in s.values]
    low, high = (fy(y_range[0]), fy(y_range[1])) if y_range else (min(values), max(values))
    if high <= low:
        high = low + 1.0

    def x_of(i: int) -> float:
        return left + plot_w * i / max(n - 1, 1)

    def y_of(value: float) -> float:
        t = (fy(value) - low) / (high - low)
        return top + plot_h * (t if invert_y else 1 - t)

    parts = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    ]
    x_ticks = sorted({*range(0, n, 5 if n > 12 else 1), n - 1})
    for i in x_ticks:
        x = x_of(i)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 5}" '
            'stroke="#555"/>'
            f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle" '
            f'font-size="{SMALL}">{i}</text>'
        )
    if y_tick_labels is None:
        ends = (10**low, 10**high) if log_y else (low, high)
        raw = [10.0**k for k in range(math.ceil(low), math.floor(high) + 1)] if log_y else None
        ticks = raw if raw is not None else [ends[0], *nice_ticks(*ends), ends[1]]
        y_tick_labels = {value: _format(value, ends[1] - ends[0]) for value in ticks}
    drawn: list[float] = []
    values = sorted(y_tick_labels)
    ends_first = [values[-1], values[0], *values[1:-1]] if len(values) > 1 else values
    for value in ends_first:
        label = y_tick_labels[value]
        y = y_of(value)
        if any(abs(y - other) < SMALL + 2 for other in drawn):
            continue  # too close to a tick already labelled (the ends come first)
        drawn.append(y)
        parts.append(
            f'<line x1="{left - 5}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
            'stroke="#e4e4e4"/>'
            f'<text class="tick" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" '
            f'font-size="{SMALL}">{html.escape(label)}</text>'
        )
    for s in series:
        points = [(x_of(i), y_of(v)) for i, v in enumerate(s.values)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        dash = ' stroke-dasharray="6,4"' if s.dashed else ""
        parts.append(
            f'<polyline class="series" fill="none" stroke="{s.colour}" stroke-width="2"{dash} '
            f'points="{path}"><title>{html.escape(s.label)}</title></polyline>'
        )
        parts += [_marker(x, y, s) for x, y in points]
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" '
        f'font-size="{FONT}">{html.escape(x_label)}</text>'
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" font-size="{FONT}" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{html.escape(y_label)}</text>'
    )
    legend_x = left + plot_w + 16
    for i, s in enumerate(series):
        y = top + 14 + 20 * i
        dash = ' stroke-dasharray="6,4"' if s.dashed else ""
        parts.append(
            f'<g class="legend"><line x1="{legend_x}" y1="{y - 4}" x2="{legend_x + 22}" '
            f'y2="{y - 4}" stroke="{s.colour}" stroke-width="2"{dash}/>'
            f"{_marker(legend_x + 11, y - 4, s)}"
            f'<text x="{legend_x + 28}" y="{y}" font-size="{SMALL}">{html.escape(s.label)}</text>'
            "</g>"
        )
    return (
        f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img">{"".join(parts)}</svg>'
    )


def _marker(x: float, y: float, series: Series) -> str:
    if series.dashed:
        return (
            f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="#fff" '
            f'stroke="{series.colour}" stroke-width="1.5"/>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{series.colour}"/>'


def _format(value: float, span: float | None = None) -> str:
    """A tick label: enough digits to tell ticks ``span`` apart, and no more."""
    if value == 0:
        return "0"
    if span is not None and 0 < span < abs(value) / 20:
        decimals = max(0, 1 - math.floor(math.log10(span)))
        return f"{value:.{decimals}f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}" if abs(value) < 0.1 else f"{value:.3g}"
