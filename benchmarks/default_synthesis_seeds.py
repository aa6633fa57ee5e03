"""The default pipeline's headline metrics with each synthesis recipe, over seeds (issue #15: the 5-minute
default must leave the science issues' default metrics no worse than they were).

    python benchmarks/default_synthesis_seeds.py [--seeds 0 1 2] [--recipes alternation fast] [--work DIR]

Per seed (the training seed; the dataset is the default's ``data/prepared``, as in bench_fgsbir_seeds.py),
in-process with the default params (local mode, 2 threads, as ``dvc repro`` runs them): sketch_generator and
pseudo_pairs once (they do not depend on the synthesis), then per recipe reconstruct -> distill -> evaluate
(category level: CrossX-DFL mAP@all) -> fgsbir_joint -> fg_evaluate (F starts from the distilled students:
Acc@1 / Acc@10 / mean rank of supervised-only, semi and full). The teachers and the upper bound are the
default run's (``outputs/``: run ``make repro`` first). Writes ``--out`` with every seed's numbers, the
stage seconds and mean ± std per recipe.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHARED = ("teacher_pretrain", "upper_bound")  # linked from the default run
PER_SEED = ("sketch_generator", "pseudo_pairs")
PER_RECIPE = ("reconstruct", "distill", "evaluate", "fgsbir_joint", "fg_evaluate")
KEYS = ["crossx_dfl/mAP@all"] + [f"{v}/{m}" for v in ("supervised", "semi", "full")
                                 for m in ("acc@1", "acc@10", "mean_rank")]


def run_stages(stages: tuple[str, ...], argv: list[str]) -> dict[str, float]:
    from sbir.stage import run_stage

    seconds = {}
    for name in stages:
        t0 = time.time()
        run_stage(name, argv)
        seconds[name] = round(time.time() - t0, 2)
    return seconds


def link_shared(outputs: Path, source: Path) -> None:
    outputs.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (source / name).is_dir():
            raise SystemExit(f"{source / name} not found: run `make repro` first")
        if not (outputs / name).exists():
            (outputs / name).symlink_to((source / name).resolve())


def one_seed(seed: int, recipes: list[str], work: Path, source: Path) -> dict[str, dict]:
    base = work / f"seed{seed}"
    shared_out = base / "shared"
    link_shared(shared_out, source)
    argv = ["--params", str(REPO / "params.yaml"), "--no-mlflow", "--restart", "--set", f"seed={seed}"]
    g_seconds = run_stages(PER_SEED, argv + ["--set", f"outputs_dir={shared_out}"])
    runs = {}
    for recipe in recipes:
        out = base / recipe
        link_shared(out, source)
        for name in PER_SEED:
            if not (out / name).exists():
                (out / name).symlink_to((shared_out / name).resolve())
        seconds = run_stages(PER_RECIPE, argv + ["--set", f"outputs_dir={out}",
                                                 "--set", f"reconstruct.synthesis={recipe}"])
        metrics = {**json.loads((out / "evaluate" / "metrics.json").read_text()),
                   **json.loads((out / "fg_evaluate" / "metrics.json").read_text())}
        runs[recipe] = {"metrics": {k: metrics[k] for k in KEYS}, "stage_seconds": {**g_seconds, **seconds}}
        print(f"seed {seed} {recipe}: " + ", ".join(f"{k} {metrics[k]}" for k in KEYS), flush=True)
    return runs


def summary(per_seed: dict[int, dict], recipes: list[str]) -> dict[str, dict]:
    out = {}
    for recipe in recipes:
        out[recipe] = {}
        for key in KEYS:
            values = [per_seed[s][recipe]["metrics"][key] for s in sorted(per_seed)]
            out[recipe][key] = {"mean": round(statistics.mean(values), 4),
                                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                                "values": values}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["alternation", "fast"], choices=["alternation", "fast"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/default_synthesis_seeds"))
    ap.add_argument("--source", type=Path, default=REPO / "outputs", help="the default run's outputs folder")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/default_synthesis_seeds.json")
    args = ap.parse_args()
    os.environ.setdefault("SBIR_RAY_RESULTS", str(args.work / "ray_results"))
    per_seed = {seed: one_seed(seed, args.recipes, args.work.resolve(), args.source.resolve()) for seed in args.seeds}
    record = {"what": "the default pipeline's CrossX-DFL mAP@all and fine-grained Acc@1/10/mean rank per synthesis "
                      "recipe (benchmarks/default_synthesis_seeds.py)",
              "date": dt.datetime.now().isoformat(timespec="seconds"), "seeds": args.seeds,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "summary": summary(per_seed, args.recipes), "per_seed": per_seed}
    args.out.write_text(json.dumps(record, indent=2))
    for recipe, row in record["summary"].items():
        print(recipe.ljust(12), "  ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
