"""Seed spread of the category-level data-free SBIR results (CrossX-DFL and the paper's baselines).

Per seed, in its own output folder (``--work``/<split>/seed_<n>): the data-free chain
(teacher_pretrain -> reconstruct -> distill), the data-dependent upper bound and evaluate, run through
the same stage entry point as ``dvc repro`` with the repository's params plus ``--set`` overrides; then
the uni-modal data-free baseline (``unimodal_dfl``): each student distilled from its own teacher's
reconstructions with no cross-modal term anywhere (no class alignment in synthesis, no cross-modal
triplet, each student's proxies its own teacher's final-layer rows), from the same teachers.

``--split`` picks the paper's robustness studies on the 12-class default: ``unseen`` (both teachers on
classes 0-8, classes 9-11 seen by no teacher) and ``overlap`` (photo teacher on 0-7, sketch teacher on
4-11); their metrics are reported per class group too (``seen/mAP@all``, ``shared/mAP@all``, ...).

Writes ``benchmarks/results/dfsbir_seeds.json`` (``dfsbir_<split>_seeds.json`` for the studies; layout
of fgsbir_seeds.json: summary -> method -> metric -> mean/std/values) with the methods chance,
classifier_only_best, unimodal_dfl, crossx_dfl and upper_bound, the per-seed figures, teacher
accuracies and stage times.

    python benchmarks/bench_dfsbir_seeds.py                    # seeds 0 1 2, in-process (ray.num_workers=0)
    python benchmarks/bench_dfsbir_seeds.py --split unseen
    python benchmarks/bench_dfsbir_seeds.py --seeds 0 --workers 2 --set distill.rounds=50
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"  # the science budgets (the default cuts them)
sys.path.insert(0, str(REPO / "src"))

METHODS = ("chance", "classifier_only_best", "unimodal_dfl", "crossx_dfl", "upper_bound")
METRICS = ("mAP@all", "mAP@200", "P@100", "P@200")  # main() sets them from --params (evaluate.map_ks / precision_ks)
# the uni-modal baseline: no cross-modal term in synthesis or distillation, per-teacher proxies
UNIMODAL = ["reconstruct.weights.class_alignment=0", "distill.weights.cross_modal=0", "distill.proxy_init=per_modality"]
SPLITS = {"default": [],
          "unseen": ["teacher_pretrain.photo_classes=[0,1,2,3,4,5,6,7,8]",
                     "teacher_pretrain.sketch_classes=[0,1,2,3,4,5,6,7,8]"],
          "overlap": ["teacher_pretrain.photo_classes=[0,1,2,3,4,5,6,7]",
                      "teacher_pretrain.sketch_classes=[4,5,6,7,8,9,10,11]"]}
GROUPS = {"default": [], "unseen": ["seen", "unseen"], "overlap": ["shared", "photo_only", "sketch_only"]}


def stage_argv(params: str, sets: list[str]) -> list[str]:
    return ["--params", params, "--no-mlflow", "--restart"] + [x for s in sets for x in ("--set", s)]


STAGES = ("teacher_pretrain", "reconstruct", "distill", "upper_bound", "evaluate")


def run_seed(seed: int, out: Path, args: argparse.Namespace) -> None:
    """The default chain, the upper bound and evaluate, then the uni-modal baseline, into ``out``."""
    from sbir.stage import run_stage

    sets = [f"seed={seed}", f"outputs_dir={out}", f"ray.num_workers={args.workers}", *SPLITS[args.split],
            *args.overrides]
    for name in STAGES:
        if not (args.skip_done and (out / name / "stage_metrics.json").is_file()):
            run_stage(name, stage_argv(args.params, sets))
    if not args.unimodal:
        return
    unimodal_out = out / "unimodal"
    unimodal_out.mkdir(parents=True, exist_ok=True)
    if not (unimodal_out / "teacher_pretrain").exists():
        (unimodal_out / "teacher_pretrain").symlink_to(out / "teacher_pretrain")
    unimodal_sets = [f"seed={seed}", f"outputs_dir={unimodal_out}", f"ray.num_workers={args.workers}",
                     *SPLITS[args.split], *args.overrides, *UNIMODAL]
    for name in ("reconstruct", "distill"):
        if not (args.skip_done and (unimodal_out / name / "stage_metrics.json").is_file()):
            run_stage(name, stage_argv(args.params, unimodal_sets))


def collect_seed(out: Path, args: argparse.Namespace) -> dict | None:
    """One seed's figures from the files its stages wrote (None when a stage has not finished)."""
    stage_dirs = {name: out / name for name in STAGES}
    if args.unimodal:
        stage_dirs |= {f"unimodal_{n}": out / "unimodal" / n for n in ("reconstruct", "distill")}
    if not all((d / "stage_metrics.json").is_file() for d in stage_dirs.values()):
        return None
    def read(folder: Path, name: str) -> dict:
        return json.loads((folder / name).read_text())

    evaluated = read(stage_dirs["evaluate"], "metrics.json")
    keys = metric_keys(args.split)
    table = {m: {k: evaluated[f"{m}/{k}"] for k in keys} for m in methods(args) if m != "unimodal_dfl"}
    if args.unimodal:
        table["unimodal_dfl"] = evaluate_students(out / "unimodal" / "distill" / "students.pt", out, args)
    teachers = read(stage_dirs["teacher_pretrain"], "metrics.json")
    upper = read(stage_dirs["upper_bound"], "metrics.json")
    bank = read(stage_dirs["reconstruct"], "metrics.json")  # how often the teachers agree with a sample's class
    seconds = {n: read(d, "stage_metrics.json")["stage_seconds"] for n, d in stage_dirs.items()}
    return {"table": table, "seconds": seconds,
            "teachers": {k: teachers[k] for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc")},
            "teachers_across_modalities": across_modalities(out, args),
            "classifier_only_best_variant": evaluated["classifier_only_best_variant"],
            "bank": {k: bank[k] for k in ("bank_photo_teacher_acc", "bank_sketch_teacher_acc")},
            "upper_bound": {k: upper[k] for k in ("best_val_mAP@all", "best_step", "steps")}}


def across_modalities(out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Each teacher's test accuracy on the other modality (does a class only it knows reach the other
    modality's student?), from the seed's teachers."""
    from sbir.dfsbir.evaluate import teacher_accuracy_across_modalities
    from sbir.models.checkpoints import load_teachers

    teachers, blob = load_teachers(str(out / "teacher_pretrain" / "teachers.pt"))
    sketches, photos = test_sets(args.params)
    return teacher_accuracy_across_modalities(teachers, sketches, photos, int(blob["params"]["image_size"]))


@functools.lru_cache(maxsize=1)
def test_sets(params: str):
    """The params' test sketches and photos, read once for every seed and method."""
    from sbir.config import load_params
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset

    ds = open_dataset((REPO / load_params(Path(params)).dataset_dir).resolve())
    return load_image_set(ds, "sketches", ["test"]), load_image_set(ds, "photos", ["test"])


def methods(args: argparse.Namespace) -> tuple[str, ...]:
    return METHODS if args.unimodal else tuple(m for m in METHODS if m != "unimodal_dfl")


def evaluated_metrics(params: str) -> tuple[str, ...]:
    """mAP@all and the evaluate stage's mAP@k / P@k for the params file (a real-data pipeline has its own ks)."""
    from sbir.config import load_params

    p = load_params(Path(params)).evaluate
    return ("mAP@all", *(f"mAP@{k}" for k in p.map_ks), *(f"P@{k}" for k in p.precision_ks))


def metric_keys(split: str) -> list[str]:
    return list(METRICS) + [f"{g}/{k}" for g in GROUPS[split] for k in METRICS]


def evaluate_students(students_path: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The evaluate stage's metrics for one more set of students (same split, same embedding code)."""
    from sbir.config import load_params
    from sbir.dfsbir.evaluate import class_groups, group_metrics, method_embeddings
    from sbir.metrics import category_retrieval_metrics
    from sbir.models.checkpoints import load_teachers

    p = load_params(Path(args.params)).evaluate
    sketches, photos = test_sets(args.params)
    emb = method_embeddings(sketches, photos, out / "teacher_pretrain" / "teachers.pt", {"m": students_path},
                            p.batch_size)["m"]
    metrics = category_retrieval_metrics(emb[0], sketches.labels, emb[1], photos.labels, ks_map=p.map_ks,
                                         ks_precision=p.precision_ks, batch_size=p.batch_size)
    groups = class_groups(load_teachers(str(out / "teacher_pretrain" / "teachers.pt"))[0])
    for name, vals in group_metrics({"m": emb}, sketches.labels, photos.labels, groups, p).items():
        metrics.update({f"{name.split('/', 1)[1]}/{k}": v for k, v in vals.items()})
    return {k: metrics[k] for k in metric_keys(args.split)}


def summarise(per_seed: dict[int, dict], seeds: list[int], split: str) -> tuple[dict, str]:
    import numpy as np

    summary: dict[str, dict[str, dict]] = {}
    shown_methods = [m for m in METHODS if m in per_seed[seeds[0]]["table"]]
    for m in shown_methods:
        summary[m] = {}
        for k in metric_keys(split):
            vals = np.array([per_seed[s]["table"][m][k] for s in seeds], dtype=float)
            summary[m][k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                             "values": [round(float(v), 4) for v in vals]}
    shown = ["mAP@all"] + [f"{g}/mAP@all" for g in GROUPS[split]] + ([] if GROUPS[split] else list(METRICS[1:]))
    lines = [f"Category-level data-free SBIR, split {split!r}, over seeds {seeds} (mean ± sample std; "
             "mAP@all per seed in brackets)", "| method | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for m in shown_methods:
        cells = [f"{summary[m][k]['mean']:.4f} ± {summary[m][k]['std']:.4f}"
                 + (f" {summary[m][k]['values']}" if k.endswith("mAP@all") else "") for k in shown]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ub = np.array(summary["upper_bound"]["mAP@all"]["values"])
    for m in [m for m in ("crossx_dfl", "classifier_only_best", "unimodal_dfl") if m in summary]:
        ratio = np.array(summary[m]["mAP@all"]["values"]) / ub
        lines.append(f"{m} / upper_bound (mAP@all) per seed: {ratio.round(3).tolist()}")
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", default=str(FULL_PARAMS))
    ap.add_argument("--workers", type=int, default=0, help="ray.num_workers (0: in-process local mode)")
    ap.add_argument("--split", choices=sorted(SPLITS), default="default", help="default, unseen or overlap classes")
    ap.add_argument("--work", default=None, help="per-seed output folders (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/dfsbir[_<split>]_seeds.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra param overrides for every stage (repeatable)")
    ap.add_argument("--no-unimodal", dest="unimodal", action="store_false",
                    help="skip the uni-modal baseline (its bar is on the default split; saves two stages per seed)")
    ap.add_argument("--skip-done", action="store_true",
                    help="keep the stages a seed already finished in --work (an interrupted run goes on); the "
                         "caller makes sure their params are the ones wanted")
    ap.add_argument("--keep", action="store_true", help="keep the per-seed output folders")
    ap.add_argument("--collect-only", action="store_true",
                    help="run nothing: summarise the seeds already finished in --work (the others are listed)")
    args = ap.parse_args(argv)

    global METRICS
    METRICS = evaluated_metrics(args.params)
    name = "dfsbir_seeds" if args.split == "default" else f"dfsbir_{args.split}_seeds"
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"{name}.json")
    work = Path(args.work or tempfile.mkdtemp(prefix=f"{name}-")).resolve()
    os.environ.setdefault("SBIR_RAY_RESULTS", str(work / "ray_results"))
    per_seed, missing = {}, []
    for seed in args.seeds:
        if not args.collect_only:
            run_seed(seed, work / f"seed_{seed}", args)
        figures = collect_seed(work / f"seed_{seed}", args)
        if figures is None:
            missing.append(seed)
            continue
        per_seed[seed] = figures
        print(f"seed {seed}: " + json.dumps(figures["table"]["crossx_dfl"]) + " " + json.dumps(figures["seconds"]),
              flush=True)
    if missing:
        print(f"seeds {missing}: not finished in {work}, left out", flush=True)
    args.seeds = sorted(per_seed)
    if not args.seeds:
        sys.exit(f"no finished seed in {work}")
    summary, text = summarise(per_seed, args.seeds, args.split)
    print(text)
    result = {"missing_seeds": missing, "split": args.split, "split_overrides": SPLITS[args.split], "seeds": args.seeds, "overrides": args.overrides, "unimodal_overrides": UNIMODAL if args.unimodal else None,
              "workers": args.workers, "summary": summary, "per_seed": {str(s): v for s, v in per_seed.items()},
              "table": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not (args.keep or args.collect_only or args.work):
        shutil.rmtree(work, ignore_errors=True)
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
