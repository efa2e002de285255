"""Open a report in headless Chromium with the network off: do all images decode, is the console clean?

Uses Playwright for Python (``pip install playwright``) with the system Chromium (Debian package
``chromium``, ``/usr/bin/chromium``); Playwright's own browser download is not needed. Every request
that is not ``file://`` or ``data:`` is aborted and reported, so a page that would fetch anything
from the network fails the check.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vaelab.errors import VaelabError

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser")
# flags for a headless run as root in a container with no network
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str | None:
    """``$VAELAB_CHROMIUM``, else the first Chromium found among ``CHROMIUM_CANDIDATES``, else ``None``
    (a ``$VAELAB_CHROMIUM`` that is not an executable file counts as not found)."""
    if os.environ.get("VAELAB_CHROMIUM"):
        path = os.environ["VAELAB_CHROMIUM"]
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def check_page(
    html_path: str | Path,
    screenshot: str | Path | None = None,
    *,
    executable: str | None = None,
    width: int = 1280,
    height: int = 900,
    full_page: bool = True,
    timeout_s: float = 60.0,
) -> dict:
    """Load ``html_path`` from disk in headless Chromium, network blocked, and inspect it.

    Returns:
        dict with ``images`` (number of ``<img>``), ``broken_images`` (``src`` prefixes of images with
        ``naturalWidth == 0``), ``console_errors`` (console messages of type error and page errors),
        ``blocked_requests`` (URLs that were not ``file://``/``data:``), ``title`` and ``screenshot``
        (the PNG written, or ``None``).

    Raises:
        VaelabError: Playwright is not installed, no Chromium is found, or the file does not exist.
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise VaelabError(f"{html_path} does not exist")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise VaelabError("checking a report in a browser needs Playwright: pip install playwright") from exc
    executable = executable or find_chromium()
    if executable is None:
        tried = (f"$VAELAB_CHROMIUM={os.environ['VAELAB_CHROMIUM']!r} is not an executable file"
                 if os.environ.get("VAELAB_CHROMIUM") else f"tried {', '.join(CHROMIUM_CANDIDATES)}")
        raise VaelabError(f"no Chromium found ({tried}); install it with: apt-get install chromium")

    console_errors: list[str] = []
    blocked: list[str] = []

    def route(r) -> None:
        url = r.request.url
        if url.startswith(("file://", "data:")):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, offline=True)
            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.on("requestfailed", lambda r: None if r.url.startswith(("file://", "data:")) or r.url in blocked
                    else blocked.append(r.url))
            page.goto(html_path.as_uri(), wait_until="load", timeout=timeout_s * 1000)
            # wait until every image has finished (successfully or not) before reading naturalWidth
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=timeout_s * 1000)
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.currentSrc.slice(0, 60), w: e.naturalWidth}))")
            title = page.title()
            shot = None
            if screenshot is not None:
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=full_page)
        finally:
            browser.close()
    return {
        "title": title,
        "images": len(images),
        "broken_images": [i["src"] for i in images if i["w"] == 0],
        "console_errors": console_errors,
        "blocked_requests": blocked,
        "screenshot": str(shot) if shot else None,
    }


def problems(result: dict) -> list[str]:
    """Human-readable list of what ``check_page`` found wrong (empty when the page is fine)."""
    out = [f"image does not decode: {s}..." for s in result["broken_images"]]
    out += [f"console error: {e}" for e in result["console_errors"]]
    out += [f"network request attempted: {u}" for u in result["blocked_requests"]]
    if result["images"] == 0:
        out.append("the page has no images")
    return out
