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

    def external_requests(self) -> list[str]:
        """Requests to anything but the local server (data: and blob: URLs are in-page)."""
        local = urlparse(self.url).netloc
        return [
            u
            for u in self.requests
            if urlparse(u).scheme not in ("data", "blob") and urlparse(u).netloc != local
        ]


def chromium_path() -> str | None:
    """Debian's Chromium, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def visit(
    folder: Path,
    page: str,
    selectors: list[str],
    *,
    screenshot: Path | None = None,
    width: int = 1280,
) -> PageVisit:
    """Serve ``folder``, open ``page`` in headless Chromium, count ``selectors``, screenshot."""
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
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=str(screenshot), full_page=False)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return visit


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass
