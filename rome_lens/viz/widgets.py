"""Widgets for every rome_lens result, in a notebook or an offline page.

Every function here returns a :class:`~rome_lens.viz.html.Widget` with a
sentence or two of what it found (a page collects them in its summary card),
and each result's ``widget()`` calls the one registered for its type below.

* :func:`trace_widget`: ROME's (token × layer) heatmaps side by side, each
  with a colour bar (hover a cell for its value; subject tokens are starred
  and underlined), and the prompt coloured by one layer's indirect effect
  (circuitsvis ``ColoredTokens``, with a layer slider).
* :func:`logit_lens_widget`: each target's rank (log scale) and probability by
  layer, before and after an edit told apart by dashes and markers, the top-1
  token at every (layer, position), and circuitsvis ``TokenLogProbs`` for one
  layer at a time (hover a token for that layer's top-k).
* :func:`edit_widget`: top-k next tokens before and after an edit.
* :func:`evaluation_widget`: the CounterFact summary and every case.
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

from rome_lens.analysis import LogitLens
from rome_lens.core.backend import Model
from rome_lens.core.results import Result, register_view
from rome_lens.core.tokens import prompt_tokens
from rome_lens.editing import WeightEdit, edited
from rome_lens.evaluation import Evaluation, SequentialCurve
from rome_lens.stats import KeyStats, Moments
from rome_lens.tracing import AverageEffects, CausalTrace, SeveredTrace
from rome_lens.viz.html import CircuitsvisPart, Widget, code, placeholder
from rome_lens.viz.svg import PALETTE, Heatmap, Series, heatmap_panels, line_chart

__all__ = [
    "edit_widget",
    "evaluation_widget",
    "figure_widget",
    "logit_lens_widget",
    "trace_widget",
]

_KIND_RGB = {"resid": (106, 61, 154), "mlp": (44, 160, 44), "attn": (214, 39, 40)}
_KIND_TITLE = {
    "resid": "Residual stream (one layer)",
    "mlp": "MLP outputs (window of {w})",
    "attn": "Attention outputs (window of {w})",
}
_KIND_NAME = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


# --------------------------------------------------------------------------- tracing


def trace_widget(trace: CausalTrace) -> Widget:
    """ROME's heatmaps side by side with colour bars, and the prompt coloured by layer.

    Args:
        trace: the result of :func:`rome_lens.tracing.trace_fact`.

    Returns:
        The widget; its table has one row per (kind, token, layer).
    """
    first, last = trace.subject_range
    parts = [
        f"<p>{code(trace.prompt)} → {code(trace.target_str)}: clean p = "
        f"{trace.clean_prob:.3f}, with the subject {code(trace.subject)} noised p = "
        f"{trace.corrupted_prob:.3f} ({trace.samples} noise samples, seed {trace.seed}).</p>"
    ]
    parts += [f'<p class="warning">Warning: {html.escape(p)}.</p>' for p in trace.problems]
    parts.append(_trace_heatmaps(trace))
    parts.append(
        f'<p class="caption">Each cell is p({html.escape(repr(trace.target_str))}) after '
        "restoring that (token, layer) state in the noised run; white is the noised p, the "
        "darkest shade the panel's highest. MLP and attention cells restore a window of "
        f"{trace.window} layers centred on the column's layer. Subject tokens are starred.</p>"
    )
    peaks = "".join(
        f"<tr><td>{_KIND_NAME[p.kind]}</td><td>{p.token} {html.escape(repr(p.str_token))}</td>"
        f"<td>{p.layer}</td><td>{p.score:.3f}</td><td>{p.indirect_effect:+.3f}</td></tr>"
        for p in (trace.peak(kind) for kind in trace.kinds)
    )
    parts.append(
        '<table class="peaks"><tr><th>restored</th><th>peak token</th><th>layer</th>'
        f"<th>p restored</th><th>indirect effect</th></tr>{peaks}</table>"
    )
    kind = "mlp" if "mlp" in trace.kinds else trace.kinds[0]
    grid = trace.kind_scores(kind) - trace.corrupted_prob
    n_layers = grid.shape[1]
    parts.append(
        f"<h3>The prompt coloured by the {_KIND_NAME[kind]}'s indirect effect</h3>"
        f'<p class="note">Drag the slider to pick a layer; hover a token for its value.</p>'
        + placeholder(0)
    )
    frames = [
        {"tokens": trace.str_tokens, "values": grid[:, layer].float(),
         "minValue": 0.0, "maxValue": max(float(grid.max()), 1e-6)}
        for layer in range(n_layers)
    ]  # fmt: skip
    part = CircuitsvisPart(
        "ColoredTokens",
        frames,
        labels=[f"layer {layer}" for layer in range(n_layers)],
        initial=trace.peak(kind).layer,
    )
    return Widget(
        "Causal trace", "\n".join(parts), [part], trace.to_dataframe(), _trace_summary(trace)
    )


def _trace_heatmaps(trace: CausalTrace) -> str:
    first, last = trace.subject_range
    labels = [repr(t) + ("*" if first <= i < last else "") for i, t in enumerate(trace.str_tokens)]
    n_layers = trace.scores.shape[2]
    panels = []
    for kind in trace.kinds:
        grid = trace.kind_scores(kind)
        hover = [
            [
                f"{trace.str_tokens[t]!r}, layer {layer}: p = {float(grid[t, layer]):.4f} "
                f"(effect {float(grid[t, layer]) - trace.corrupted_prob:+.4f})"
                for layer in range(n_layers)
            ]
            for t in range(len(trace.str_tokens))
        ]
        panels.append(
            Heatmap(
                title=_KIND_TITLE[kind].format(w=trace.window),
                values=grid.tolist(),
                low=trace.corrupted_prob,
                high=max(float(grid.max()), trace.corrupted_prob + 1e-9),
                colour=_KIND_RGB[kind],
                hover=hover,
                css_class="trace-heatmap",
                data=f'data-kind="{kind}"',
            )
        )
    ticks = sorted({*range(0, n_layers, 5), n_layers - 1})
    svg = heatmap_panels(
        panels,
        labels,
        bold_rows=range(first, last),
        column_ticks=ticks,
        colour_label=f"p({trace.target_str!r}) with the state restored",
    )
    return f'<div class="scroll">{svg}</div>'


def _trace_summary(trace: CausalTrace) -> list[str]:
    if trace.problems:
        return [
            f"<b>Trace of {code(trace.prompt)}:</b> it cannot show where the fact is stored: "
            + "; ".join(html.escape(p) for p in trace.problems)
            + "."
        ]
    sentence = (
        f"<b>Where the fact is recalled.</b> The model answers {code(trace.target_str)} to "
        f"{code(trace.prompt)} (p = {trace.clean_prob:.2f}; {trace.corrupted_prob:.3f} with "
        "the subject noised)."
    )
    for kind in trace.kinds:
        peak = trace.peak(kind)
        low, high = _span(trace.kind_scores(kind)[peak.token] - trace.corrupted_prob, peak.layer)
        layers = f"layer {low}" if low == high else f"layers {low}–{high}"
        sentence += (
            f" Restoring the {_KIND_NAME[kind]} at {code(peak.str_token)} (token {peak.token}) "
            f"brings back the most, p = {peak.score:.2f}, peak at layer {peak.layer} "
            f"(at least half of that in {layers})."
        )
    return [sentence]


def _span(effects: torch.Tensor, peak: int) -> tuple[int, int]:
    """The layers around ``peak`` whose effect is at least half the peak's."""
    half = float(effects[peak]) / 2
    low = high = peak
    while low > 0 and float(effects[low - 1]) >= half:
        low -= 1
    while high < len(effects) - 1 and float(effects[high + 1]) >= half:
        high += 1
    return low, high


# --------------------------------------------------------------------------- logit lens


def logit_lens_widget(
    lens: LogitLens, *, before: LogitLens | None = None, layers: Sequence[int] | None = None
) -> Widget:
    """Targets across layers, the top-1 grid, and circuitsvis ``TokenLogProbs`` per layer.

    Args:
        lens: the result of :func:`rome_lens.analysis.logit_lens`.
        before: the same prompt's lens on the unedited model; drawn dashed, with
            hollow markers, beside ``lens``.
        layers: the layers the ``TokenLogProbs`` slider offers (default: all).

    Returns:
        The widget; its table has one row per (layer, target).
    """
    layers = list(range(lens.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < lens.n_layers]
    if bad or not layers:
        raise ValueError(
            f"layers {bad or layers} are out of range: the lens has {lens.n_layers} layers"
        )
    parts = [
        f"<p>{code(lens.prompt)}: the residual stream after each layer, read through the "
        "final norm and the unembedding, as if the model stopped there.</p>",
        '<div class="row">',
        _target_chart(lens, before, "rank"),
        _target_chart(lens, before, "prob"),
        "</div>",
        "<details><summary>The targets' probability and rank at every layer</summary>",
        _target_table(lens, before),
        "</details>",
        "<details><summary>Top-1 prediction at every (layer, position)</summary>",
        f'<div class="scroll">{_top1_grid(lens)}</div>',
        "</details>",
        "<h3>Each token coloured by how well one layer predicts it</h3>"
        '<p class="note">Drag the slider to pick a layer; hover a token for that layer\'s '
        f"top tokens. The last token shown is the first target, {code(lens.targets[0])}.</p>"
        + placeholder(0),
    ]
    part = CircuitsvisPart(
        "TokenLogProbs",
        [_token_log_probs_props(lens, layer) for layer in layers],
        labels=[f"layer {layer}" for layer in layers],
        initial=len(layers) - 1,
    )
    summary = _lens_summary(lens, before)
    return Widget("Logit lens", "\n".join(parts), [part], lens.to_dataframe(), summary)


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
    """Each target by layer (``before`` dashed): rank on a log axis, or probability."""
    series = []
    for t, target in enumerate(lens.targets):
        colour = PALETTE[t % len(PALETTE)]
        sources = [(lens, False)] + ([(before, True)] if before and t < len(before.targets) else [])
        for source, dashed in sources:
            if metric == "rank":
                values = [float(r) + 1 for r in source.target_ranks[:, t]]
            else:
                values = [float(p) for p in source.target_log_probs[:, t].exp()]
            label = repr(target) + (" before" if dashed else " after" if before else "")
            series.append(Series(label, values, colour, dashed))
    if metric == "rank":
        vocab = lens.vocab_size
        ticks = {float(10**k): f"{10**k:,}" for k in range(int(math.log10(vocab)) + 1)}
        ticks[float(vocab)] = f"{vocab:,}"
        return line_chart(
            series,
            x_label="layer",
            y_label="rank at the last token (1 = top)",
            log_y=True,
            y_range=(1, vocab),
            invert_y=True,
            y_tick_labels=ticks,
            css_class="lens-rank",
        )
    return line_chart(
        series,
        x_label="layer",
        y_label="probability at the last token",
        y_range=(0, 1),
        y_tick_labels={0.0: "0", 0.25: "0.25", 0.5: "0.5", 0.75: "0.75", 1.0: "1"},
        css_class="lens-prob",
    )


def _target_table(lens: LogitLens, before: LogitLens | None) -> str:
    header = "".join(f"<th>{html.escape(repr(t))} p / rank</th>" for t in lens.targets)
    rows = []
    for layer in range(lens.n_layers):
        cells = []
        for t in range(len(lens.targets)):
            prob, rank = float(lens.target_log_probs[layer, t].exp()), lens.target_ranks[layer, t]
            now = f"{prob:.3f} / {int(rank) + 1}"
            if before is not None and t < len(before.targets):
                was = float(before.target_log_probs[layer, t].exp())
                now += f" (was {was:.3f} / {int(before.target_ranks[layer, t]) + 1})"
            cells.append(f"<td>{now}</td>")
        rows.append(f"<tr><td>{layer}</td>{''.join(cells)}</tr>")
    return f'<table class="lens-table"><tr><th>layer</th>{header}</tr>{"".join(rows)}</table>'


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
            shade = round(255 - 160 * min(prob, 1.0))
            cells.append(
                f'<td style="background:rgb({shade},{shade + (255 - shade) // 3},255)" '
                f'title="{html.escape(hover)}">{html.escape(lens.top_strs[layer][pos][0])}</td>'
            )
        rows.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th>layer</th>{header}</tr>{"".join(rows)}</table>'


def _lens_summary(lens: LogitLens, before: LogitLens | None) -> list[str]:
    target = lens.targets[0]
    top = _from_layer(lens.target_ranks[:, 0] == 0)
    p_out = float(lens.target_log_probs[-1, 0].exp())
    where = f"is top-1 from layer {top}" if top is not None else "never becomes top-1"
    sentence = (
        f"<b>Layer by layer.</b> In the logit lens of {code(lens.prompt)}, {code(target)} "
        f"{where} (p = {p_out:.2f} at the output)"
    )
    if len(lens.targets) > 1:
        others = lens.target_ranks[:, 1:].min(dim=1).values
        ahead = _from_layer(lens.target_ranks[:, 0] < others)
        rivals = ", ".join(code(t) for t in lens.targets[1:])
        if ahead is not None:
            sentence += f", and it ranks above {rivals} from layer {ahead} on"
    if before is not None:
        was = _from_layer(before.target_ranks[:, 0] == 0)
        was_text = f"top-1 from layer {was}" if was is not None else "never top-1"
        sentence += f"; before the edit it was {was_text}"
    return [sentence + "."]


def _from_layer(mask: torch.Tensor) -> int | None:
    """The first layer from which ``mask`` holds to the last layer (``None`` if it fails there)."""
    if not bool(mask[-1]):
        return None
    layer = len(mask) - 1
    while layer > 0 and bool(mask[layer - 1]):
        layer -= 1
    return layer


# --------------------------------------------------------------------------- edits


@torch.no_grad()
def edit_widget(
    model: Model,
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
            ``{"edit": ..., "paraphrase": ..., "neighbor": ...}``). Default: the
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
    body = [f"<p>{html.escape(_describe(edit))}</p>"]
    body += [f'<p class="warning">Warning: {html.escape(m)}</p>' for m in _miss_notes(edit)]
    body.append("<table class='edit-table'><tr><th></th><th>prompt</th><th>before</th>")
    body.append("<th>after</th></tr>")
    for label, prompt in labelled.items():
        body.append(
            f"<tr><td>{html.escape(label)}</td><td>{code(prompt)}</td>"
            f"<td>{_ranked(before[label])}</td><td>{_ranked(after[label])}</td></tr>"
        )
    body.append("</table>")
    summary = _edit_summary(edit, labelled, before, after)
    return Widget("Edit", "".join(body), [], table, summary)


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


def _top_k(model: Model, prompt: str, k: int) -> list[tuple[str, float]]:
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


def _miss_notes(edit: WeightEdit) -> list[str]:
    return [
        f"the edit did not take on {m.prompt!r}: {m.target_new!r} has p = {m.p_new:.3g}, "
        f"rank {m.rank_new + 1}"
        for m in edit.misses[:5]
    ]


def _edit_summary(
    edit: WeightEdit,
    labelled: dict[str, str],
    before: dict[str, list[tuple[str, float]]],
    after: dict[str, list[tuple[str, float]]],
) -> list[str]:
    weights = ", ".join(edit.deltas())
    took = len(edit.outcomes) - len(edit.misses)
    if not edit.outcomes:
        status = "its requests were not read back"
    elif len(edit.outcomes) > 1:
        status = f"{took} of {len(edit.outcomes)} requests took"
    else:
        status = "it took" if edit.took else "it did <b>not</b> take"
    changes = "; ".join(
        f"{html.escape(label)}: {code(before[label][0][0])} → {code(after[label][0][0])}"
        + (" (kept)" if before[label][0][0] == after[label][0][0] else "")
        for label in labelled
    )
    return [f"<b>What the edit changed.</b> The edit of {weights}: {status}. Top-1 {changes}."]


# --------------------------------------------------------------------------- evaluation


def evaluation_widget(evaluation: Evaluation) -> Widget:
    """The CounterFact metric table: the summary per method, then every case.

    Args:
        evaluation: the result of :func:`rome_lens.evaluation.evaluate_edits`.

    Returns:
        The widget; its table has one row per case.
    """
    summary = evaluation.summary()
    parts = ["<h3>Summary (scores in %)</h3>"]
    parts.append(summary.to_html(index=False, float_format="{:.1f}".format))
    parts.append("<details><summary>Every case</summary>")
    table = evaluation.to_dataframe()
    parts.append(table.to_html(index=False, float_format="{:.3f}".format))
    parts.append("</details>")
    sentences = [
        f"<b>CounterFact, {html.escape(str(row.method))}</b> over {row.cases} cases: "
        f"ES {row.post_ES:.1f}, PS {row.post_PS:.1f}, NS {row.post_NS:.1f} "
        f"(unedited NS {row.pre_NS:.1f}), S {row.S:.1f}."
        for row in summary.itertuples()
    ]
    return Widget("Evaluation", "".join(parts), [], table, sentences)


# --------------------------------------------------------------------------- the rest


def figure_widget(result: Result, title: str | None = None) -> Widget:
    """The result's figure (inline SVG) above its table.

    Args:
        result: any rome_lens result with a registered figure.
        title: the widget's title (default: the result's type).

    Returns:
        The widget; its table is ``result.to_dataframe()``.
    """
    title = title or type(result).__name__
    figure = result.plot()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    table = result.to_dataframe()
    body = (
        f'<div class="scroll">{svg}</div><details><summary>Table</summary>'
        f"{table.to_html(index=False, float_format='{:.4g}'.format)}</details>"
    )
    return Widget(title, body, [], table, _figure_summary(result))


def _figure_summary(result: Result) -> list[str]:
    if isinstance(result, KeyStats):
        return [
            f"<b>Key statistics</b> of layer {result.layer}: C over {result.n_tokens:,} tokens "
            f"of {html.escape(result.corpus)}, condition number {result.condition_number:.3g}."
        ]
    if isinstance(result, SeveredTrace):
        before = float((result.scores[:10] - result.corrupted_prob).mean())
        after = float((result.severed_scores[:10] - result.corrupted_prob).mean())
        token = result.str_tokens[result.token]
        return [
            f"<b>Severed trace.</b> With the {result.severed} path at {code(token)} held "
            f"noised, the mean effect of restoring layers 0–9 goes from {before:+.3f} to "
            f"{after:+.3f}."
        ]
    if isinstance(result, AverageEffects):
        k = result.kinds.index("mlp") if "mlp" in result.kinds else 0
        group = result.groups.index("last subject token")
        row = result.mean[k, group]
        return [
            f"<b>Average effects</b> over {result.n_facts} facts: the {result.kinds[k]} effect "
            f"at the last subject token peaks at layer {int(row.argmax())} "
            f"({float(row.max()):+.3f})."
        ]
    if isinstance(result, WeightEdit):
        took = len(result.outcomes) - len(result.misses)
        return [
            f"<b>{type(result).__name__}</b> on {', '.join(result.deltas())}: "
            f"{took} of {len(result.outcomes)} requests took."
        ]
    if isinstance(result, SequentialCurve) and result.rows:
        last = result.rows[-1]
        return [
            f"<b>Sequential {html.escape(result.method)} edits:</b> after {last['edits']} edits, "
            f"ES {last['ES']:.1f}, PS {last['PS']:.1f}, NS {last['NS']:.1f}."
        ]
    return []


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
