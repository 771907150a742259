"""Widgets as HTML: one class for Jupyter and offline pages, and the page that holds them.

A :class:`Widget` is an HTML fragment, the numbers behind it, and a sentence
or two saying what it found. In Jupyter it displays itself (``_repr_html_``);
``widget.save("x.html")`` writes one self-contained page, and :func:`report`
writes many on one page, which opens with a summary card made of those
sentences, a table of contents, and a section per widget that collapses.
"Save as PDF" prints every section open, without the interactive controls.

circuitsvis's own ``str(widget)`` loads its JavaScript from a CDN; pages
written here inline the bundle shipped in the installed circuitsvis package
instead, once per page, so they open with no network. A circuitsvis part with
several frames (one per layer, say) gets a slider that shows one at a time.

>>> from rome_lens.viz.html import Widget, page
>>> html = page([Widget("Hello", "<p>hi</p>", summary=["It says hi."])], title="demo")
>>> "It says hi." in html and 'class="summary-card"' in html and "CircuitsVis" not in html
True
"""

from __future__ import annotations

import html
import json
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = ["CircuitsvisPart", "Widget", "code", "output_path", "page", "report", "write"]

_CSS = """
.rome-lens{font-family:system-ui,sans-serif;font-size:14px;color:#222;line-height:1.4}
.rome-lens h2{font-size:1.25em;margin:.2em 0}
.rome-lens h3{font-size:1.05em;margin:1em 0 .3em}
.rome-lens table{border-collapse:collapse;margin:.4em 0}
.rome-lens td,.rome-lens th{border:1px solid #ddd;padding:.2em .5em;text-align:left;
 font-size:13px}
.rome-lens .grid td{font-family:monospace;font-size:12px;white-space:pre}
.rome-lens .note,.rome-lens .caption{color:#555;font-size:13px}
.rome-lens .warning{background:#fff4e5;border-left:4px solid #e8890c;padding:.4em .7em;
 margin:.5em 0}
.rome-lens .row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.rome-lens .scroll{overflow-x:auto}
.rome-lens svg{font-family:system-ui,sans-serif;overflow:visible}
.rome-lens .cv-slider{display:flex;gap:.6em;align-items:center;font-size:13px;margin:.3em 0}
.rome-lens .cv-slider input{width:min(420px,60%)}
.rome-lens .circuitsvis>div>div{padding-bottom:6px!important}
.rome-lens details>summary{cursor:pointer;font-size:13px;color:#333}
"""
_PAGE_CSS = """
body{max-width:1360px;margin:1.2em auto;padding:0 1em;font-family:system-ui,sans-serif}
h1{font-size:1.6em;margin:.2em 0}
.summary-card{border:1px solid #c9d6e8;background:#f4f8fd;border-radius:6px;padding:.6em 1em;
 margin:.8em 0;font-size:15px}
.summary-card p{margin:.3em 0}
nav.toc{font-size:14px;margin:.5em 0 1em}
nav.toc a{margin-right:1.2em}
section.widget{border-top:1px solid #ddd;padding-top:.4em;margin-top:.8em}
section.widget>details>summary{list-style:none;cursor:pointer}
section.widget>details>summary::-webkit-details-marker{display:none}
section.widget>details>summary h2::before{content:"▾ ";color:#888}
section.widget>details:not([open])>summary h2::before{content:"▸ "}
@media print{
 body{max-width:none;margin:0}
 nav.toc,.cv-slider,section.widget>details>summary h2::before{display:none}
 section.widget{break-inside:avoid-page}
 .summary-card{break-after:avoid-page}
}
"""
# Opens every collapsed section before printing, so that "Save as PDF" holds them all.
_PRINT_SCRIPT = (
    "<script>addEventListener('beforeprint',()=>"
    "document.querySelectorAll('details').forEach(d=>d.open=true))</script>"
)


@dataclass
class CircuitsvisPart:
    """A circuitsvis component in a widget, with one set of props per frame."""

    component: str  # a circuitsvis React component, e.g. "TokenLogProbs"
    frames: list[dict[str, Any]]  # props of each frame; a slider picks one if there are several
    labels: list[str] = field(default_factory=list)  # the slider's label of each frame
    initial: int = 0  # the frame shown first
    slider_label: str = "layer"  # what the slider picks


@dataclass
class Widget:
    """HTML that displays itself in Jupyter and saves as one offline page."""

    title: str  # the section heading on a page
    body: str  # HTML; circuitsvis parts are placeholders filled at render time
    circuitsvis: list[CircuitsvisPart] = field(default_factory=list)  # parts in placeholders
    data: pd.DataFrame | None = None  # the numbers behind the widget, when there is a table
    summary: list[str] = field(default_factory=list)  # what it found, as HTML sentences

    def html(self, *, bundle: bool = True) -> str:
        """The widget as an HTML fragment.

        Args:
            bundle: include the circuitsvis bundle (a page includes it once instead).

        Returns:
            The fragment.
        """
        body = self.body
        for i, part in enumerate(self.circuitsvis):
            body = body.replace(placeholder(i), _circuitsvis_element(part))
        head = _bundle_script() if bundle and self.circuitsvis else ""
        return f'{head}<div class="rome-lens"><style>{_CSS}</style>{body}</div>'

    def _repr_html_(self) -> str:
        return self.html()

    def to_dataframe(self) -> pd.DataFrame:
        """The table behind the widget."""
        if self.data is None:
            raise ValueError(f"the widget {self.title!r} has no table")
        return self.data

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a self-contained HTML page (no network needed to view it).

        Args:
            path: the page to write (``.html`` is added to a path without a suffix).

        Returns:
            The path written.
        """
        return write(path, page([self], title=self.title))


def page(widgets: Sequence[Widget], *, title: str = "rome_lens") -> str:
    """One HTML document: a summary card, a table of contents, and a section per widget.

    Args:
        widgets: the widgets, in order.
        title: the page's title and heading.

    Returns:
        The document, with the circuitsvis bundle inlined once if any widget uses it.
    """
    uses_bundle = any(w.circuitsvis for w in widgets)
    anchors = _anchors([w.title for w in widgets])
    sentences = [s for w in widgets for s in w.summary]
    card = (
        '<div class="summary-card"><b>What this page shows.</b>'
        + "".join(f"<p>{s}</p>" for s in sentences)
        + "</div>"
        if sentences
        else ""
    )
    toc = (
        '<nav class="toc"><b>Contents:</b> '
        + "".join(
            f'<a href="#{a}">{html.escape(w.title)}</a>'
            for w, a in zip(widgets, anchors, strict=True)
        )
        + "</nav>"
        if len(widgets) > 1
        else ""
    )
    sections = "\n".join(
        f'<section class="widget" id="{a}"><details open><summary><h2>{html.escape(w.title)}'
        f"</h2></summary>{w.html(bundle=False)}</details></section>"
        for w, a in zip(widgets, anchors, strict=True)
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="icon" href="data:,">'
        f"<style>{_PAGE_CSS}</style>{_bundle_script() if uses_bundle else ''}{_PRINT_SCRIPT}"
        f"</head>\n<body><h1>{html.escape(title)}</h1>\n{card}{toc}\n{sections}\n</body></html>\n"
    )


def report(path: str | os.PathLike[str], *items: Any, title: str = "rome_lens report") -> Path:
    """Write one offline HTML page with every item: traces, lenses, edits, evaluations.

    Args:
        path: the page to write (``.html`` is added to a path without a suffix).
        *items: widgets, or any rome_lens result (shown with its ``widget()``).
        title: the page's title.

    Returns:
        The path written.
    """
    widgets = []
    for item in items:
        if isinstance(item, Widget):
            widgets.append(item)
        elif callable(getattr(item, "widget", None)):
            widgets.append(item.widget())
        else:
            raise TypeError(
                f"report() takes widgets or rome_lens results, got {type(item).__name__}: "
                f"{item!r:.80}"
            )
    return write(path, page(widgets, title=title))


def placeholder(i: int) -> str:
    """Where the ``i``-th circuitsvis part of a widget goes in its body.

    Args:
        i: the part's index in ``Widget.circuitsvis``.

    Returns:
        The placeholder (an HTML comment).
    """
    return f"<!--circuitsvis:{i}-->"


def code(text: str) -> str:
    """``text``'s repr as escaped inline code.

    Args:
        text: any string (a token, a prompt).

    Returns:
        ``<code>'text'</code>``, escaped.
    """
    return f"<code>{html.escape(repr(text))}</code>"


def write(path: str | os.PathLike[str], document: str) -> Path:
    """Write ``document`` to ``path``.

    Args:
        path: the file (``.html`` is added to a path without a suffix).
        document: the HTML.

    Returns:
        The path written.
    """
    path = output_path(path, ".html")
    path.write_text(document, encoding="utf-8")
    return path


def output_path(path: str | os.PathLike[str], default_suffix: str) -> Path:
    """Where to write a page or a figure: ``default_suffix`` added to a path without
    one, and its folder made.

    Args:
        path: the path given.
        default_suffix: e.g. ``".html"``.

    Returns:
        The path.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(default_suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _anchors(titles: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for title in titles:
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def _circuitsvis_element(part: CircuitsvisPart) -> str:
    """The part's host div, its slider if it has several frames, and the script that renders."""
    element_id = "cv-" + uuid.uuid4().hex[:12]
    frames = [{k: _jsonable(v) for k, v in f.items() if v is not None} for f in part.frames]
    data = json.dumps({"frames": frames, "labels": part.labels}).replace("</", "<\\/")
    slider = ""
    if len(frames) > 1:
        last = len(frames) - 1
        label = part.labels[part.initial] if part.labels else str(part.initial)
        slider = (
            f'<label class="cv-slider">{html.escape(part.slider_label)}'
            f'<input type="range" min="0" max="{last}" value="{part.initial}" '
            f'aria-label="{html.escape(part.slider_label)}">'
            f"<output>{html.escape(label)}</output></label>"
        )
    # A fresh element for every frame: React roots are not reused across renders.
    script = (
        f'<script type="module">const d={data};const root=document.getElementById("{element_id}");'
        'const host=root.querySelector(".circuitsvis"),input=root.querySelector("input"),'
        'out=root.querySelector("output");let n=0;function show(i){const el=document.'
        'createElement("div");el.id=root.id+"-"+(n++);host.replaceChildren(el);'
        f"CircuitsVis.render(el.id,CircuitsVis.{part.component},d.frames[i]);"
        "if(out)out.textContent=d.labels[i]??i;}"
        f'if(input)input.addEventListener("input",()=>show(+input.value));show({part.initial});'
        "</script>"
    )
    return (
        f'<div class="cv-part" id="{element_id}">{slider}'
        f'<div class="circuitsvis" data-component="{part.component}"></div></div>{script}'
    )


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


@cache
def _bundle_script() -> str:
    """circuitsvis's browser bundle from the installed package, as one classic script."""
    spec = find_spec("circuitsvis")
    assert spec is not None and spec.origin is not None, "circuitsvis is a dependency"
    bundle = Path(spec.origin).parent / "dist" / "cdn" / "iife.js"
    source = bundle.read_text(encoding="utf-8").replace("</script>", "<\\/script>")
    source = "\n".join(
        line for line in source.splitlines() if not line.startswith("//# sourceMappingURL")
    )
    # A classic script makes `CircuitsVis` a global that every element's module script can use.
    return f"<script>{source}</script>"
