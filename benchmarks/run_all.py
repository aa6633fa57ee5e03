#!/usr/bin/env python
"""Run the benchmark suite: ingest, search, training (Ray overhead) and pipeline (stage times and memory).

    python benchmarks/run_all.py [--only ingest search training pipeline] [--skip ...]
                                 [--ingest-args "..."] [--search-args "..."] [--training-args "..."]
                                 [--out benchmarks/results/suite.json] [--doc docs/benchmarks.md] [--no-doc]

Each part is one script in benchmarks/ (run alone for details and more options):

* ``ingest``   -> bench_ingest.py: Quick Draw ndjson and image-folder ingest throughput, peak RSS
  (needs the real samples in ../shared/data or $SBIR_SHARED_DATA);
* ``search``   -> bench_search.py: `sbir search` exact top-k latency and memory beside faiss;
* ``training`` -> bench_training.py: samples/s of every training stage in-process vs 1 and 2 Ray workers;
* ``pipeline`` -> bench_pipeline.py: runs nothing; collects the wall time and peak memory every stage of
  the last `dvc repro` wrote (outputs/<stage>/resources.json).

The suite writes all figures plus the machine (CPU model, cores, RAM, GPU, torch/ray versions, load
average before and after, git commit) to ``benchmarks/results/suite.json`` and renders a short markdown
summary into ``docs/benchmarks.md`` between the ``suite:begin``/``suite:end`` markers (a rerun replaces
it). A part that fails is recorded with its error and the suite exits 1; the other parts still run.

The default sizes suit a 2-core CPU machine (~15 min in all). On a GPU machine, e.g.:
``--training-args "--scale 10" --search-args "--sizes 1000 100000 1000000 --threads 8"``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

PARTS = ["pipeline", "ingest", "search", "training"]  # cheap first; training starts Ray in this process
DEFAULT_ARGS = {"ingest": "--drawings 10000 --images 1000",
                "search": "--sizes 1000 100000 --reps 5",
                "training": "",
                "pipeline": ""}
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


def cpu_model_name() -> str | None:
    """The CPU model from /proc/cpuinfo where there is one, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, library versions, load average, git commit."""
    import psutil
    import torch

    cpu_model = cpu_model_name()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("ray", "mlflow", "dvc", "faiss", "pyarrow", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed / no version: recorded as such
            versions[mod] = None

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"hostname": platform.node(), "platform": platform.platform(), "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(), "cpu_count_physical": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpus": gpus,
            "cuda": torch.version.cuda if gpus else None, "versions": versions,
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _run_ingest(args: list[str]) -> dict[str, Any]:
    import bench_ingest

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ingest.json"
        rc = bench_ingest.main([str(out), *args])
        if rc not in (0, None):
            raise RuntimeError(f"bench_ingest exited with {rc}")
        return json.loads(out.read_text())


def _run_search(args: list[str]) -> dict[str, Any]:
    import bench_search

    if "--out" not in args:  # keep engineer A's committed figures (search.json) unless asked
        args = [*args, "--out", str(Path(tempfile.gettempdir()) / "sbir_suite_search.json")]
    return bench_search.main(args)


def _run_training(args: list[str]) -> dict[str, Any]:
    import bench_training

    return bench_training.main(args)


def _run_pipeline(args: list[str]) -> dict[str, Any]:
    import bench_pipeline

    return bench_pipeline.main(args)


RUNNERS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "ingest": _run_ingest, "search": _run_search, "training": _run_training, "pipeline": _run_pipeline}


# ------------------------------------------------------------------------------------------ markdown
def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def render_markdown(suite: dict[str, Any]) -> str:
    m = suite["machine"]
    parts = suite["parts"]
    out = [f"Last run: {suite['started']} UTC, {suite['seconds']:.0f} s; commit `{(m['git_commit'] or '?')[:10]}`"
           f"{' (uncommitted changes)' if m['git_dirty'] else ''}.",
           f"Machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs, {m['ram_gib']} GiB RAM, "
           f"GPU: {', '.join(m['gpus']) or 'none'}; torch {m['versions']['torch']}, ray {m['versions']['ray']}. "
           f"Load average before / after: {suite['load_average_start']} / {suite['load_average_end']} "
           "(the machine was shared with other jobs: read the figures as sizes, not promises).", ""]
    tr = parts.get("training", {}).get("result")
    if tr:
        ws = [str(w) for w in tr["workers"]]
        out += ["**Training** (samples/s; fit wall time in brackets; ratio = in-process samples/s ÷ Ray samples/s, "
                f"so >1 is Ray's overhead; `--scale {tr['scale']}`):", "",
                "| stage | " + " | ".join("in-process" if w == "0" else f"{w} worker{'s' if w != '1' else ''}" for w in ws)
                + " | " + " | ".join(f"ratio {w}w" for w in ws if w != "0") + " |",
                "|---|" + "---|" * (len(ws) + len([w for w in ws if w != "0"]))]
        for name, rows in tr["stages"].items():
            cells = [f"{_fmt(rows[w]['samples_per_s'])} ({_fmt(rows[w]['fit_seconds'])} s)" for w in ws]
            ratios = [_fmt(rows[w].get("overhead_ratio"), 2) for w in ws if w != "0"]
            out.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
        out += ["", "Fixed fit cost (a trivial one-epoch loop): "
                + ", ".join(f"{'in-process' if w == '0' else w + ' worker(s)'} {s} s" for w, s in tr["fixed_seconds"].items())
                + (f"; `ray.init` {tr['ray_init_seconds']} s." if "ray_init_seconds" in tr else "."), ""]
    pl = parts.get("pipeline", {}).get("result")
    if pl:
        out += ["**Pipeline** (last `dvc repro`; peak RSS of the stage's process tree, Ray workers included):", "",
                "| stage | status | wall s | peak RSS MiB (sum) | peak PSS MiB | processes |", "|---|---|---|---|---|---|"]
        for r in pl["stages"]:
            out.append(f"| {r['stage']} | {r['status']} | {_fmt(r.get('wall_seconds'))} | "
                       f"{_fmt(r.get('peak_rss_mib'))} | {_fmt(r.get('peak_pss_mib'))} | {_fmt(r.get('peak_processes'))} |")
        out += ["", f"Total {pl['total_wall_seconds']} s; stages {pl['counts']}.", ""]
    ing = parts.get("ingest", {}).get("result")
    if ing:
        out += ["**Ingest** (all work: parsing, validation, rendering, PNG encoding, Parquet writing):", "",
                "| case | inputs | seconds | rate | peak RSS MB |", "|---|---|---|---|---|"]
        for r in ing.get("cases", []):
            rate = r.get("drawings_per_s") or r.get("images_per_s")
            unit = "drawings/s" if r["case"] == "quickdraw" else "images/s"
            note = " (tracemalloc on)" if r.get("tracemalloc") else ""
            out.append(f"| {r['case']}{note} | {r['n_input']:,} | {r['seconds']} | {_fmt(rate)} {unit} | "
                       f"{_fmt(r.get('peak_rss_mb'))} |")
        out.append("")
    se = parts.get("search", {}).get("result")
    if se and se.get("memory"):
        out += ["**Search** (exact top-k, one query / one batch, ms):", "", "| gallery | ours query | ours batch | "
                "faiss query | faiss batch |", "|---|---|---|---|---|"]
        for r in se["memory"]:
            out.append(f"| {r.get('n', '?'):,} | {_fmt(r.get('ours_query_ms'), 2)} | {_fmt(r.get('ours_batch_ms'))} | "
                       f"{_fmt(r.get('faiss_query_ms'), 2)} | {_fmt(r.get('faiss_batch_ms'))} |")
        out.append("")
    failed = [k for k, v in parts.items() if v.get("status") == "failed"]
    if failed:
        out.append(f"Failed parts: {', '.join(failed)} (errors in suite.json).")
    return "\n".join(out).rstrip() + "\n"


def update_doc(doc: Path, body: str) -> None:
    """Replace the text between the suite markers (or append them)."""
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\n"
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    p.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="skip these parts")
    for part in PARTS:
        p.add_argument(f"--{part}-args", default=DEFAULT_ARGS[part],
                       help=f"arguments for bench_{part}.py (default: {DEFAULT_ARGS[part]!r})")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "suite.json", help="suite JSON")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md", help="markdown to update")
    p.add_argument("--no-doc", action="store_true", help="do not touch the markdown")
    p.add_argument("--keep-previous", action="store_true",
                   help="keep the previous suite.json figures of parts not run this time")
    args = p.parse_args(argv)
    parts = [x for x in (args.only or PARTS) if x not in args.skip]
    suite: dict[str, Any] = {"started": dt.datetime.utcnow().isoformat(timespec="seconds"),
                             "load_average_start": [round(x, 2) for x in os.getloadavg()],
                             "machine": machine_info(), "parts": {}}
    if args.keep_previous and args.out.is_file():
        suite["parts"] = {k: v for k, v in json.loads(args.out.read_text()).get("parts", {}).items() if k not in parts}
    t0 = time.time()
    for part in parts:
        print(f"\n===== {part} =====", flush=True)
        t = time.time()
        try:
            result = RUNNERS[part](shlex.split(getattr(args, f"{part}_args")))
            suite["parts"][part] = {"status": "ok", "seconds": round(time.time() - t, 1), "result": result}
        except (Exception, SystemExit) as exc:  # record and go on: one broken part must not hide the rest
            traceback.print_exc()
            suite["parts"][part] = {"status": "failed", "seconds": round(time.time() - t, 1),
                                    "error": f"{type(exc).__name__}: {exc}"}
    suite.update(seconds=round(time.time() - t0, 1), load_average_end=[round(x, 2) for x in os.getloadavg()])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(suite, indent=2, default=str))
    md = render_markdown(suite)
    print("\n" + md)
    if not args.no_doc:
        update_doc(args.doc, md)
        print(f"updated {args.doc}")
    print(f"wrote {args.out}")
    failed = [k for k, v in suite["parts"].items() if v["status"] == "failed"]
    if failed:
        print(f"failed parts: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
