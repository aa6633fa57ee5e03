#!/usr/bin/env python
"""Issue #15 probe: does a bank filtered by the teachers' confidence rescue a shorter ``fast`` synthesis?

For one seed on embedded-full's trained teachers (``outputs/embedded-full/teacher_pretrain``): the
``fast`` reconstruct (its estimator steps overridable by ``reconstruct.fast.steps=N``), then per draw
factor F a bank of ``F x bank_size`` pairs drawn (in ``--draw`` precision) and cut back to ``bank_size``:
per class the pairs that both teachers put in their condition class, most confident first; then distill
on that bank and CrossX-DFL's test mAP@all. Appends one JSON line per factor to
``benchmarks/results/bank_filter_probe.jsonl`` (one seed: a probe, not a claim).

    python benchmarks/bank_filter_probe.py SEED FACTORS [--draw fp32|bf16] [reconstruct.fast.steps=N ...]
    python benchmarks/bank_filter_probe.py 0 1,2,4,8 reconstruct.fast.steps=60

Measured with the fast recipe of that time (100 steps with the modality term, 60 distill rounds; to repeat it
pass ``reconstruct.fast.steps=100 reconstruct.fast.modality_weight=1.0 reconstruct.fast.distill_rounds=60``)
on seed 0 (each line's ``draw_precision``: the 100-step banks drawn in fp32, the others in bf16):
100 steps 0.811 / 0.834 / 0.852 at factors 1 / 4 / 16 (the draw then costs 0.8 / 2.3 / 9.2 s); 60 steps
0.666 / 0.666 / 0.610 / 0.638 at 1 / 2 / 4 / 8; 40 steps 0.40-0.43. Filtering raises the bank's teacher
accuracy (0.18 -> 0.81 at 60 steps) but not what the students learn.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"
TEACHERS = REPO / "outputs" / "embedded-full" / "teacher_pretrain"
OUT = REPO / "benchmarks" / "results" / "bank_filter_probe.jsonl"


def select(bank: dict, n: int) -> dict:
    """``n`` pairs of ``bank``, the same number per condition class, the teachers' surest first: pairs both
    teachers put in the condition class, then the more confident (the bank keeps each teacher's top-1
    label and its probability, not the probability of the condition class)."""
    import torch

    y = bank["condition"]
    ok_p, ok_s = bank["photo_teacher_label"] == y, bank["sketch_teacher_label"] == y
    score = 2 * ok_p.float() + 2 * ok_s.float() + bank["photo_teacher_conf"] * ok_p + bank["sketch_teacher_conf"] * ok_s
    classes = int(y.max()) + 1
    keep = []
    for c in range(classes):
        rows = torch.nonzero(y == c).flatten()
        keep.append(rows[score[rows].argsort(descending=True)][: n // classes])
    keep = torch.cat(keep)
    return {k: v[keep] for k, v in bank.items()}


def stage_folder(path: Path) -> Path:
    """An outputs folder whose teacher_pretrain links to embedded-full's teachers."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "teacher_pretrain").exists():
        (path / "teacher_pretrain").symlink_to(TEACHERS.resolve())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("factors", help="comma-separated draw factors, e.g. 1,4,16")
    ap.add_argument("overrides", nargs="*", help="params overrides, e.g. reconstruct.fast.steps=60")
    ap.add_argument("--draw", choices=["fp32", "bf16"], default="bf16", help="precision of drawing the banks")
    args = ap.parse_args()

    import torch

    from fast_synthesis import crossx_map
    from sbir.config import load_params
    from sbir.dfsbir.reconstruct import build_estimators, generate_pairs, write_bank
    from sbir.models.checkpoints import load_teachers
    from sbir.stage import parse_overrides, run_stage

    overrides = ["reconstruct.synthesis=fast", *args.overrides]
    work = REPO / "ray_results" / "bank_filter" / "_".join([f"seed{args.seed}", *(o.split("=")[-1] for o in args.overrides)])

    def argv_for(out: Path) -> list[str]:
        sets = ["ray.num_workers=0", f"seed={args.seed}", f"outputs_dir={out}", *overrides]
        return ["--params", str(PARAMS), "--no-mlflow"] + [x for s in sets for x in ("--set", s)]

    base = stage_folder(work / "base")
    rec = run_stage("reconstruct", argv_for(base))
    teachers, _ = load_teachers(str(TEACHERS / "teachers.pt"))
    p = load_params(PARAMS, parse_overrides(overrides)).reconstruct.recipe()
    est_blob = torch.load(base / "reconstruct" / "estimators.pt", weights_only=False)
    est = build_estimators(p, est_blob["num_classes"], est_blob["image_size"], teachers)
    est.load_state_dict(est_blob["estimators"])

    def precision():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.draw == "bf16" else contextlib.nullcontext()

    generate_pairs(est, teachers, 256, seed=99)  # untimed: the first draw pays oneDNN's kernel creation
    for factor in (int(f) for f in args.factors.split(",")):
        out = stage_folder(work / f"f{factor}")
        shutil.rmtree(out / "reconstruct", ignore_errors=True)
        shutil.copytree(base / "reconstruct", out / "reconstruct")
        t0 = time.time()
        with precision():
            bank = generate_pairs(est, teachers, p.bank_size * factor, seed=args.seed + 1)
        draw_seconds = time.time() - t0
        bank = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in bank.items()}
        if factor > 1:
            bank = select(bank, p.bank_size)
        write_bank(str(out / "reconstruct" / "bank.parquet"), bank)
        run_stage("distill", argv_for(out))
        accuracy = {f"acc_{m[0]}": float((bank[f"{m}_teacher_label"] == bank["condition"]).float().mean())
                    for m in ("photo", "sketch")}
        record = {"seed": args.seed, "factor": factor, "extra": args.overrides, "draw_precision": args.draw,
                  "draw_s": round(draw_seconds, 2), "rec_synth": rec["synthesis_seconds"], **accuracy,
                  "mAP": round(crossx_map(PARAMS, out), 4)}
        print(json.dumps(record), flush=True)
        with OUT.open("a") as fh:  # after every factor: an interrupted probe keeps what it measured
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
