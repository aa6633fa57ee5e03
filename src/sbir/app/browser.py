"""Drive the ``sbir app`` page in a real browser (Playwright with the system's Chromium): the browser
test and the latency benchmark draw sketches with it, and the README's screenshot is taken with it.

Nothing here downloads a browser: :func:`find_chromium` looks for the one the system package manager
installed (``apt-get install chromium`` on Debian; `.ci/run` does it), and Playwright is pointed at it
with ``executable_path``. Playwright is a development dependency, imported only when a browser starts."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The system Chromium (``$SBIR_CHROMIUM`` first, then the usual names on PATH), or None."""
    env = os.environ.get("SBIR_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else shutil.which(env)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 860), executable: str | None = None) -> Iterator[Any]:
    """A Playwright page in a headless system Chromium; closed (browser and driver) when the block ends."""
    from playwright.sync_api import sync_playwright

    path = executable or find_chromium()
    if path is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or set SBIR_CHROMIUM)")
    # as root (CI, containers) Chromium refuses to start its sandbox
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def stroke3_to_canvas_strokes(s3: np.ndarray, box: dict[str, float], margin: float = 0.12) -> list[np.ndarray]:
    """A stroke-3 sketch -> absolute point lists in page coordinates, fitted (aspect kept, centred) into
    the element box ``{x, y, width, height}`` less ``margin`` of its side on every edge."""
    from sbir.strokes import stroke3_to_polylines

    polylines = [np.asarray(p, dtype=np.float64) for p in stroke3_to_polylines(np.asarray(s3)) if len(p)]
    pts = np.concatenate(polylines)
    lo, hi = pts.min(0), pts.max(0)
    side = min(box["width"], box["height"]) * (1 - 2 * margin)
    scale = side / max(float((hi - lo).max()), 1e-6)
    centre = np.array([box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    return [centre + (p - (lo + hi) / 2) * scale for p in polylines]


def draw_stroke3(page: Any, s3: np.ndarray, canvas: str = "#pad") -> None:
    """Draw a stroke-3 sketch on the page's canvas with the mouse: down, move through its points, up."""
    box = page.locator(canvas).bounding_box()
    for stroke in stroke3_to_canvas_strokes(s3, box):
        page.mouse.move(float(stroke[0][0]), float(stroke[0][1]))
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(float(x), float(y))
        if len(stroke) == 1:  # a dot
            page.mouse.move(float(stroke[0][0]) + 0.5, float(stroke[0][1]))
        page.mouse.up()


def search_drawn(page: Any, s3: np.ndarray, k: int, timeout_ms: float = 30_000) -> dict[str, Any]:
    """Clear the canvas, draw ``s3``, press Search and wait for ``k`` result tiles (live search off).
    Returns the classes of the tiles in rank order, the page's latency line and the click-to-results time."""
    page.uncheck("#live")
    page.fill("#k", str(k))
    page.click("#clear")
    draw_stroke3(page, s3)
    t0 = time.perf_counter()
    page.click("#search")
    page.wait_for_selector(f'#results[data-count="{k}"]', timeout=timeout_ms)
    seconds = time.perf_counter() - t0
    classes = page.eval_on_selector_all("#results .tile", "tiles => tiles.map(t => t.dataset.className)")
    return {"classes": classes, "latency_text": page.inner_text("#latency"), "click_to_results_s": seconds}


def sketches_of(dataset: str | os.PathLike, split: str = "test", per_class: int = 2,
                classes: Sequence[str] | None = None) -> list[tuple[str, str, np.ndarray]]:
    """(id, class, stroke-3) of the first ``per_class`` stored sketches of each class of a prepared dataset."""
    from sbir.data.format import open_dataset, strokes_from_arrow

    t = open_dataset(dataset).read("sketches", columns=["id", "class_name", "strokes"], splits=[split])
    strokes = strokes_from_arrow(t.column("strokes"))
    taken: dict[str, int] = {}
    out = []
    for sid, cls, s3 in zip(t.column("id").to_pylist(), t.column("class_name").to_pylist(), strokes):
        if (classes is None or cls in classes) and taken.get(cls, 0) < per_class and len(s3):
            taken[cls] = taken.get(cls, 0) + 1
            out.append((sid, cls, s3))
    return out
