#!/usr/bin/env python
"""Distill's resident memory and round time: the BN prior's hooks collecting on every teacher pass (as
before the fix) against only inside the estimator objective (now).

    python benchmarks/distill_memory.py [--outputs DIR] [--rounds 240] [--out benchmarks/results/distill_memory.json]

``--outputs`` is a pipeline outputs folder with ``teacher_pretrain`` and a ``reconstruct`` bank (default: the
default pipeline's ``outputs``). Each setting runs in its own fresh process: the distill loop's own pieces
(the bank as the pairs source, the students' steps, as ``reconstruct.synthesis: fast`` runs them: no estimator
step), ``--rounds`` rounds, the process's resident memory and the seconds so far every 20 rounds.
``hooks_always_on`` switches the hooks on for the whole run, which is what they did before
``BNStatsPrior.collecting``: every student batch's teacher pass added statistics that nothing read until the
next estimator step (never, in fast synthesis).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def rss_mb() -> float:
    """This process's resident memory (psutil, as sbir.resources measures the stages)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(outputs: Path, rounds: int, hooks_always_on: bool) -> dict:
    """One setting, in this process: the curve of resident memory and round time."""
    import torch

    from sbir.config import load_params
    from sbir.dfsbir import distill as D
    from sbir.models.checkpoints import load_teachers
    from sbir.train.precision import LoopDevice

    torch.set_num_threads(os.cpu_count() or 1)
    root = load_params(REPO / "params.yaml")
    recon = root.reconstruct.model_copy(update={"synthesis": "fast"})
    p = root.distill.for_synthesis(recon)
    teachers, blob = load_teachers(outputs / "teacher_pretrain" / "teachers.pt")
    config = {"estimators_path": str(outputs / "reconstruct" / "estimators.pt"),
              "bank_path": str(outputs / "reconstruct" / "bank.parquet"), "reconstruct_params": recon}
    source = D.ReconstructedPairs(config, p, teachers, blob["num_classes"],
                                  LoopDevice.from_config({"ray": root.ray}, torch.device("cpu")))
    for prior in source.objective.bn_priors:
        prior.active = hooks_always_on
    students, proxies, opt = D.build_student_side(p, teachers, blob, 0, torch.device("cpu"))
    shared = D.shares_frozen_backbones(students, teachers, p)
    gen, sums = torch.Generator().manual_seed(0), {}
    start_mb, curve, t0 = rss_mb(), [], time.time()
    for rnd in range(rounds):
        D.student_steps(students, proxies, opt, teachers, source, p, gen, rnd, sums, shared)
        if (rnd + 1) % 20 == 0 or rnd + 1 == rounds:
            curve.append({"round": rnd + 1, "rss_growth_mb": round(rss_mb() - start_mb, 1),
                          "seconds": round(time.time() - t0, 2)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
    return {"hooks_always_on": hooks_always_on, "rounds": rounds, "start_rss_mb": round(start_mb, 1), "curve": curve,
            "seconds_per_round": round(curve[-1]["seconds"] / rounds, 4),
            "rss_growth_mb": curve[-1]["rss_growth_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", type=Path, default=REPO / "outputs")
    ap.add_argument("--rounds", type=int, default=240)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/distill_memory.json")
    ap.add_argument("--one", choices=["hooks_always_on", "objective_only"], help=argparse.SUPPRESS)  # a child
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.outputs.resolve(), args.rounds, args.one == "hooks_always_on")))
        return
    if not (args.outputs / "reconstruct" / "bank.parquet").is_file():
        raise SystemExit(f"{args.outputs}/reconstruct/bank.parquet not found: run `make repro` first")
    settings = {}
    for name in ("hooks_always_on", "objective_only"):  # each in a fresh process (its own heap)
        child = subprocess.run([sys.executable, __file__, "--outputs", str(args.outputs), "--rounds", str(args.rounds),
                                "--one", name], check=True, stdout=subprocess.PIPE, text=True)
        settings[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(name, {k: v for k, v in settings[name].items() if k != "curve"}, flush=True)
    record = {"what": "distill student rounds (fast synthesis recipe): resident memory and time with the BN "
                      "prior's hooks on for every teacher pass (before) and only in the estimator objective "
                      "(now) (benchmarks/distill_memory.py)",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": str(args.outputs),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "settings": settings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
