#!/usr/bin/env python
"""The fixed cost of a Ray Train stage on this machine: what a stage pays before and after its loop.

    python benchmarks/ray_fixed_costs.py [--repeats 3] [--workers 1 2] [--out benchmarks/results/ray_fixed_costs.json]

Each measurement runs in a fresh Python process, as a `dvc repro` stage does, and fits the project's
smoke loop (``sbir.train.smoke.regression_loop``: 3 epochs of a linear model, one report and checkpoint
per epoch, so compute is nil) through ``sbir.train.runtime.run_training``. Per process it records

* ``import_seconds``: importing torch and Ray (what every stage process pays first);
* ``init_seconds``: ``ray.init`` (a new local instance, or joining a running one with ``ray.address``);
* ``first_step_seconds``: from ``fit()`` to the loop's first line on a worker (worker start-up);
* ``fit_seconds``: the whole ``fit()`` (start-up, 3 reports with checkpoints, teardown);
* ``process_seconds``: the process's wall time, start to exit (``ray.shutdown`` included).
* ``seconds_per_report``: with ``--report-epochs N``, the extra fit time of N epochs over 3, per extra report
  (each epoch of the smoke loop is one report with a checkpoint and next to no compute).

Modes: ``own`` (the stage starts its own Ray, today's default), ``joined`` (a head started once with
``ray start --head`` that every stage joins: the instance `make repro` keeps for a whole run) and
``local`` (``ray.num_workers: 0``: the loop in the stage's process, no Ray workers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
t0 = time.time()
sys.path.insert(0, {src!r})
import torch, ray
from sbir.config import RayParams
from sbir.train import runtime as rt
from sbir.train.smoke import regression_loop
t_import = time.time()
params = RayParams(num_workers={workers})  # joins $SBIR_RAY_ADDRESS when set (mode joined)
rt.ray_environment(params)
if params.num_workers:
    rt.ensure_ray(params)
t_init = time.time()
marker = {marker!r}

def loop(config):
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(time.time()))
    regression_loop(config)

outcome = rt.run_training("fixed_cost", loop, {{"epochs": {epochs}}}, params, "digest", resume="never",
                          storage_root=__import__("pathlib").Path({storage!r}))
t_fit = time.time()
ray.shutdown()
first = float(open(marker).read())
print("RESULT " + json.dumps({{"import_seconds": t_import - t0, "init_seconds": t_init - t_import,
                              "first_step_seconds": first - t_init, "fit_seconds": t_fit - t_init,
                              "shutdown_seconds": time.time() - t_fit}}))
"""


def one_process(workers: int, env: dict[str, str], epochs: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(src=str(REPO / "src"), workers=workers, epochs=epochs,
                            marker=os.path.join(tmp, "first_step"), storage=os.path.join(tmp, "ray"))
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.time() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_seconds"] = wall
    return {k: round(v, 2) for k, v in result.items()}


def start_head() -> dict[str, str]:
    """A head started the way `make repro` starts it; returns the environment that makes a stage join it."""
    sys.path.insert(0, str(REPO / "src"))
    from sbir.train import shared_ray

    return shared_ray.start()


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = runs[0].keys()
    return {k: {"mean": round(statistics.mean(r[k] for r in runs), 2),
                "values": [r[k] for r in runs]} for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--modes", nargs="+", default=["local", "own", "joined"], choices=["local", "own", "joined"])
    parser.add_argument("--report-epochs", type=int, default=13,
                        help="also fit this many epochs (one report + checkpoint each) to price one report")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ray_fixed_costs.json")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    results: dict[str, dict] = {}
    for mode in args.modes:
        joined: dict[str, str] = {}
        if mode == "joined":
            t = time.time()
            joined = start_head()
            results["head_start_seconds"] = round(time.time() - t, 2)
        try:
            for workers in ([0] if mode == "local" else args.workers):
                key = f"{mode}/{workers}_workers"
                runs = [one_process(workers, {**env, **joined}) for _ in range(args.repeats)]
                results[key] = summarise(runs)
                print(key, {k: v["mean"] for k, v in results[key].items()}, flush=True)
                if args.report_epochs > 3:  # the smoke loop's epochs cost nothing: the difference is the reports
                    longer = [one_process(workers, {**env, **joined}, args.report_epochs) for _ in range(args.repeats)]
                    extra = [b["fit_seconds"] - b["first_step_seconds"] - (a["fit_seconds"] - a["first_step_seconds"])
                             for a, b in zip(runs, longer)]
                    results[key]["seconds_per_report"] = {
                        "mean": round(statistics.mean(extra) / (args.report_epochs - 3), 3),
                        "values": [round(e / (args.report_epochs - 3), 3) for e in extra]}
                    print(key, "seconds per report + checkpoint:", results[key]["seconds_per_report"]["mean"], flush=True)
        finally:
            if joined:
                from sbir.train import shared_ray

                shared_ray.stop(joined)
    record = {"what": "fixed cost of one Ray Train stage process (benchmarks/ray_fixed_costs.py)",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeats": args.repeats,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average_end": list(os.getloadavg())},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
