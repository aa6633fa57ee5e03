#!/usr/bin/env python
"""Latency of `sbir app` (the draw-and-search page) on the default pipeline's outputs, in a real browser.

    .venv/bin/python benchmarks/bench_app.py [--per-class 2] [--k 8] [--out FILE] [--screenshot PNG]

Starts the app as `make app` does (the three default models, the test split of data/prepared as the
gallery) on 127.0.0.1 with a fresh embedding cache in a temporary folder (so the start-up time
includes embedding the gallery with each model), then opens the page in the system Chromium
(Playwright) and, for every model, draws ``--per-class`` stored test sketches of each class on the
canvas with the mouse and presses Search. Per search it records:

* ``search_ms``: the server's time to rasterise the strokes, embed the sketch and take the top-k over
  the cached gallery embeddings (what the page calls "search");
* ``server_ms``: the above plus reading the k result photos and encoding them for the page;
* ``page_round_trip_ms``: measured by the page itself, from sending the request until the k results
  are in the page (HTTP, JSON, DOM): what the page shows as "round trip";
* ``click_to_results_ms``: from the driving script's click on Search until Playwright sees the k
  results (adds Playwright's own messaging and polling to the above);
* whether the top-1 photo's class is the drawn sketch's class.

Writes the figures (median, 90th percentile, max per model) to ``--out`` (default
benchmarks/results/app_latency.json); ``--screenshot`` also saves the page with the results of
drawing ``--screenshot-sketch`` with ``--screenshot-model`` (docs/img/app.png in the README).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": round(statistics.median(ordered), 1), "p90": round(p90, 1), "max": round(ordered[-1], 1)}


def _searches(page, model: str, sketches, k: int) -> dict:
    from sbir.app.browser import search_drawn

    page.select_option("#model", model)
    rows = []
    for sid, cls, s3 in sketches:
        result = search_drawn(page, s3, k)
        timing = page.evaluate("lastTiming")
        rows.append({"id": sid, "class": cls, "top1": result["classes"][0], "search_ms": timing["search"],
                     "server_ms": timing["server"], "page_round_trip_ms": timing["roundTrip"],
                     "click_to_results_ms": result["click_to_results_s"] * 1000})
    return {"searches": len(rows),
            "search_ms": _summary([r["search_ms"] for r in rows]),
            "server_ms": _summary([r["server_ms"] for r in rows]),
            "page_round_trip_ms": _summary([r["page_round_trip_ms"] for r in rows]),
            "click_to_results_ms": _summary([r["click_to_results_ms"] for r in rows]),
            "click_to_results_under_1s": sum(r["click_to_results_ms"] < 1000 for r in rows),
            "top1_is_drawn_class": round(sum(r["top1"] == r["class"] for r in rows) / len(rows), 3)}


def _screenshot(page, args, sketches_by_id) -> None:
    from sbir.app.browser import search_drawn

    page.select_option("#model", args.screenshot_model)
    search_drawn(page, sketches_by_id[args.screenshot_sketch], args.k)
    page.screenshot(path=str(args.screenshot), full_page=True)
    print(f"screenshot: {args.screenshot}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=2, help="test sketches drawn per class and model")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "app_latency.json")
    ap.add_argument("--screenshot", type=Path, default=None, help="also save the page with results here")
    ap.add_argument("--screenshot-model", default="crossx_dfl")
    ap.add_argument("--screenshot-sketch", default="fish_test_00003_s0")
    args = ap.parse_args(argv)

    from sbir.app.browser import chromium_page, sketches_of
    from sbir.app.cli import build_app
    from sbir.app.server import serve_in_background
    from sbir.cli import build_parser
    from sbir.tracking import git_commit

    os.chdir(REPO)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        app = build_app(build_parser().parse_args(["app", "--cache", cache, "-k", str(args.k)]))
        startup_s = time.perf_counter() - t0
        sketches = sketches_of(REPO / "data" / "prepared", per_class=args.per_class)
        models = {}
        with serve_in_background(app) as base, chromium_page() as page:
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready='1']")
            for model in page.eval_on_selector_all("#model option:not([disabled])", "os => os.map(o => o.value)"):
                models[model] = _searches(page, model, sketches, args.k)
                print(model, json.dumps(models[model]))
            options = page.evaluate("fetch('/api/options').then(r => r.json())")
            if args.screenshot:
                every = sketches_of(REPO / "data" / "prepared", per_class=10**6)
                _screenshot(page, args, {sid: s3 for sid, _, s3 in every})
    import torch

    out = {"what": "sbir app on the default outputs: draw a stored test sketch on the canvas, press Search",
           "gallery": options["galleries"][0], "k": args.k,
           "sketches_per_model": len(sketches), "startup_s_with_embedding": round(startup_s, 1), "models": models,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "load_avg_before": [round(x, 2) for x in load_before],
                       "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
           "git_commit": git_commit(), "command": "python benchmarks/bench_app.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {args.out}")
    return out


if __name__ == "__main__":
    main()
