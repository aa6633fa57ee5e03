"""Seed spread of the category-level data-free SBIR results (CrossX-DFL and the paper's baselines).

Per seed, in its own output folder (``--work``/<split>/seed_<n>): the data-free chain
(teacher_pretrain -> reconstruct -> distill), the data-dependent upper bound and evaluate, run through
the same stage entry point as ``dvc repro`` with the repository's params plus ``--set`` overrides; then
the uni-modal data-free baseline (``unimodal_dfl``): each student distilled from its own teacher's
reconstructions with no cross-modal term anywhere (no class alignment in synthesis, no cross-modal
triplet, each student's proxies its own teacher's final-layer rows), from the same teachers.

Writes ``benchmarks/results/dfsbir_seeds.json`` (layout of fgsbir_seeds.json: summary -> method ->
metric -> mean/std/values) with the methods chance, classifier_only_best, unimodal_dfl, crossx_dfl and
upper_bound, the per-seed figures, teacher accuracies and stage times.

    python benchmarks/bench_dfsbir_seeds.py                    # seeds 0 1 2, in-process (ray.num_workers=0)
    python benchmarks/bench_dfsbir_seeds.py --seeds 0 --workers 2 --set distill.rounds=50
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

METHODS = ("chance", "classifier_only_best", "unimodal_dfl", "crossx_dfl", "upper_bound")
METRICS = ("mAP@all", "mAP@200", "P@100", "P@200")
# the uni-modal baseline: no cross-modal term in synthesis or distillation, per-teacher proxies
UNIMODAL = ["reconstruct.weights.class_alignment=0", "distill.weights.cross_modal=0", "distill.proxy_init=per_modality"]


def stage_argv(params: str, sets: list[str]) -> list[str]:
    return ["--params", params, "--no-mlflow", "--restart"] + [x for s in sets for x in ("--set", s)]


def run_seed(seed: int, out: Path, args: argparse.Namespace) -> dict:
    """The default chain, the upper bound and evaluate, then the uni-modal baseline; metrics and times."""
    from sbir.stage import run_stage

    sets = [f"seed={seed}", f"outputs_dir={out}", f"ray.num_workers={args.workers}", *args.overrides]
    seconds, stage_metrics = {}, {}
    for name in ("teacher_pretrain", "reconstruct", "distill", "upper_bound", "evaluate"):
        t0 = time.time()
        stage_metrics[name] = run_stage(name, stage_argv(args.params, sets))
        seconds[name] = round(time.time() - t0, 1)
    unimodal_out = out / "unimodal"
    unimodal_out.mkdir(parents=True, exist_ok=True)
    if not (unimodal_out / "teacher_pretrain").exists():
        (unimodal_out / "teacher_pretrain").symlink_to(out / "teacher_pretrain")
    unimodal_sets = [f"seed={seed}", f"outputs_dir={unimodal_out}", f"ray.num_workers={args.workers}",
                     *args.overrides, *UNIMODAL]
    for name in ("reconstruct", "distill"):
        t0 = time.time()
        run_stage(name, stage_argv(args.params, unimodal_sets))
        seconds[f"unimodal_{name}"] = round(time.time() - t0, 1)
    evaluated = stage_metrics["evaluate"]
    table = {m: {k: evaluated[f"{m}/{k}"] for k in METRICS} for m in METHODS if m != "unimodal_dfl"}
    table["unimodal_dfl"] = evaluate_students(unimodal_out / "distill" / "students.pt", out, args)
    teachers = {k: stage_metrics["teacher_pretrain"][k] for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc")}
    return {"table": table, "seconds": seconds, "teachers": teachers,
            "classifier_only_best_variant": evaluated["classifier_only_best_variant"],
            "upper_bound": {k: stage_metrics["upper_bound"][k] for k in ("best_val_mAP@all", "best_step", "steps")}}


def evaluate_students(students_path: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The evaluate stage's metrics for one more set of students (same split, same embedding code)."""
    from sbir.config import load_params
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset
    from sbir.dfsbir.evaluate import method_embeddings
    from sbir.metrics import category_retrieval_metrics

    root = load_params(Path(args.params))
    p = root.evaluate
    ds = open_dataset((REPO / root.dataset_dir).resolve())
    sketches, photos = load_image_set(ds, "sketches", ["test"]), load_image_set(ds, "photos", ["test"])
    emb = method_embeddings(sketches, photos, out / "teacher_pretrain" / "teachers.pt", {"m": students_path},
                            p.batch_size)["m"]
    metrics = category_retrieval_metrics(emb[0], sketches.labels, emb[1], photos.labels, ks_map=p.map_ks,
                                         ks_precision=p.precision_ks, batch_size=p.batch_size)
    return {k: metrics[k] for k in METRICS}


def summarise(per_seed: dict[int, dict], seeds: list[int]) -> tuple[dict, str]:
    import numpy as np

    summary: dict[str, dict[str, dict]] = {}
    for m in METHODS:
        summary[m] = {}
        for k in METRICS:
            vals = np.array([per_seed[s]["table"][m][k] for s in seeds], dtype=float)
            summary[m][k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                             "values": [round(float(v), 4) for v in vals]}
    lines = [f"Category-level data-free SBIR over seeds {seeds} (mean ± sample std; per seed in brackets)",
             "| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for m in METHODS:
        cells = [f"{summary[m][k]['mean']:.4f} ± {summary[m][k]['std']:.4f}" for k in METRICS]
        cells[0] += f" {summary[m]['mAP@all']['values']}"
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ub = np.array(summary["upper_bound"]["mAP@all"]["values"])
    for m in ("crossx_dfl", "classifier_only_best", "unimodal_dfl"):
        ratio = np.array(summary[m]["mAP@all"]["values"]) / ub
        lines.append(f"{m} / upper_bound (mAP@all) per seed: {ratio.round(3).tolist()}")
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--workers", type=int, default=0, help="ray.num_workers (0: in-process local mode)")
    ap.add_argument("--work", default=str(REPO / "benchmarks/results/dfsbir_seeds"), help="per-seed output folders")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/dfsbir_seeds.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra param overrides for every stage (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the per-seed output folders")
    args = ap.parse_args(argv)

    work = Path(args.work).resolve()
    os.environ.setdefault("SBIR_RAY_RESULTS", str(work / "ray_results"))
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(seed, work / f"seed_{seed}", args)
        print(f"seed {seed}: " + json.dumps(per_seed[seed]["table"]["crossx_dfl"]) + " "
              + json.dumps(per_seed[seed]["seconds"]), flush=True)
    summary, text = summarise(per_seed, args.seeds)
    print(text)
    result = {"seeds": args.seeds, "overrides": args.overrides, "unimodal_overrides": UNIMODAL,
              "workers": args.workers, "summary": summary, "per_seed": {str(s): v for s, v in per_seed.items()},
              "table": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
