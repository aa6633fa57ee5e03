"""Seed spread of the semi-supervised FG-SBIR results.

Runs the four fine-grained stages (sketch_generator -> pseudo_pairs -> fgsbir_joint -> fg_evaluate)
once per seed, each seed in its own output folder (``--work``/seed_<n>), with the repository's
params plus ``--set`` overrides, and prints mean ± std (over seeds) of Acc@1/5/10 per model. The
data-free students are read from ``--students`` (default outputs/distill/students.pt; the data-free
stages are not rerun) and the teachers (G's encoder, the pseudo sketches' class check) are linked from
``--teachers`` (default: the params' outputs). Writes a JSON with the per-seed numbers and the summary.

    python benchmarks/bench_fgsbir_seeds.py                       # seeds 0 1 2, the params file's Ray workers
    python benchmarks/bench_fgsbir_seeds.py --seeds 0 1 --set fgsbir_joint.ablations=[no_weighting]
    python benchmarks/bench_fgsbir_seeds.py --stages fgsbir_joint fg_evaluate --set fg_evaluate.generated_queries=false \
        --set fgsbir_joint.variants=[supervised,full] --set fgsbir_joint.ablations=[oracle_sketches]   # no G needed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"  # the science budgets (the default cuts them)
sys.path.insert(0, str(REPO / "src"))
STAGES = ["sketch_generator", "pseudo_pairs", "fgsbir_joint", "fg_evaluate"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", default=str(FULL_PARAMS))
    ap.add_argument("--workers", type=int, default=None,
                    help="ray.num_workers (0: in-process local mode; default: the params file's)")
    ap.add_argument("--students", default=str(REPO / "outputs/distill/students.pt"))
    ap.add_argument("--teachers", default=None,
                    help="a teacher_pretrain output folder, linked into each seed's folder (G's encoder and the "
                         "pseudo sketches' class check read it; default: the params' <outputs_dir>/teacher_pretrain)")
    ap.add_argument("--work", default=str(REPO / "benchmarks/results/fgsbir_seeds"), help="per-seed output folders")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/fgsbir_seeds.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra param overrides for every stage (repeatable)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES,
                    help="the stages to run per seed (the oracle ablation without semi needs no G: "
                         "fgsbir_joint fg_evaluate, with fg_evaluate.generated_queries=false)")
    ap.add_argument("--collect-only", action="store_true",
                    help="run nothing: read each seed's stage metrics from --work (an earlier or interrupted run)")
    args = ap.parse_args(argv)

    import numpy as np

    from sbir.stage import run_stage

    work = Path(args.work).resolve()
    os.environ.setdefault("SBIR_RAY_RESULTS", str(work / "ray_results"))
    stages = args.stages
    per_seed: dict[int, dict] = {}
    from sbir.config import load_params

    teachers = Path(args.teachers or REPO / load_params(args.params).outputs_dir / "teacher_pretrain").resolve()
    for seed in args.seeds:
        out = work / f"seed_{seed}"
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "teacher_pretrain").exists() and not args.collect_only:
            if not (teachers / "teachers.pt").is_file():
                raise SystemExit(f"{teachers}/teachers.pt not found: run the params' pipeline first, or pass --teachers")
            (out / "teacher_pretrain").symlink_to(teachers)
        sets = [f"seed={seed}", f"outputs_dir={out}", f"fgsbir_joint.students_path={Path(args.students).resolve()}",
                *([f"ray.num_workers={args.workers}"] if args.workers is not None else []), *args.overrides]
        argv_s = ["--params", args.params, "--no-mlflow", "--restart"] + [x for s in sets for x in ("--set", s)]
        seconds = {}
        for name in stages:
            if args.collect_only:
                seconds[name] = json.loads((out / name / "stage_metrics.json").read_text())["stage_seconds"]
                continue
            t0 = time.time()
            run_stage(name, argv_s)
            seconds[name] = round(time.time() - t0, 1)
        metrics = json.loads((out / "fg_evaluate" / "metrics.json").read_text())
        joint = json.loads((out / "fgsbir_joint" / "metrics.json").read_text())  # G's reward, D's weights
        per_seed[seed] = {"metrics": metrics, "seconds": seconds,
                          "joint": {k: v for k, v in joint.items() if "g_reward" in k or "pseudo_weight" in k}}
        print(f"seed {seed}: " + ", ".join(f"{k} {v} s" for k, v in seconds.items()), flush=True)

    models = []
    for m in per_seed[args.seeds[0]]["metrics"]:
        name = m.rsplit("/", 1)[0]
        if m.endswith(f"/acc@{args.ks[0]}") and name not in models and name != "semi_minus_supervised":
            models.append(name)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in models:
        summary[name] = {}
        for k in args.ks:
            vals = np.array([per_seed[s]["metrics"][f"{name}/acc@{k}"] for s in args.seeds], dtype=float)
            summary[name][f"acc@{k}"] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                         "values": vals.tolist()}
        ranks = np.array([per_seed[s]["metrics"].get(f"{name}/mean_rank", np.nan) for s in args.seeds], dtype=float)
        summary[name]["mean_rank"] = {"mean": float(ranks.mean()), "values": ranks.tolist()}
    gains = np.array([per_seed[s]["metrics"].get("semi_minus_supervised/acc@1", float("nan")) for s in args.seeds])
    lines = [f"FG-SBIR over seeds {args.seeds} (mean ± std, sample std)",
             "| model | " + " | ".join(f"Acc@{k}" for k in args.ks) + " |", "|---" * (len(args.ks) + 1) + "|"]
    for name in models:
        lines.append(f"| {name} | " + " | ".join(f"{summary[name][f'acc@{k}']['mean']:.4f} ± {summary[name][f'acc@{k}']['std']:.4f}"
                                                 for k in args.ks) + " |")
    if np.isfinite(gains).all():
        lines.append(f"semi - supervised, Acc@1 per seed: {gains.round(4).tolist()} (semi better in "
                     f"{int((gains > 0).sum())}/{len(gains)})")
    text = "\n".join(lines)
    print(text)
    result = {"seeds": args.seeds, "overrides": args.overrides, "workers": args.workers, "summary": summary,
              "per_seed": {str(s): v for s, v in per_seed.items()}, "table": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
