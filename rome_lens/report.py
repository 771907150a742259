"""A short, self-contained HTML page for a causal trace.

>>> import rome_lens
>>> from rome_lens.report import trace_page
>>> model = rome_lens.tiny_model()
>>> trace = rome_lens.trace_fact(model, "The Eiffel Tower is located in", "The Eiffel Tower",
...                              samples=2, progress=False)
>>> "<table>" in trace_page(trace, image="trace.png")
True
"""

from __future__ import annotations

from html import escape

from rome_lens.tracing import CausalTrace

__all__ = ["trace_page"]


def trace_page(trace: CausalTrace, *, image: str) -> str:
    """An HTML page with the trace's heatmap (``image``, a relative path) and its peaks."""
    rows = "\n".join(
        f"<tr><td>{escape(p.kind)}</td><td>{p.token} {escape(repr(p.str_token))}</td>"
        f"<td>{p.layer}</td><td>{p.score:.3f}</td><td>{p.indirect_effect:+.3f}</td></tr>"
        for p in (trace.peak(kind) for kind in trace.kinds)
    )
    first, last = trace.subject_range
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Causal trace</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em}}</style>
</head><body>
<h1>Causal trace</h1>
<p>Prompt: <code>{escape(trace.prompt)}</code><br>
Subject: <code>{escape(trace.subject)}</code> (tokens {first}&ndash;{last - 1})<br>
Target: <code>{escape(repr(trace.target_str))}</code>:
clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f}
(noise scale {trace.noise_scale:.3f}, {trace.samples} samples,
window {trace.window}, seed {trace.seed})</p>
<h2>Peaks</h2>
<table><tr><th>kind</th><th>token</th><th>layer</th><th>p restored</th><th>indirect effect</th></tr>
{rows}
</table>
<h2>Heatmaps</h2>
<img src="{escape(image)}" alt="causal trace heatmaps" style="max-width:100%">
</body></html>
"""
