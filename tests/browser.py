"""Open the page `dvc plots show` writes in headless Chromium and report what rendered.

The page loads Vega from a CDN; machines here have no internet, so a copy of the page loads
the same Vega releases from a local folder instead (`make browser` fetches them from the npm
registry). Also usable by hand, for screenshots:

    python -m tests.browser dvc_plots/index.html --screenshot plots-page.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
VEGA_DIR = Path(os.environ.get("IMAGECLF_VEGA_DIR", PROJECT / ".cache" / "vega"))
CDN_SCRIPT = re.compile(r"https://cdn\.jsdelivr\.net/npm/(vega|vega-lite|vega-embed)@[\d.]+")

# Runs in the page once it has loaded: for every element with an id, whether Vega drew marks
# in it, and for every image, whether it decoded; the result goes into the DOM Chromium dumps.
PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const plots = {};
  document.querySelectorAll("div[id]").forEach(div => {
    plots[div.id] = !!div.querySelector(".marks");
  });
  const images = {};
  document.querySelectorAll("img").forEach(img => {
    images[img.getAttribute("src")] = img.complete && img.naturalWidth > 0;
  });
  const out = document.createElement("pre");
  out.id = "render-report";
  out.textContent = JSON.stringify({plots, images});
  document.body.appendChild(out);
}, 2000));
</script>
"""

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=20000",
]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def missing_tools() -> str | None:
    """Why the page cannot be rendered here, or None."""
    if chromium() is None:
        return "no Chromium on this machine (Debian: apt-get install chromium; or `make browser`)"
    missing = [n for n in ("vega", "vega-lite", "vega-embed") if not _script(n).is_file()]
    if missing:
        return f"no local copy of {', '.join(missing)} in {VEGA_DIR} (`make browser` fetches them)"
    return None


def _script(name: str) -> Path:
    return VEGA_DIR / f"{name}.min.js"


def render(page: Path, screenshot: Path | None = None, height: int = 8000) -> dict:
    """Render `page` (a `dvc plots show` index.html); returns {"plots": {id: drawn},
    "images": {src: decoded}}. With `screenshot`, also saves a full-page PNG."""
    html = page.read_text(encoding="utf-8")
    html, replaced = CDN_SCRIPT.subn(lambda m: _script(m.group(1)).as_uri(), html)
    if replaced != 3:
        raise ValueError(f"{page}: expected 3 Vega scripts from the CDN, found {replaced}")
    with tempfile.NamedTemporaryFile(
        "w", suffix=".html", dir=page.parent, delete=False, encoding="utf-8"
    ) as local:
        local.write(html.replace("</body>", PROBE + "</body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            command = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
            dom = subprocess.run(
                [*command, "--dump-dom", Path(local.name).as_uri()],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
            if screenshot is not None:
                subprocess.run(
                    [
                        *command,
                        f"--screenshot={screenshot.resolve()}",
                        f"--window-size=1400,{height}",
                        "--hide-scrollbars",
                        Path(local.name).as_uri(),
                    ],
                    capture_output=True,
                    timeout=120,
                    check=True,
                )
    finally:
        os.unlink(local.name)
    report = re.search(r'<pre id="render-report">(.*?)</pre>', dom, re.DOTALL)
    if report is None:
        raise AssertionError(f"{page}: the page did not finish loading in Chromium")
    seen = json.loads(report.group(1).replace("&quot;", '"'))
    embedded = re.findall(r"vegaEmbed\('#([^']+)'", html)
    return {
        "plots": {plot: seen["plots"].get(plot, False) for plot in embedded},
        "images": seen["images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a `dvc plots show` page in Chromium.")
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--height", type=int, default=8000)
    args = parser.parse_args()
    if reason := missing_tools():
        raise SystemExit(reason)
    print(json.dumps(render(args.page, args.screenshot, args.height), indent=2))


if __name__ == "__main__":
    main()
