#!/usr/bin/env python
"""One training stage on one node against the same stage on a 2-node Ray cluster, and where the time goes.

    python benchmarks/cluster_stage.py [--epochs 4] [--out benchmarks/results/cluster_stage.json]

Runs ``teacher_pretrain`` of the default params (its dataset, 2 Ray Train workers of 1 CPU, ``--epochs``
epochs) twice from clean run folders: on a local single-node Ray instance (what ``dvc repro`` does), then
on a local 2-node cluster (``sbir.train.local_cluster``: two node processes on this machine, 2 CPUs each,
``ray.placement_strategy: SPREAD`` so one worker lands on each node, Ray results on a shared
``ray.storage_path``). Per run it records the stage's wall time, the Ray Train fit's time, the epochs'
compute time (``epoch_seconds`` of history.json), hence the time to the first epoch (worker group start,
data loading) and the rest (reports, checkpoints, teardown), plus each worker's node id. The 2-node
cluster's own start (its raylets, GCS, agents) is timed apart. Both "nodes" share this machine's cores,
so the comparison shows the cluster path's fixed costs, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def run_once(label: str, params: dict, work: Path) -> dict:
    from sbir.stage import run_stage

    path = work / f"{label}.yaml"
    path.write_text(yaml.safe_dump(params))
    start = time.time()
    metrics = run_stage("teacher_pretrain", ["--params", str(path), "--no-mlflow", "--restart"])
    wall = time.time() - start
    out = Path(params["outputs_dir"]) / "teacher_pretrain"
    history = json.loads((out / "history.json").read_text())
    compute = sum(h["epoch_seconds"] for h in history)
    train = float(metrics["train_seconds"])
    return {"stage_wall_seconds": round(wall, 1), "fit_seconds": round(train, 1),
            "epoch_compute_seconds": round(compute, 1), "fit_overhead_seconds": round(train - compute, 1),
            "outside_fit_seconds": round(wall - train, 1), "worker_nodes": metrics.get("worker_nodes"),
            "photo_teacher_test_acc": metrics["photo_teacher_test_acc"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cluster_stage.json"))
    args = ap.parse_args(argv)

    from sbir.train.local_cluster import local_cluster

    work = Path(tempfile.mkdtemp(prefix="cluster_stage-"))
    os.environ["SBIR_RAY_RESULTS"] = str(work / "ray_results")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["dataset_dir"] = str((REPO / base["dataset_dir"]).resolve())
    base["teacher_pretrain"]["epochs"] = args.epochs
    base["ray"].update(num_workers=2, cpus_per_worker=1)
    single = {**base, "outputs_dir": str(work / "single"), "ray": dict(base["ray"])}
    runs = {"single_node": run_once("single_node", single, work)}
    import ray

    ray.shutdown()
    start = time.time()
    with local_cluster((2, 2)) as cluster:
        cluster_start = time.time() - start
        two = {**base, "outputs_dir": str(work / "two"),
               "ray": {**base["ray"], "address": cluster.address, "placement_strategy": "SPREAD",
                       "storage_path": str(work / "shared")}}
        runs["two_nodes"] = run_once("two_nodes", two, work)
        runs["two_nodes"]["cluster_start_seconds"] = round(cluster_start, 1)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_end": os.getloadavg()}, "epochs": args.epochs, "runs": runs}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
