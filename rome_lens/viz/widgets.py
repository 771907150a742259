"""Widgets for every rome_lens result, in a notebook or an offline page.

Every function here returns a :class:`~rome_lens.viz.html.Widget`, and each
result's ``widget()`` calls the one registered for its type below.

* :func:`trace_widget`: ROME's (token × layer) heatmaps as inline SVG (hover a
  cell for its value; subject tokens are starred and underlined), beside
  circuitsvis ``ColoredTokensMulti``: the prompt coloured by each layer's
  indirect effect.
* :func:`logit_lens_widget`: the targets' probability and rank across layers,
  the top-1 token at every (layer, position), and circuitsvis
  ``TokenLogProbs`` for each layer (hover a token for that layer's top-k).
* :func:`edit_widget`: top-k next tokens before and after an edit.
* :func:`evaluation_widget`: the CounterFact metric table.
* :func:`figure_widget`: any result's figure and table (key statistics,
  severed traces, average effects, edits, sequential curves).

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.tracing import trace_fact
>>> from rome_lens.viz import trace_widget
>>> model = tiny_model()
>>> with warnings.catch_warnings(record=True):
...     trace = trace_fact(model, "The Eiffel Tower is located in", "The Eiffel Tower",
...                        kinds=("mlp",), samples=2, progress=False)
>>> widget = trace_widget(trace)
>>> widget.html().count('class="cell"') == len(trace.str_tokens) * model.cfg.n_layers
True
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from rome_lens.analysis import LogitLens
from rome_lens.core.results import Result, register_view
from rome_lens.core.tokens import prompt_tokens
from rome_lens.editing import WeightEdit, edited
from rome_lens.evaluation import Evaluation, SequentialCurve
from rome_lens.stats import KeyStats, Moments
from rome_lens.tracing import AverageEffects, CausalTrace, SeveredTrace
from rome_lens.viz.html import Widget, code, mix, placeholder

__all__ = [
    "edit_widget",
    "evaluation_widget",
    "figure_widget",
    "logit_lens_widget",
    "trace_widget",
]

_KIND_RGB = {"resid": (106, 61, 154), "mlp": (44, 160, 44), "attn": (214, 39, 40)}
_KIND_TITLE = {
    "resid": "Restoring the residual stream (single layer)",
    "mlp": "Restoring MLP outputs (window of {w} layers)",
    "attn": "Restoring attention outputs (window of {w} layers)",
}
_LINE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def trace_widget(trace: CausalTrace) -> Widget:
    """ROME's heatmaps (one per kind, hover for values) and the prompt coloured per layer."""
    first, last = trace.subject_range
    parts = [
        f"<h2>Causal trace</h2><p>{code(trace.prompt)} → {code(trace.target_str)}: "
        f"clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f}; "
        f"subject {code(trace.subject)} (tokens {first}–{last - 1}, starred), "
        f"{trace.samples} noise samples, seed {trace.seed}.</p>"
    ]
    peaks = "".join(
        f"<tr><td>{p.kind}</td><td>{p.token} {html.escape(repr(p.str_token))}</td>"
        f"<td>{p.layer}</td><td>{p.score:.3f}</td><td>{p.indirect_effect:+.3f}</td></tr>"
        for p in (trace.peak(kind) for kind in trace.kinds)
    )
    parts.append(
        '<table class="peaks"><tr><th>kind</th><th>peak token</th><th>layer</th>'
        f"<th>p restored</th><th>indirect effect</th></tr>{peaks}</table>"
    )
    circuitsvis: list[tuple[str, dict[str, Any]]] = []
    for kind in trace.kinds:
        grid = trace.kind_scores(kind)
        parts.append(f"<h3>{_KIND_TITLE[kind].format(w=trace.window)}</h3>")
        parts.append(_heatmap_svg(trace, kind, grid))
        parts.append(
            f'<p class="note">Indirect effect of {kind} by token; choose a layer:</p>'
            + placeholder(len(circuitsvis))
        )
        effect = (grid - trace.corrupted_prob).float()
        labels = [f"layer {layer}" for layer in range(grid.shape[1])]
        circuitsvis.append(
            ("ColoredTokensMulti", {"tokens": trace.str_tokens, "values": effect, "labels": labels})
        )
    return Widget("Causal trace", "\n".join(parts), circuitsvis, trace.to_dataframe())


def _heatmap_svg(trace: CausalTrace, kind: str, grid: torch.Tensor) -> str:
    """An SVG grid, tokens down and layers across; each cell's <title> is its hover text."""
    n_pos, n_layers = grid.shape
    cell, label_width, top = 16, 150, 24
    low, high = trace.corrupted_prob, max(float(grid.max()), trace.corrupted_prob + 1e-9)
    first, last = trace.subject_range
    rgb = _KIND_RGB[kind]
    rows = []
    for t in range(n_pos):
        y = top + t * cell
        subject = first <= t < last
        label = repr(trace.str_tokens[t]) + ("*" if subject else "")
        style = ' font-weight="bold" text-decoration="underline"' if subject else ""
        rows.append(
            f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end"{style}>'
            f"{html.escape(label)}</text>"
        )
        for layer in range(n_layers):
            score = float(grid[t, layer])
            shade = min(max((score - low) / (high - low), 0.0), 1.0)
            fill = mix((255, 255, 255), rgb, shade)
            rows.append(
                f'<rect class="cell" data-token="{t}" data-layer="{layer}" '
                f'data-score="{score:.6g}" x="{label_width + layer * cell}" y="{y}" '
                f'width="{cell - 1}" height="{cell - 1}" fill="{fill}">'
                f"<title>{html.escape(repr(trace.str_tokens[t]))}, layer {layer}: "
                f"p = {score:.4f} (effect {score - low:+.4f})</title></rect>"
            )
    ticks = "".join(
        f'<text x="{label_width + layer * cell + cell / 2}" y="{top - 6}" '
        f'text-anchor="middle">{layer}</text>'
        for layer in range(0, n_layers, max(1, n_layers // 10))
    )
    width = max(label_width + n_layers * cell + 10, label_width + 260)  # room for the caption
    height = top + n_pos * cell + 24
    caption = (
        f'<text x="{label_width}" y="{height - 6}">layer →  (white: p = {low:.3f}, '
        f"darkest: p = {high:.3f})</text>"
    )
    return (
        f'<svg class="trace-heatmap" data-kind="{kind}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" role="img">{ticks}{"".join(rows)}{caption}</svg>'
    )


# --------------------------------------------------------------------------- logit lens


def logit_lens_widget(
    lens: LogitLens, *, before: LogitLens | None = None, layers: Sequence[int] | None = None
) -> Widget:
    """Targets across layers, the top-1 grid, and circuitsvis ``TokenLogProbs`` per layer.

    Args:
        lens: the result of :func:`rome_lens.lens.logit_lens`.
        before: the same prompt's lens on the unedited model; its target curves
            are drawn dashed beside ``lens``'s.
        layers: the layers to show as ``TokenLogProbs`` (default: all).
    """
    layers = list(range(lens.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < lens.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the lens has {lens.n_layers} layers")
    parts = [
        f"<h2>Logit lens</h2><p>{code(lens.prompt)}: the residual stream after each layer, "
        "read through the final norm and the unembedding.</p>",
        "<h3>Targets at the last position</h3>",
        _target_chart(lens, before, "rank"),
        _target_chart(lens, before, "prob"),
        _target_table(lens, before),
        "<h3>Top-1 prediction at each (layer, position)</h3>",
        _top1_grid(lens),
        '<h3>Top tokens per layer</h3><p class="note">Each line is one layer; a token is '
        "coloured by how well that layer predicts it, and hovering shows the layer's top "
        f"tokens. The last token is the first target, {code(lens.targets[0])}.</p>",
    ]
    circuitsvis: list[tuple[str, dict[str, Any]]] = []
    for layer in layers:
        parts.append(f"<div><b>layer {layer}</b>{placeholder(len(circuitsvis))}</div>")
        circuitsvis.append(("TokenLogProbs", _token_log_probs_props(lens, layer)))
    return Widget("Logit lens", "\n".join(parts), circuitsvis, lens.to_dataframe())


def _token_log_probs_props(lens: LogitLens, layer: int) -> dict[str, Any]:
    """circuitsvis TokenLogProbs props; the first target stands in as the token after the prompt."""
    ranks = torch.cat([lens.next_ranks[layer], lens.target_ranks[layer, :1]])
    log_probs = torch.cat([lens.next_log_probs[layer], lens.target_log_probs[layer, :1]])
    return {
        "prompt": lens.str_tokens + [lens.targets[0]],
        "topKLogProbs": lens.top_log_probs[layer],
        "topKTokens": lens.top_strs[layer],
        "correctTokenRank": ranks,
        "correctTokenLogProb": log_probs,
    }


def _target_chart(lens: LogitLens, before: LogitLens | None, metric: str) -> str:
    """Inline SVG of each target by layer (``before`` dashed): probability, or log rank."""
    width, height, left, bottom = 460, 220, 46, 30
    plot_w, plot_h = width - left - 10, height - bottom - 10
    n = lens.n_layers

    def height_of(source: LogitLens, t: int) -> list[float]:
        if metric == "prob":
            return [float(p) for p in source.target_log_probs[:, t].exp()]
        span = math.log10(source.vocab_size)
        return [1 - math.log10(int(r) + 1) / span for r in source.target_ranks[:, t]]

    def polyline(values: list[float], colour: str, dashed: bool) -> str:
        points = " ".join(
            f"{left + plot_w * i / max(n - 1, 1):.1f},{10 + plot_h * (1 - v):.1f}"
            for i, v in enumerate(values)
        )
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{points}"/>'

    lines, legend = [], []
    for t, target in enumerate(lens.targets):
        colour = _LINE_COLOURS[t % len(_LINE_COLOURS)]
        lines.append(polyline(height_of(lens, t), colour, False))
        if before is not None and t < len(before.targets):
            lines.append(polyline(height_of(before, t), colour, True))
        legend.append(
            f'<text x="{left + 10}" y="{24 + 14 * t}" fill="{colour}">{html.escape(repr(target))}'
            f"{' (dashed: before)' if before is not None else ''}</text>"
        )
    base = 10 + plot_h
    high, low = ("1", "0") if metric == "prob" else ("rank 1", f"{lens.vocab_size}")
    axes = (
        f'<line x1="{left}" y1="10" x2="{left}" y2="{base}" stroke="#888"/>'
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#888"/>'
        f'<text x="{left - 4}" y="14" text-anchor="end">{high}</text>'
        f'<text x="{left - 4}" y="{base}" text-anchor="end">{low}</text>'
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">'
        f"layer (0–{n - 1}); {'probability' if metric == 'prob' else 'rank, log scale'}</text>"
    )
    return (
        f'<svg class="lens-{metric}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img">{axes}{"".join(lines)}{"".join(legend)}</svg>'
    )


def _target_table(lens: LogitLens, before: LogitLens | None) -> str:
    header = "".join(f"<th>{html.escape(repr(t))} p / rank</th>" for t in lens.targets)
    rows = []
    for layer in range(lens.n_layers):
        cells = []
        for t in range(len(lens.targets)):
            prob, rank = float(lens.target_log_probs[layer, t].exp()), lens.target_ranks[layer, t]
            now = f"{prob:.3f} / {int(rank)}"
            if before is not None and t < len(before.targets):
                was = float(before.target_log_probs[layer, t].exp())
                now += f" (was {was:.3f} / {int(before.target_ranks[layer, t])})"
            cells.append(f"<td>{now}</td>")
        rows.append(f"<tr><td>{layer}</td>{''.join(cells)}</tr>")
    return (
        f'<details><summary>Table</summary><table class="lens-table"><tr><th>layer</th>'
        f"{header}</tr>{''.join(rows)}</table></details>"
    )


def _top1_grid(lens: LogitLens) -> str:
    header = "".join(f"<th>{html.escape(repr(s))}</th>" for s in lens.str_tokens)
    rows = []
    for layer in range(lens.n_layers):
        cells = []
        for pos in range(len(lens.str_tokens)):
            prob = float(lens.top_log_probs[layer, pos, 0].exp())
            hover = ", ".join(
                f"{s!r} {float(lp.exp()):.3f}"
                for s, lp in zip(
                    lens.top_strs[layer][pos], lens.top_log_probs[layer, pos], strict=True
                )
            )
            cells.append(
                f'<td style="background:{mix((255, 255, 255), (31, 119, 180), prob)}" '
                f'title="{html.escape(hover)}">{html.escape(lens.top_strs[layer][pos][0])}</td>'
            )
        rows.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th>layer</th>{header}</tr>{"".join(rows)}</table>'


# --------------------------------------------------------------------------- edits


@torch.no_grad()
def edit_widget(
    model: HookedTransformer,
    edit: WeightEdit,
    prompts: Sequence[str] | Mapping[str, str] | None = None,
    *,
    k: int = 5,
) -> Widget:
    """Top-``k`` next tokens before and after ``edit`` for each prompt.

    Args:
        model: the model the edit was computed on (left as it was).
        edit: any edit (ROME, MEMIT, FT+L).
        prompts: the prompts to compare, or ``{label: prompt}`` (for example
            ``{"edit": ..., "paraphrase": ..., "neighbour": ...}``). Default: the
            edit's own request prompts.
        k: how many next tokens to show.

    Returns:
        The widget; its table has one row per (prompt, rank).
    """
    labelled = _labelled_prompts(edit, prompts)
    before = {label: _top_k(model, prompt, k) for label, prompt in labelled.items()}
    with edited(model, edit):
        after = {label: _top_k(model, prompt, k) for label, prompt in labelled.items()}
    rows = [
        {
            "label": label,
            "prompt": prompt,
            "rank": r,
            "before": before[label][r][0],
            "p_before": before[label][r][1],
            "after": after[label][r][0],
            "p_after": after[label][r][1],
        }
        for label, prompt in labelled.items()
        for r in range(k)
    ]
    table = pd.DataFrame(rows)
    body = [f"<h2>Edit</h2><p>{html.escape(_describe(edit))}</p><table class='edit-table'>"]
    body.append("<tr><th></th><th>prompt</th><th>before</th><th>after</th></tr>")
    for label, prompt in labelled.items():
        body.append(
            f"<tr><td>{html.escape(label)}</td><td>{code(prompt)}</td>"
            f"<td>{_ranked(before[label])}</td><td>{_ranked(after[label])}</td></tr>"
        )
    body.append("</table>")
    return Widget("Edit", "".join(body), [], table)


def _labelled_prompts(
    edit: WeightEdit, prompts: Sequence[str] | Mapping[str, str] | None
) -> dict[str, str]:
    if prompts is None:
        prompts = [r.text for r in edit.requests]
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list or a mapping, got the string {prompts!r}")
    labelled = dict(prompts) if isinstance(prompts, Mapping) else {p: p for p in prompts}
    if not labelled:
        raise ValueError("edit_widget needs at least one prompt")
    return labelled


def _top_k(model: HookedTransformer, prompt: str, k: int) -> list[tuple[str, float]]:
    probs = model(prompt_tokens(model, prompt))[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [
        (model.to_single_str_token(int(i)), float(p))
        for i, p in zip(top.indices, top.values, strict=True)
    ]


def _ranked(predictions: list[tuple[str, float]]) -> str:
    return "<br>".join(f"{html.escape(repr(s))} {p:.3f}" for s, p in predictions)


def _describe(edit: WeightEdit) -> str:
    shown = [f"{r.text!r} → {r.target_new!r}" for r in edit.requests]
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    weights = ", ".join(edit.deltas())
    return f"{type(edit).__name__} on {weights}: {'; '.join(shown[:3])}{more}"


def evaluation_widget(evaluation: Evaluation) -> Widget:
    """The CounterFact metric table: the summary per method, then every case."""
    parts = ["<h2>Evaluation</h2><h3>Summary (scores in %)</h3>"]
    parts.append(evaluation.summary().to_html(index=False, float_format="{:.1f}".format))
    parts.append("<details><summary>Every case</summary>")
    table = evaluation.to_dataframe()
    parts.append(table.to_html(index=False, float_format="{:.3f}".format))
    parts.append("</details>")
    return Widget("Evaluation", "".join(parts), [], table)


def figure_widget(result: Result, title: str | None = None) -> Widget:
    """The result's figure (inline SVG) above its table."""
    title = title or type(result).__name__
    figure = result.plot()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    table = result.to_dataframe()
    body = (
        f"<h2>{html.escape(title)}</h2>{svg}<details><summary>Table</summary>"
        f"{table.to_html(index=False, float_format='{:.4g}'.format)}</details>"
    )
    return Widget(title, body, [], table)


register_view(CausalTrace, "widget")(trace_widget)
register_view(LogitLens, "widget")(logit_lens_widget)
register_view(Evaluation, "widget")(evaluation_widget)
for _type, _title in (
    (SeveredTrace, "Severed causal trace"),
    (AverageEffects, "Average causal effects"),
    (KeyStats, "Key statistics"),
    (Moments, "Second moments"),
    (WeightEdit, "Edit"),
    (SequentialCurve, "Sequential edits"),
):
    register_view(_type, "widget")(partial(figure_widget, title=_title))
