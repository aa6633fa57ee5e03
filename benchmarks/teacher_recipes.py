"""Pretrained teachers on a real-data pipeline: test accuracy per epoch for a few fine-tuning recipes.

Runs the real ``teacher_pretrain`` stage (in-process, ``ray.num_workers=0``) once per recipe with the
pipeline's params plus the recipe's overrides, each into its own folder under ``--work``, and writes
every recipe's curves (photo / sketch teacher test accuracy per epoch, epoch seconds) to
``benchmarks/results/teacher_recipes.json`` and a figure beside it. The Sketchy sample's test split has
50 photos and 49 sketches: one image is 0.02.

    python benchmarks/teacher_recipes.py                                 # sketchy-mini, the recipes below
    python benchmarks/teacher_recipes.py --recipes bn_train_128 default   # a subset
    python benchmarks/teacher_recipes.py --recipes head_lr_0.01 --seeds 0 1 2   # a recipe over 3 seeds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
import real_data  # noqa: E402  (benchmarks/ is not a package)

T = "teacher_pretrain."
# Every recipe names its lr, backbone lr scale, batch and epochs, so it means the same after the
# pipeline's params move on (the others come from --params).
EARLIER = [T + "lr=0.001", T + "backbone_lr_scale=1.0", T + "batch_size=32", T + "epochs=8"]  # sketchy-mini's first
HEAD_LR = [T + "lr=0.01", T + "backbone_lr_scale=0.03"]  # heads at 0.01, backbones at 3e-4: the ImageNet
# features move little on ~200 images per modality
RECIPES: dict[str, list[str]] = {
    "default": [],  # the pipeline's params as they are
    "lr_0.001": EARLIER,
    "bn_train_128": [*EARLIER, T + "freeze_bn_stats=false"],
    "bn_frozen_96": [*EARLIER, T + "image_size=96"],
    "bn_frozen_160": [*EARLIER, T + "image_size=160"],
    "backbone_lr_0.1": [*EARLIER, T + "backbone_lr_scale=0.1", T + "lr=0.003"],
    "head_lr_0.01": [*EARLIER, *HEAD_LR],
    "head_lr_0.01_12ep": [*EARLIER, *HEAD_LR, T + "epochs=12"],
    "head_lr_0.01_b16": [*EARLIER, *HEAD_LR, T + "batch_size=16"],  # twice the steps for the images seen
    "head_lr_0.01_b16_12ep": [*EARLIER, *HEAD_LR, T + "batch_size=16", T + "epochs=12"],
}


def run_recipe(name: str, params: str, work: Path, threads: int, seed: int) -> dict:
    from sbir.stage import run_stage

    out = work / f"{name}-seed{seed}"
    sets = [f"outputs_dir={out}", f"seed={seed}", "ray.num_workers=0", f"ray.torch_threads_per_worker={threads}",
            *RECIPES[name]]
    run_stage("teacher_pretrain", ["--params", params, "--no-mlflow", "--restart"]
              + [x for s in sets for x in ("--set", s)])
    history = json.loads((out / "teacher_pretrain" / "history.json").read_text())
    final = json.loads((out / "teacher_pretrain" / "metrics.json").read_text())
    return {"overrides": RECIPES[name], "seed": seed,
            "photo_acc": [round(h["photo_teacher_test_acc"], 4) for h in history],
            "sketch_acc": [round(h["sketch_teacher_test_acc"], 4) for h in history],
            "epoch_seconds": [round(h["epoch_seconds"], 1) for h in history],
            "final": {k: final[k] for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc", "train_seconds")}}


def seed_summary(results: dict) -> dict:
    """Per recipe: the final test accuracies of every seed, their mean and (population) std."""
    import statistics

    by_recipe: dict[str, list[dict]] = {}
    for key, r in results.items():
        by_recipe.setdefault(key.split("/")[0], []).append(r)
    out = {}
    for name, runs in by_recipe.items():
        out[name] = {"seeds": [r["seed"] for r in runs]}
        for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc"):
            vals = [r["final"][k] for r in runs]
            out[name][k] = {"per_seed": vals, "mean": round(statistics.fmean(vals), 4),
                            "std": round(statistics.pstdev(vals), 4)}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, r in results.items():
        for ax, key in zip(axes, ("photo_acc", "sketch_acc")):
            ax.plot(range(1, len(r[key]) + 1), r[key], marker=".", label=name)
    for ax, title in zip(axes, ("photo teacher", "sketch teacher")):
        ax.set(title=title, xlabel="epoch", ylabel="test accuracy")
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "pipelines" / "sketchy-mini" / "params.yaml"))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds each recipe runs with")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process run")
    ap.add_argument("--work", default=None, help="output folders (default: a temporary folder)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "teacher_recipes.json"))
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="teacher-recipes-")).resolve()
    os.environ.setdefault("SBIR_RAY_RESULTS", str(work / "ray_results"))
    results = {}
    for name in args.recipes:
        for seed in args.seeds:
            key = name if args.seeds == [0] else f"{name}/seed{seed}"
            results[key] = run_recipe(name, args.params, work, args.threads, seed)
            print(key, json.dumps(results[key]["final"]), flush=True)
    summary = seed_summary(results)
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"params": str(Path(args.params).resolve().relative_to(REPO)), "threads": args.threads,
           "machine": real_data.machine(),
           "recipes": results, "summary": summary}
    out.write_text(json.dumps(doc, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"-> {out}")
    return doc


if __name__ == "__main__":
    main()
