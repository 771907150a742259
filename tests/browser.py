"""Open a page from a local folder in headless Chromium and report what happened.

Used by the browser test and by ``docs/make_figures.py`` (the README screenshot).
The folder is served on 127.0.0.1 by a thread; Chromium runs with its background
networking switched off, and every request it makes is recorded, so a test can
assert that nothing left the machine.
"""

from __future__ import annotations

import functools
import shutil
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-pings",
    "--no-sandbox",  # CI runs as root
]


@dataclass
class PageVisit:
    """What the browser saw on one page."""

    url: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # CSS selector -> elements found
    empty_circuitsvis: int = 0  # circuitsvis roots that rendered nothing
    layout: dict = field(default_factory=dict)  # what LAYOUT_SCRIPT measured
    slider_labels: list[str] = field(default_factory=list)  # each slider's label after moving it

    def external_requests(self) -> list[str]:
        """Requests to anything but the local server (data: and blob: URLs are in-page)."""
        local = urlparse(self.url).netloc
        return [
            u
            for u in self.requests
            if urlparse(u).scheme not in ("data", "blob") and urlparse(u).netloc != local
        ]


# Measures the rendered page: its height, the smallest text, tall containers that show
# nothing, and the colour bars and tick labels of every heatmap and chart.
LAYOUT_SCRIPT = """() => {
  const PANELS = 'g.trace-heatmap, g.token-heatmap, g.context-heatmap, g.influence-heatmap';
  const CHARTS = 'svg.lens-rank, svg.lens-prob, svg.linearity, svg.anisotropy, '
    + 'svg.intrinsic-dimension, svg.depth-weights';
  const visible = el => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    const folded = el.closest('details:not([open])') && !el.closest('summary');
    return !folded && r.width > 0 && r.height > 0 && s.visibility !== 'hidden'
      && s.display !== 'none'; };
  let smallest = Infinity, smallestText = '';
  for (const el of document.querySelectorAll('body *')) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || !visible(el) || el.closest('script,style,title')) continue;
    let size = parseFloat(getComputedStyle(el).fontSize);
    if (el instanceof SVGElement && el.getScreenCTM()) {
      const m = el.getScreenCTM(); size *= Math.hypot(m.a, m.b); }
    if (size < smallest) { smallest = size; smallestText = el.textContent.trim().slice(0, 40); }
  }
  const empty = [...document.querySelectorAll('section.widget div, section.widget svg')]
    .filter(el => visible(el) && el.getBoundingClientRect().height > 200
      && !el.innerText?.trim() && !el.querySelector('svg,canvas,img,rect,path'))
    .map(el => `${el.tagName}.${el.className.baseVal ?? el.className}`);
  return {
    height: document.documentElement.scrollHeight,
    smallest_font: smallest, smallest_text: smallestText,
    empty_tall: empty,
    heatmaps: document.querySelectorAll(PANELS).length,
    heatmaps_with_colorbar: [...document.querySelectorAll('svg.heatmaps')].map(svg =>
      svg.querySelectorAll('g.colorbar').length === svg.querySelectorAll(PANELS).length
      && [...svg.querySelectorAll('g.colorbar text.tick')].length >= 2).every(Boolean),
    charts: document.querySelectorAll(CHARTS).length,
    figures: [...document.querySelectorAll('div.figure > svg')].filter(visible).length,
    charts_with_ticks: [...document.querySelectorAll(CHARTS)]
      .every(svg => svg.querySelectorAll('text.tick').length >= 4),
    chart_widths: [...document.querySelectorAll(CHARTS)]
      .map(svg => svg.getBoundingClientRect().width),
    summary: document.querySelector('.summary-card')?.innerText ?? '',
    toc_links: document.querySelectorAll('nav.toc a').length,
    sections: document.querySelectorAll('section.widget > details').length,
  };
}"""


# Moves every layer slider to its first frame; returns the label each then shows.
SLIDER_SCRIPT = """() => [...document.querySelectorAll('.cv-part')].map(part => {
  const input = part.querySelector('input[type=range]');
  if (!input) return '';
  input.value = '0'; input.dispatchEvent(new Event('input'));
  return part.querySelector('output').textContent;
})"""


def chromium_path() -> str | None:
    """Debian's Chromium, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def visit(
    folder: Path,
    page: str,
    selectors: list[str],
    *,
    screenshot: Path | None = None,
    sections: Path | None = None,
    width: int = 1400,
) -> PageVisit:
    """Serve ``folder``, open ``page`` in headless Chromium, count ``selectors``, measure the
    layout, and save a screenshot of the whole page (and of each section into ``sections``)."""
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    visit = PageVisit(f"http://127.0.0.1:{server.server_address[1]}/{page}")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            tab = browser.new_page(viewport={"width": width, "height": 900})
            tab.on("request", lambda r: visit.requests.append(r.url))
            tab.on(
                "console",
                lambda m: visit.console_errors.append(m.text) if m.type == "error" else None,
            )
            tab.on("pageerror", lambda e: visit.console_errors.append(str(e)))
            tab.goto(visit.url, wait_until="networkidle")
            tab.wait_for_timeout(500)  # module scripts render after load
            visit.counts = {s: tab.locator(s).count() for s in selectors}
            visit.empty_circuitsvis = tab.evaluate(
                "[...document.querySelectorAll('div.circuitsvis')]"
                ".filter(d => d.children.length === 0).length"
            )
            visit.layout = tab.evaluate(LAYOUT_SCRIPT)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=str(screenshot), full_page=True)
            if sections is not None:
                sections.mkdir(parents=True, exist_ok=True)
                for i, section in enumerate(tab.locator("section.widget").all()):
                    section.screenshot(path=str(sections / f"section-{i + 1}.png"))
            visit.slider_labels = tab.evaluate(SLIDER_SCRIPT)
            tab.wait_for_timeout(300)
            visit.empty_circuitsvis += tab.evaluate(
                "[...document.querySelectorAll('div.circuitsvis')]"
                ".filter(d => !d.innerText.trim()).length"
            )
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return visit


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass
