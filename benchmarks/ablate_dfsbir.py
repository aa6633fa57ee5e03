"""Ablation of the CrossX-DFL loss terms on the current pipeline outputs.

Each variant reruns ``distill`` (and, with ``--with-reconstruct``, ``reconstruct`` first) in local-mode
Ray with some params overridden, from the teacher checkpoint of the last ``dvc repro``, then evaluates
the students on the test split exactly like the ``evaluate`` stage. Prints a markdown table and writes
a JSON of the figures.

    python benchmarks/ablate_dfsbir.py                      # default variants, distill only
    python benchmarks/ablate_dfsbir.py --with-reconstruct   # also re-estimate the samples per variant
    python benchmarks/ablate_dfsbir.py --variant no_proxy distill.weights.proxy=0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"  # the science budgets (the default cuts them)
sys.path.insert(0, str(REPO / "src"))

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_proxy_loss": ["distill.weights.proxy=0"],
    "no_teacher_kd": ["distill.weights.teacher_kd=0"],
    "no_cross_modal": ["distill.weights.cross_modal=0"],
    "no_adversarial": ["distill.adversarial_weight=0"],
    "no_class_alignment": ["reconstruct.weights.class_alignment=0"],
    "no_modality": ["reconstruct.weights.modality=0"],
    "linear_head": ["distill.student.head=linear"],
    "bn_stats_updated": ["distill.student.freeze_bn_stats=false"],
    "random_init_students": ["distill.student.init_from_teacher=false", "distill.student.backbone_lr_scale=1.0"],
}


def evaluate_students(students_path: Path, dataset_dir: Path, teachers_path: Path) -> dict[str, float]:
    import torch

    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset
    from sbir.models.backbones import embed
    from sbir.models.checkpoints import load_students, load_teachers
    from sbir.metrics import category_retrieval_metrics

    torch.set_num_threads(1)
    ds = open_dataset(dataset_dir)
    sk = load_image_set(ds, "sketches", ["test"])
    ph = load_image_set(ds, "photos", ["test"])
    size = int(load_teachers(str(teachers_path))[1]["params"]["image_size"])
    model, _ = load_students(str(students_path))
    return category_retrieval_metrics(embed(model.sketch_encoder, sk.images, size=size), sk.labels,
                                      embed(model.photo_encoder, ph.images, size=size), ph.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(FULL_PARAMS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from the built-in list")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="an extra variant: a name then overrides")
    ap.add_argument("--with-reconstruct", action="store_true", help="rerun reconstruct for every variant too")
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for every variant")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/ablation_dfsbir.json"))
    args = ap.parse_args()

    from sbir.config import load_params

    root = load_params(args.params)
    outputs = (REPO / root.outputs_dir).resolve()
    dataset = (REPO / root.dataset_dir).resolve()
    teachers = outputs / "teacher_pretrain" / "teachers.pt"
    if not teachers.is_file():
        sys.exit(f"{teachers} not found: run the params' pipeline first (`make repro "
                 "PIPELINE=pipelines/embedded-full/dvc.yaml`, or `make repro` for --params params.yaml)")
    variants = {v: VARIANTS[v] for v in args.variants}
    variants.update({v[0]: v[1:] for v in args.variant})
    results = {}
    env = dict(os.environ, SBIR_NO_MLFLOW="1")
    for name, overrides in variants.items():
        with tempfile.TemporaryDirectory(prefix=f"ablate-{name}-") as tmp:
            out = Path(tmp) / "outputs"
            out.mkdir()
            (out / "teacher_pretrain").symlink_to(outputs / "teacher_pretrain")
            if not args.with_reconstruct:
                (out / "reconstruct").symlink_to(outputs / "reconstruct")
            sets = ["ray.num_workers=0", f"outputs_dir={out}", *args.common, *overrides]
            cli = [a for s in sets for a in ("--set", s)]
            stages = (["reconstruct"] if args.with_reconstruct else []) + ["distill"]
            t0 = time.time()
            for stage in stages:
                proc = subprocess.run([sys.executable, "-m", "sbir", "run", stage, "--params", args.params,
                                       "--restart", *cli], env=dict(env, SBIR_RAY_RESULTS=str(Path(tmp) / "ray")),
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"variant {name}: {stage} failed\n{proc.stderr[-3000:]}")
            metrics = evaluate_students(out / "distill" / "students.pt", dataset, teachers)
            metrics["seconds"] = round(time.time() - t0, 1)
            results[name] = {"overrides": overrides, **metrics}
            print(f"{name:24s} mAP@all={metrics['mAP@all']:.4f} P@100={metrics['P@100']:.4f} "
                  f"({metrics['seconds']} s)", flush=True)
    keys = ["mAP@all", "mAP@200", "P@100", "P@200"]
    print("\n| variant | overrides | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, r in results.items():
        print(f"| {name} | {' '.join(r['overrides']) or '-'} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"common": args.common, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
