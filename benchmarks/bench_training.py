#!/usr/bin/env python
"""Ray Train overhead per training stage: samples/s of each stage's own loop in-process (Ray Train local
mode, ``ray.num_workers: 0``: the plain PyTorch loop, same code, no worker processes) against 1 and 2 real
Ray Train workers, on the same model, data and params.

    python benchmarks/bench_training.py [--workers 0 1 2] [--stages teacher_pretrain ...] [--scale 1.0]
                                        [--set key=value ...] [--out benchmarks/results/training.json]

What it does: builds a small embedded dataset and runs the stages in pipeline order in a temporary folder
(prepare once, pseudo_pairs once, each training stage once per worker count; MLflow off), in this one
process, so Ray starts once (its start is timed apart). Per stage and worker count it records

* ``fit_seconds``: ``TorchTrainer.fit()`` wall time (worker start-up, loop, reports, teardown);
* ``samples``: training samples the loop processed (from the params: steps x per-worker batch x workers;
  formulas in ``samples_processed``); ``samples_per_s`` = samples / fit_seconds;
* ``steady_samples_per_s``: samples / (fit_seconds - fixed_seconds), where ``fixed_seconds`` is the fit
  time of a trivial one-epoch loop with the same worker count (start-up + teardown): an estimate of the
  throughput once the workers run;
* ``overhead_ratio`` = local samples/s / samples/s (>1: slower than the plain loop) and the same for
  the steady figure.

Sizes are small so the whole script takes ~10 min on 2 shared CPU cores; ``--scale`` multiplies every
step/epoch count (e.g. ``--scale 10`` on a GPU machine, where ``ray.use_gpu: auto`` gives each worker a
GPU and local mode uses one GPU in-process). On 2 cores, 2 workers share 2 cores with the driver and Ray's
own processes, so expect no speed-up there: the figure is the overhead, not scaling.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sbir.registry import TRAINING_STAGES  # noqa: E402

# Small but real sizes (every count is multiplied by --scale).
BASE_PARAMS: dict[str, Any] = {
    "prepare": {"num_classes": 6, "train_instances_per_class": 48, "test_instances_per_class": 8},
    "teacher_pretrain": {"epochs": 3, "batch_size": 32},
    "reconstruct": {"steps": 20, "batch_size": 32, "log_every": 10, "bank_size": 64,
                    "synthesis": "alternation"},  # the steps and rounds that --scale multiplies
    "distill": {"rounds": 10, "student_steps": 2, "batch_size": 32, "log_every": 5},
    "upper_bound": {"max_steps": 40, "eval_every": 20, "batch_size": 32},
    "sketch_generator": {"steps": 30, "batch_size": 16, "log_every": 15, "history_every": 5, "eval_pairs": 16,
                         "num_preview": 2, "kl_anneal_steps": 30},
    "pseudo_pairs": {"num_preview": 4},
    "fgsbir_joint": {"supervised_steps": 10, "joint_steps": 10, "batch_size": 16, "pseudo_batch_size": 16,
                     "log_every": 10, "history_every": 5, "discriminator": {"warmup_steps": 5},
                     "policy_gradient": {"every": 2, "batch_size": 8}},
}
SCALED = {"teacher_pretrain": ["epochs"], "reconstruct": ["steps"], "distill": ["rounds"], "upper_bound": ["max_steps"],
          "sketch_generator": ["steps"], "fgsbir_joint": ["supervised_steps", "joint_steps"]}


def samples_processed(stage: str, root: Any, workers: int, num_train_photos: int) -> int:
    """Training samples one fit processes (per-worker batches: more workers = a larger global batch)."""
    w = max(1, workers)
    if stage == "teacher_pretrain":
        p = root.teacher_pretrain
        steps = max(1, num_train_photos // (p.batch_size * w))
        return p.epochs * steps * p.batch_size * w  # photos (as many sketches go through the sketch teacher)
    if stage == "reconstruct":
        return root.reconstruct.steps * root.reconstruct.batch_size * w  # generated pairs
    if stage == "distill":
        p = root.distill
        return p.rounds * p.student_steps * p.batch_size * w  # student pairs
    if stage == "upper_bound":
        return root.upper_bound.max_steps * root.upper_bound.batch_size * w  # real pairs (an upper limit: it may stop early)
    if stage == "sketch_generator":
        return root.sketch_generator.steps * root.sketch_generator.batch_size * w  # photo-sketch pairs
    if stage == "fgsbir_joint":
        from sbir.fgsbir.joint import variant_specs

        p = root.fgsbir_joint
        return sum(s.steps for s in variant_specs(p)) * p.batch_size * w  # labelled triplets (pseudo extra)
    raise ValueError(f"unknown training stage {stage!r}")


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def _fixed_cost(workers: int, storage: Path) -> float:
    """fit() time of a trivial one-epoch loop: Ray Train's fixed start-up + teardown for this worker count."""
    from sbir.config import RayParams
    from sbir.train import runtime as rt
    from sbir.train.smoke import regression_loop

    out = rt.run_training(f"fixed_{workers}", regression_loop, {"epochs": 1, "n": 64},
                          RayParams(num_workers=workers, max_failures=0), params_digest="fixed", resume="never",
                          storage_root=storage)
    return out.seconds


def run(workers: list[int], stages: list[str], scale: float, overrides: list[str], workdir: Path) -> dict[str, Any]:
    import yaml

    os.environ["SBIR_RAY_RESULTS"] = str(workdir / "ray_results")
    os.environ["SBIR_NO_MLFLOW"] = "1"
    from sbir.config import RayParams, load_params
    from sbir.stage import parse_overrides, run_stage
    from sbir.train import runtime as rt

    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), json.loads(json.dumps(BASE_PARAMS)))
    for section, keys in SCALED.items():
        for k in keys:
            if params[section].get(k) is not None:
                params[section][k] = max(1, int(round(params[section][k] * scale)))
    params.update(outputs_dir=str(workdir / "outputs"), dataset_dir=str(workdir / "data" / "prepared"),
                  pipeline="bench-training")
    params_path = workdir / "params.yaml"
    for key, value in parse_overrides(overrides).items():  # validated below, with the file
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    params_path.write_text(yaml.safe_dump(params))
    root = load_params(params_path)

    def stage(name: str, n_workers: int) -> dict[str, Any]:
        n_before = len(rt.TRAINING_LOG)
        t0 = time.time()
        metrics = run_stage(name, argv=["--params", str(params_path), "--no-mlflow", "--restart", "--set",
                                        f"ray.num_workers={n_workers}"])
        wall = time.time() - t0
        fits = rt.TRAINING_LOG[n_before:]
        return {"stage_seconds": round(wall, 2), "fit_seconds": round(sum(f["train_seconds"] for f in fits), 2)
                if fits else None, "metrics": metrics}

    results: dict[str, Any] = {"workers": workers, "scale": scale, "params": {k: params[k] for k in BASE_PARAMS},
                               "stages": {}, "fixed_seconds": {}}
    print("prepare (dataset) ...", flush=True)
    stage("prepare", 0)
    from sbir.data.format import open_dataset

    from sbir.data.datasets import load_image_set

    n_train_photos = len(load_image_set(open_dataset(root.dataset_dir), "photos", ["train"]))
    results["num_train_photos"] = n_train_photos

    if any(w > 0 for w in workers):
        t0 = time.time()
        rt.ensure_ray(RayParams(num_workers=max(workers)))
        results["ray_init_seconds"] = round(time.time() - t0, 2)
    for w in workers:
        print(f"fixed cost, {w} worker(s) ...", flush=True)
        if w == 0:
            _fixed_cost(0, workdir / "fixed")  # warm-up: the first local fit pays Ray Train's imports
        results["fixed_seconds"][str(w)] = round(_fixed_cost(w, workdir / "fixed"), 2)

    needed = set(stages)
    # upstream stages each selected stage needs (run once, local mode, not timed) when not benchmarked
    upstream = {"reconstruct": ["teacher_pretrain"], "distill": ["teacher_pretrain", "reconstruct"],
                "upper_bound": ["teacher_pretrain"], "fgsbir_joint": ["teacher_pretrain", "reconstruct", "distill",
                                                                      "sketch_generator", "pseudo_pairs"]}
    order = ["teacher_pretrain", "reconstruct", "distill", "upper_bound", "sketch_generator", "pseudo_pairs",
             "fgsbir_joint"]
    required = set().union(*(upstream.get(s, []) for s in needed)) if needed else set()
    for name in order:
        if name not in needed:
            if name in required:
                print(f"{name}: upstream input, local mode, not timed ...", flush=True)
                stage(name, 0)
            continue
        rows: dict[str, Any] = {}
        for w in workers:
            print(f"{name}: {w} worker(s){' (local mode)' if w == 0 else ''} ...", flush=True)
            r = stage(name, w)
            samples = samples_processed(name, root, w, n_train_photos)
            fit = r["fit_seconds"]
            fixed = results["fixed_seconds"][str(w)]
            rows[str(w)] = {"fit_seconds": fit, "stage_seconds": r["stage_seconds"], "samples": samples,
                            "samples_per_s": round(samples / fit, 2) if fit else None,
                            "steady_samples_per_s": round(samples / (fit - fixed), 2) if fit and fit > fixed + 0.5
                            else None}
            print(f"  fit {fit} s, {samples} samples, {rows[str(w)]['samples_per_s']} samples/s "
                  f"(steady ~{rows[str(w)]['steady_samples_per_s']})", flush=True)
        base = rows.get("0")
        for w, row in rows.items():
            if base and w != "0":
                row["overhead_ratio"] = round(base["samples_per_s"] / row["samples_per_s"], 2) \
                    if row["samples_per_s"] else None
                row["steady_overhead_ratio"] = round(base["steady_samples_per_s"] / row["steady_samples_per_s"], 2) \
                    if base.get("steady_samples_per_s") and row.get("steady_samples_per_s") else None
        results["stages"][name] = rows
    return results


def render(results: dict[str, Any]) -> str:
    ws = [str(w) for w in results["workers"]]
    head = f"{'stage':<18}" + "".join(f"{'w=' + w + ' samples/s':>18}" for w in ws) + \
        "".join(f"{'ratio w=' + w:>11}" for w in ws if w != "0")
    lines = [head]
    for name, rows in results["stages"].items():
        line = f"{name:<18}" + "".join(f"{str(rows[w]['samples_per_s']) + ' (' + str(rows[w]['fit_seconds']) + ' s)':>18}"
                                        for w in ws)
        line += "".join(f"{str(rows[w].get('overhead_ratio')):>11}" for w in ws if w != "0")
        lines.append(line)
    lines.append("fixed fit cost (trivial loop): " + ", ".join(f"w={w}: {s} s" for w, s in results["fixed_seconds"].items())
                 + (f"; ray.init {results['ray_init_seconds']} s" if "ray_init_seconds" in results else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="worker counts; 0 = in-process local mode, the baseline (default: 0 1 2)")
    p.add_argument("--stages", nargs="+", default=TRAINING_STAGES, choices=TRAINING_STAGES,
                   help="training stages to measure (default: all six)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step/epoch count (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for every run, e.g. --set ray.use_gpu=true (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "training.json",
                   help="result JSON (default benchmarks/results/training.json)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    if 0 not in args.workers:
        print("note: without --workers 0 there is no local-mode baseline, so no overhead ratio", file=sys.stderr)
    t0 = time.time()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(args.workers, args.stages, args.scale, args.overrides, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="sbir-bench-training-") as tmp:
            results = run(args.workers, args.stages, args.scale, args.overrides, Path(tmp))
    import torch

    results.update(total_seconds=round(time.time() - t0, 1), cpu_count=os.cpu_count(),
                   load_average_end=[round(x, 2) for x in os.getloadavg()], torch=torch.__version__,
                   cuda=torch.cuda.is_available(), python=platform.python_version())
    print(render(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out} ({results['total_seconds']} s)")
    return results


if __name__ == "__main__":
    main()
