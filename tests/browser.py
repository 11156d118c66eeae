"""Open the page `dvc plots show` writes in headless Chromium and report what rendered.

The page loads Vega from a CDN; machines here have no internet, so a copy of the page loads
the same Vega releases from a local folder instead (`make browser` fetches them from the npm
registry). Also usable by hand, for the README's screenshot of the whole page:

    dvc plots show && python -m tests.browser dvc_plots/index.html --screenshot docs/plots-page.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from html import unescape
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
VEGA_DIR = Path(os.environ.get("IMAGECLF_VEGA_DIR", PROJECT / ".cache" / "vega"))
CDN_SCRIPT = re.compile(r"https://cdn\.jsdelivr\.net/npm/(vega|vega-lite|vega-embed)@[\d.]+")

# Runs before the page's own scripts: keeps the Vega view of every plot, to read what it drew.
RECORD_VIEWS = """
<script>
window.renderedViews = {};
const embedPlot = window.vegaEmbed;
window.vegaEmbed = (element, spec, options) => {
  const result = embedPlot(element, spec, options);
  result.then(embedded => { window.renderedViews[element.replace(/^#/, "")] = embedded.view; });
  return result;
};
</script>
"""

# Runs in the page once it has loaded: for every element with an id, whether Vega drew marks
# in it, and from its Vega scenegraph every line drawn (stroke colour, dash pattern, revisions,
# points) and every axis' tick labels; for every image, whether it decoded; and the page height.
# The result goes into the DOM Chromium dumps, hidden so that screenshots do not show it.
PROBE = """
<script>
function drawnLines(view) {
  const lines = [], axes = [];
  const visit = node => {
    if (node.marktype === "line" && node.items.length) {
      const first = node.items[0];
      lines.push({
        stroke: first.stroke,
        dash: (first.strokeDash || []).join(","),
        revs: [...new Set(node.items.map(item => item.datum && item.datum.rev))],
        points: node.items.filter(item => isFinite(item.x) && isFinite(item.y)).length,
      });
    }
    if (node.role === "axis" && node.items.length) {
      const labels = [];
      const collect = inner => {
        if (inner.role === "axis-label") inner.items.forEach(item => labels.push(item.text));
        (inner.items || []).forEach(collect);
      };
      collect(node);
      axes.push({orient: node.items[0].orient || (node.items[0].datum || {}).orient, labels});
    }
    (node.items || []).forEach(visit);
  };
  visit(view.scenegraph().root);
  return {lines, axes};
}
window.addEventListener("load", () => setTimeout(() => {
  const plots = {}, drawn = {};
  document.querySelectorAll("div[id]").forEach(div => {
    plots[div.id] = !!div.querySelector(".marks");
    if (window.renderedViews[div.id]) drawn[div.id] = drawnLines(window.renderedViews[div.id]);
  });
  const images = {};
  document.querySelectorAll("img").forEach(img => {
    images[img.getAttribute("src")] = img.complete && img.naturalWidth > 0;
  });
  const height = Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY) + 8;
  const out = document.createElement("pre");
  out.id = "render-report";
  out.hidden = true;
  out.textContent = JSON.stringify({plots, drawn, images, height});
  document.body.appendChild(out);
}, 2000));
</script>
"""

WIDTH = 1400  # pixels, of the window and so of screenshots
FLAGS = [
    "--headless",
    "--hide-scrollbars",  # a scrollbar would narrow the page, and so change its height
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


def render(page: Path, screenshot: Path | None = None, height: int | None = None) -> dict:
    """Render `page` (a `dvc plots show` index.html) in headless Chromium.

    Returns {"plots": {id: drawn}, "lines": {id: [line]}, "axes": {id: [axis]},
    "images": {src: decoded}}: for each Vega plot, every line it drew as {"stroke": colour,
    "dash": "6,4" ("" if none set), "revs": [revision], "points": count}, and every axis as
    {"orient": "bottom", "labels": [tick label]}. With `screenshot`, also saves a PNG of the
    page, `height` pixels tall (default: the whole page)."""
    html = page.read_text(encoding="utf-8")
    html, replaced = CDN_SCRIPT.subn(lambda m: _script(m.group(1)).as_uri(), html)
    if replaced != 3:
        raise ValueError(f"{page}: expected 3 Vega scripts from the CDN, found {replaced}")
    with tempfile.NamedTemporaryFile(
        "w", suffix=".html", dir=page.parent, delete=False, encoding="utf-8"
    ) as local:
        local.write(
            html.replace("</head>", RECORD_VIEWS + "</head>", 1).replace(
                "</body>", PROBE + "</body>"
            )
        )
    try:
        with tempfile.TemporaryDirectory() as profile:
            command = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
            dom = subprocess.run(
                # as wide as the screenshot, so that the page height measured here fits it
                [*command, f"--window-size={WIDTH},1000", "--dump-dom", Path(local.name).as_uri()],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
            report = re.search(r'<pre id="render-report"[^>]*>(.*?)</pre>', dom, re.DOTALL)
            if report is None:
                raise AssertionError(f"{page}: the page did not finish loading in Chromium")
            seen = json.loads(unescape(report.group(1)))
            if screenshot is not None:
                subprocess.run(
                    [
                        *command,
                        f"--screenshot={screenshot.resolve()}",
                        f"--window-size={WIDTH},{height or seen['height']}",
                        Path(local.name).as_uri(),
                    ],
                    capture_output=True,
                    timeout=120,
                    check=True,
                )
    finally:
        os.unlink(local.name)
    embedded = re.findall(r"vegaEmbed\('#([^']+)'", html)
    drawn = seen["drawn"]
    return {
        "plots": {plot: seen["plots"].get(plot, False) for plot in embedded},
        "lines": {plot: drawn.get(plot, {}).get("lines", []) for plot in embedded},
        "axes": {plot: drawn.get(plot, {}).get("axes", []) for plot in embedded},
        "images": seen["images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a `dvc plots show` page in Chromium.")
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument(
        "--height", type=int, help="screenshot height in pixels (default: the whole page)"
    )
    args = parser.parse_args()
    if reason := missing_tools():
        raise SystemExit(reason)
    print(json.dumps(render(args.page, args.screenshot, args.height), indent=2))


if __name__ == "__main__":
    main()
