#!/usr/bin/env python
"""Steady-state training throughput of the Ray path against the same loop in the stage's own process.

    python benchmarks/ray_steady_state.py [--epochs 1 4] [--out benchmarks/results/ray_steady_state.json]

Runs the real ``teacher_pretrain`` stage (``python -m sbir run teacher_pretrain``, the repository's params,
no MLflow) in each mode, with every core of the machine in use either way:

* ``in_process``: ``ray.num_workers: 0``: Ray Train's local mode, the loop in the stage's process, with
  ``torch_threads_per_worker`` = the machine's cores;
* ``ray_workers``: ``ray.num_workers: 2`` Ray worker processes (DDP over gloo) with one thread each.

Each mode runs twice, for the two ``--epochs`` values; the loop's compute time (``time_split.compute``
in ``outputs/teacher_pretrain/resources.json``: the loop minus its reports) of the longer run minus the
shorter one's is the steady-state time of the extra epochs, free of start-up, warm-up and teardown.
Samples per second = the training images an epoch visits (photos + sketches, each teacher its own
modality, the modality net both; counted from the dataset manifest) x extra epochs / that time.
``ratio`` = Ray path / in-process samples per second (issue #15's bar: >= 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"in_process": {"ray.num_workers": 0, "ray.torch_threads_per_worker": os.cpu_count() or 1},
         "ray_workers": {"ray.num_workers": 2, "ray.torch_threads_per_worker": 1}}


def run_stage(mode: str, epochs: int, params: Path, dataset_dir: Path) -> dict:
    """One teacher_pretrain process; its training records (resources.json) and wall time."""
    sets = {**MODES[mode], "teacher_pretrain.epochs": epochs, "dataset_dir": str(dataset_dir)}
    with tempfile.TemporaryDirectory(prefix="steady-") as tmp:
        sets["outputs_dir"] = tmp
        argv = [sys.executable, "-m", "sbir", "run", "teacher_pretrain", "--params", str(params), "--no-mlflow",
                "--restart"] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SBIR_RAY_RESULTS=os.path.join(tmp, "ray_results"))
        start = time.time()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{mode}, {epochs} epochs failed:\n{proc.stderr[-3000:]}")
        resources = json.loads(Path(tmp, "teacher_pretrain", "resources.json").read_text())
    splits = [t["time_split"] for t in resources["trainings"] if t.get("time_split")]
    if not splits:
        raise RuntimeError(f"{mode}: the fit recorded no time split")
    return {"epochs": epochs, "wall_seconds": round(wall, 2), "time_split": splits[0]}


def images_per_epoch(dataset_dir: Path) -> int:
    """Training images one teacher_pretrain epoch visits: each teacher its modality, the modality net both."""
    counts = json.loads((dataset_dir / "manifest.json").read_text())["counts"]
    train = {kind: sum(counts[kind]["train"].values()) for kind in ("photos", "sketches")}
    return 2 * (train["photos"] + train["sketches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 4], metavar=("SHORT", "LONG"))
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--dataset-dir", type=Path, default=REPO / "data" / "prepared",
                        help="a prepared dataset (`python -m sbir run prepare` writes data/prepared)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ray_steady_state.json")
    args = parser.parse_args()
    short, long = sorted(args.epochs)
    if long <= short:
        parser.error("--epochs needs two different values")
    images = images_per_epoch(args.dataset_dir)
    results: dict[str, dict] = {}
    for mode in MODES:
        runs = [run_stage(mode, e, args.params, args.dataset_dir) for e in (short, long)]
        extra = runs[1]["time_split"]["compute"] - runs[0]["time_split"]["compute"]
        results[mode] = {"settings": MODES[mode], "runs": runs, "steady_seconds_per_epoch": round(extra / (long - short), 3),
                         "samples_per_second": round(images * (long - short) / extra, 1)}
        print(mode, results[mode]["steady_seconds_per_epoch"], "s/epoch,", results[mode]["samples_per_second"],
              "samples/s", flush=True)
    ratio = results["ray_workers"]["samples_per_second"] / results["in_process"]["samples_per_second"]
    record = {"what": "steady-state throughput, Ray workers vs in-process (benchmarks/ray_steady_state.py)",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": "teacher_pretrain", "images_per_epoch": images,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average_end": list(os.getloadavg())},
              "results": results, "ratio_ray_over_in_process": round(ratio, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"Ray path / in-process samples per second: {ratio:.3f}\nwrote {args.out}")


if __name__ == "__main__":
    main()
