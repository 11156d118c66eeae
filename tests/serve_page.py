"""The page of a running `imageclf serve` in headless Chromium (Debian's `chromium`, driven by
Playwright for Python; no browser download): upload image files through its file input and read
what it shows. Also usable by hand, for the README's screenshot:

    imageclf serve &
    python -m tests.serve_page http://127.0.0.1:8000 photos/*.jpg --screenshot docs/serve-page.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def missing_tools() -> str | None:
    """Why the page cannot be opened here, or None."""
    if shutil.which("chromium") is None:
        return "no Chromium on this machine (Debian: apt-get install chromium; or `make browser`)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -r requirements-dev.txt)"
    return None


@contextlib.contextmanager
def open_page(url: str, width: int = 1100, height: int = 800) -> Iterator[Any]:
    """A Playwright page showing `url` in headless Chromium, `width` CSS pixels wide."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, as CI does
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            yield page
        finally:
            browser.close()


def upload(page: Any, files: list[Path]) -> list[dict]:
    """Pick `files` in the page's file input, wait until every one is classified (or failed),
    and return what each card shows, newest first: its file name, class labels and bar widths
    in order, the top class it reports, and its error, if any."""
    page.set_input_files("#files", [str(file) for file in files])
    page.wait_for_function(
        f"document.querySelectorAll('.card').length >= {len(files)}"
        " && !document.querySelector('.card[aria-busy]')",
        timeout=60_000,
    )
    return page.locator(".card").evaluate_all(
        """cards => cards.map(card => ({
            file: card.querySelector(".file").textContent,
            labels: [...card.querySelectorAll(".bar .label")].map(label => label.textContent),
            widths: [...card.querySelectorAll(".bar .fill")].map(
                fill => fill.getBoundingClientRect().width),
            top: card.dataset.topClass || null,
            error: card.querySelector(".error") ? card.querySelector(".error").textContent : null,
            preview: card.querySelector("img").naturalWidth,
        }))"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Upload images to the imageclf serve page.")
    parser.add_argument("url", help="the page, e.g. http://127.0.0.1:8000/")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--screenshot", type=Path, help="save a full-page PNG here")
    parser.add_argument("--width", type=int, default=1100, help="CSS pixels (default: 1100)")
    args = parser.parse_args()
    if reason := missing_tools():
        raise SystemExit(reason)
    with open_page(args.url, args.width) as page:
        print(json.dumps(upload(page, args.files), indent=2))
        if args.screenshot:
            page.screenshot(path=str(args.screenshot), full_page=True)


if __name__ == "__main__":
    main()
