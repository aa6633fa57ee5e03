#!/usr/bin/env python
"""Ingest throughput and peak memory.

    PYTHONPATH=src python benchmarks/bench_ingest.py [RESULT.json] [--drawings 50000] [--images 3000]

Cases (each run in a fresh child process so that peak RSS belongs to that case alone):

* ``quickdraw``: one simplified ndjson class file of ``--drawings`` lines, synthesised from the real
  Quick Draw sample lines (../shared/data/quickdraw_simplified25, or $SBIR_SHARED_DATA; with fresh
  key_ids), streamed into Parquet with sketches rendered at ``--image-size``. It is run at N/5 and
  at N drawings: if memory is bounded, peak RSS does not grow with N. The small run also records
  tracemalloc's peak of Python allocations (tracemalloc slows it down, so its rate is not reported).
* ``images``: a flat Sketchy-like folder of ``--images`` JPEG photos (128 x 128) and as many PNG
  sketches in 10 classes, generated in a temporary folder.

Figures: drawings/s or images/s (wall clock, all work included: parsing, validation, rendering,
PNG encoding, Parquet writing), peak RSS (``resource.getrusage``), RSS after imports, and the
difference. The JSON goes to RESULT.json (default benchmarks/results/bench_ingest.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def shared_data() -> Path:
    return Path(os.environ.get("SBIR_SHARED_DATA", REPO.parent / "shared" / "data"))


# --------------------------------------------------------------------------- input synthesis
def make_ndjson(path: Path, n: int) -> int:
    """Write n simplified-ndjson lines (class 'bench') cycling through the real sample drawings."""
    src = sorted((shared_data() / "quickdraw_simplified25" / "data").glob("*.ndjson"))
    if not src:
        raise SystemExit(f"real Quick Draw sample not found under {shared_data()} (set SBIR_SHARED_DATA)")
    base = []
    for f in src:
        for line in f.read_text().splitlines():
            if line.strip():
                base.append(json.loads(line))
    with open(path, "w") as fh:
        for i in range(n):
            rec = dict(base[i % len(base)])
            rec["word"] = "bench"
            rec["key_id"] = str(10**15 + i)
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
    return n


def make_image_folder(root: Path, n: int, classes: int = 10) -> int:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    for i in range(n):
        cls = f"class_{i % classes:02d}"
        stem = f"n{i % classes:08d}_{i}"
        (root / "photo" / cls).mkdir(parents=True, exist_ok=True)
        (root / "sketch" / cls).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        img = np.stack([(base[c] + xx * (c + 1) + yy) % 256 for c in range(3)], axis=-1).astype(np.uint8)
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "photo" / cls / f"{stem}.jpg", "JPEG", quality=85)
        sk = np.full((256, 256), 255, np.uint8)
        r = int(rng.integers(20, 120))
        sk[128 - r:128 + r, 128 - r] = 0
        sk[128 - r, 128 - r:128 + r] = 0
        Image.fromarray(sk).convert("RGB").save(root / "sketch" / cls / f"{stem}-1.png", "PNG")
    return n


# --------------------------------------------------------------------------- child
def child(case: str, n: int, image_size: int, trace: bool) -> dict:
    import scipy.io  # noqa: F401  (imported lazily by some adapters: keep it out of the ingest figures)
    import svgelements  # noqa: F401
    import torch  # noqa: F401

    import sbir.strokes  # noqa: F401
    from sbir.data.ingest import IngestOptions, ingest_quickdraw, ingest_sketchy

    rss_after_imports = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if case == "quickdraw":
            (tmp / "in").mkdir()
            make_ndjson(tmp / "in" / "bench.ndjson", n)
        else:
            make_image_folder(tmp / "in", n)
        t_make = time.perf_counter() - t0
        input_mb = sum(f.stat().st_size for f in (tmp / "in").rglob("*") if f.is_file()) / 2**20
        rss_before = _rss_mb()
        if trace:
            import tracemalloc

            tracemalloc.start()
        opts = IngestOptions(progress=False, image_size=image_size)
        t0 = time.perf_counter()
        if case == "quickdraw":
            rep = ingest_quickdraw(tmp / "in", tmp / "out", opts)
        else:
            rep = ingest_sketchy(tmp / "in", tmp / "out", opts)
        dt = time.perf_counter() - t0
        traced = None
        if trace:
            import tracemalloc

            traced = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        out_mb = sum(f.stat().st_size for f in (tmp / "out").rglob("*") if f.is_file()) / 2**20
    totals = rep.manifest["totals"]
    res = {
        "case": case, "n_input": n, "image_size": image_size, "seconds": round(dt, 2),
        "input_synthesis_seconds": round(t_make, 2), "input_mb": round(input_mb, 1), "output_mb": round(out_mb, 1),
        "photos": totals["photos"], "sketches": totals["sketches"], "issues": rep.n_issues,
        "rss_after_imports_mb": round(rss_after_imports, 1), "rss_before_ingest_mb": round(rss_before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_minus_before_mb": round(_peak_rss_mb() - rss_before, 1),
        "tracemalloc_peak_mb": None if traced is None else round(traced, 1),
        "tracemalloc": trace,
    }
    if case == "quickdraw":
        res["drawings_per_s"] = round(totals["sketches"] / dt, 1)
    else:
        res["images_per_s"] = round((totals["photos"] + totals["sketches"]) / dt, 1)
        res["photos_per_s"] = round(totals["photos"] / dt, 1)
    return res


def run_child(case: str, n: int, image_size: int, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--n", str(n), "--image-size", str(image_size)]
    if trace:
        cmd.append("--trace")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"benchmark case {case} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", nargs="?", type=Path, default=REPO / "benchmarks" / "results" / "bench_ingest.json",
                   help="JSON file to write the figures to (default %(default)s)")
    p.add_argument("--drawings", type=int, default=50_000, help="Quick Draw drawings (default %(default)s)")
    p.add_argument("--images", type=int, default=3_000, help="photos (and as many sketches) (default %(default)s)")
    p.add_argument("--image-size", type=int, default=256, help="sketch render size (default %(default)s)")
    p.add_argument("--child", choices=("quickdraw", "images"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.image_size, args.trace)))
        return 0

    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "loadavg_at_start": os.getloadavg()}, "cases": []}
    plan = [("quickdraw", max(1, args.drawings // 5), True), ("quickdraw", args.drawings, False),
            ("images", args.images, False)]
    for case, n, trace in plan:
        print(f"running {case} n={n}{' (tracemalloc)' if trace else ''} ...", flush=True)
        res = run_child(case, n, args.image_size, trace)
        results["cases"].append(res)
        rate = res.get("drawings_per_s") or res.get("images_per_s")
        unit = "drawings/s" if case == "quickdraw" else "images/s"
        print(f"  {res['seconds']} s, {rate} {unit}{' (slowed by tracemalloc)' if trace else ''}, "
              f"peak RSS {res['peak_rss_mb']} MB (+{res['peak_rss_minus_before_mb']} MB during ingest)"
              + (f", tracemalloc peak {res['tracemalloc_peak_mb']} MB" if trace else ""), flush=True)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
