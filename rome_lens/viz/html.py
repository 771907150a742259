"""Widgets as HTML: one class for Jupyter and offline pages, and the page that holds them.

A :class:`Widget` is an HTML fragment with the numbers behind it. In Jupyter
it displays itself (``_repr_html_``); ``widget.save("x.html")`` writes one
self-contained page, and :func:`report` writes many results on one page.

circuitsvis's own ``str(widget)`` loads its JavaScript from a CDN; pages
written here inline the bundle shipped in the installed circuitsvis package
instead, once per page, so they open with no network.

>>> from rome_lens.viz.html import Widget, page
>>> html = page([Widget("Hello", "<p>hi</p>")], title="demo")
>>> "<p>hi</p>" in html and "CircuitsVis" not in html  # no bundle when no circuitsvis part
True
"""

from __future__ import annotations

import html
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = ["Widget", "code", "mix", "page", "placeholder", "report", "write"]

_CSS = """
.rome-lens{font-family:system-ui,sans-serif;font-size:14px;color:#222}
.rome-lens h2{font-size:1.2em;margin:1.2em 0 .4em}
.rome-lens h3{font-size:1em;margin:1em 0 .3em}
.rome-lens table{border-collapse:collapse;margin:.4em 0}
.rome-lens td,.rome-lens th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
.rome-lens .grid td{font-family:monospace;font-size:12px;white-space:pre}
.rome-lens svg text{font-family:monospace;font-size:11px}
.rome-lens .note{color:#555;font-size:.9em}
"""


@dataclass
class Widget:
    """HTML that displays itself in Jupyter and saves as one offline page."""

    title: str
    body: str
    """HTML; circuitsvis parts are placeholders filled at render time."""
    circuitsvis: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    data: pd.DataFrame | None = None
    """The numbers behind the widget, when there is a table."""

    def html(self, *, bundle: bool = True) -> str:
        """The widget as an HTML fragment (with the circuitsvis bundle unless ``bundle=False``)."""
        body = self.body
        for i, (component, props) in enumerate(self.circuitsvis):
            body = body.replace(placeholder(i), _circuitsvis_element(component, props))
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
        """Write a self-contained HTML page (no network needed to view it)."""
        return write(path, page([self], title=self.title))


def page(widgets: Sequence[Widget], *, title: str = "rome_lens") -> str:
    """One HTML document holding ``widgets``, with the circuitsvis bundle inlined once."""
    uses_bundle = any(w.circuitsvis for w in widgets)
    sections = "\n".join(f"<section>{w.html(bundle=False)}</section>" for w in widgets)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title><link rel="icon" href="data:,">'
        "<style>body{max-width:80em;margin:1.5em auto;padding:0 1em}</style>"
        f"{_bundle_script() if uses_bundle else ''}</head>\n"
        f'<body><h1 style="font-family:system-ui,sans-serif">{html.escape(title)}</h1>\n'
        f"{sections}\n</body></html>\n"
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
    """Where the ``i``-th circuitsvis element of a widget goes in its body."""
    return f"<!--circuitsvis:{i}-->"


def _circuitsvis_element(component: str, props: dict[str, Any]) -> str:
    """A div and the module script that renders ``component`` into it (bundle loaded separately)."""
    element_id = "circuits-vis-" + uuid.uuid4().hex[:12]
    data = json.dumps({k: _jsonable(v) for k, v in props.items() if v is not None})
    data = data.replace("</", "<\\/")  # never close the script tag early
    return (
        f'<div id="{element_id}" class="circuitsvis" data-component="{component}"></div>'
        f'<script type="module">CircuitsVis.render("{element_id}", '
        f"CircuitsVis.{component}, {data});</script>"
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


def mix(low: tuple[int, int, int], high: tuple[int, int, int], t: float) -> str:
    """The colour ``t`` of the way from ``low`` to ``high``, as CSS."""
    r, g, b = (round(a + (b - a) * t) for a, b in zip(low, high, strict=True))
    return f"rgb({r},{g},{b})"


def code(text: str) -> str:
    """``text``'s repr as escaped inline code."""
    return f"<code>{html.escape(repr(text))}</code>"


def write(path: str | os.PathLike[str], document: str) -> Path:
    """Write ``document`` to ``path`` (``.html`` added to a path without a suffix)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
