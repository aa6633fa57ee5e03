#!/usr/bin/env python
"""Issue #15 probe: does a bank filtered by the teachers' confidence rescue a shorter ``fast`` synthesis?

For one seed on embedded-full's trained teachers (``outputs/embedded-full/teacher_pretrain``): the
``fast`` reconstruct (its estimator steps overridable by ``reconstruct.fast.steps=N``), then per draw
factor F a bank of ``F x bank_size`` pairs drawn (bf16 autocast; factor 1 of the first, 100-step run
in fp32) and cut back to ``bank_size``: per class the pairs that both teachers put in their condition
class, most confident first; then distill on that bank and CrossX-DFL's test mAP@all. Appends one JSON
line per factor to ``benchmarks/results/bank_filter_probe.jsonl`` (one seed: a probe, not a claim).

    python benchmarks/bank_filter_probe.py SEED FACTORS [reconstruct.fast.steps=N ...]
    python benchmarks/bank_filter_probe.py 0 1,2,4,8 reconstruct.fast.steps=60

Measured (seed 0): 100 steps 0.811 / 0.834 / 0.852 at factors 1 / 4 / 16 (the draw then costs 0.8 /
2.3 / 9.2 s in fp32); 60 steps 0.666 / 0.666 / 0.610 / 0.638 at 1 / 2 / 4 / 8; 40 steps 0.40-0.43.
Filtering raises the bank's teacher accuracy (0.18 -> 0.81 at 60 steps) but not what the students learn.
"""
import sys, time, json, shutil
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(REPO / "src")); sys.path.insert(0, str(REPO / "benchmarks"))
import torch
from fast_synthesis import crossx_map
from sbir.stage import run_stage
from sbir.dfsbir.reconstruct import generate_pairs, write_bank, build_estimators
from sbir.models.checkpoints import load_teachers

params = REPO / "pipelines/embedded-full/params.yaml"
seed = int(sys.argv[1]); factors = [int(f) for f in sys.argv[2].split(",")]; extra = sys.argv[3:]
work = REPO / "ray_results" / "bank_filter" / (f"seed{seed}_" + "_".join(x.split("=")[-1] for x in extra))
teachers_dir = (REPO / "outputs/embedded-full/teacher_pretrain").resolve()

def argv_for(out):
    return ["--params", str(params), "--no-mlflow", "--set", "ray.num_workers=0", "--set", f"seed={seed}",
            "--set", f"outputs_dir={out}", "--set", "reconstruct.synthesis=fast"] + sum((["--set", s] for s in extra), [])

def select(bank, n, teachers):
    """``n`` pairs of ``bank``, the same number per condition class, the teachers' surest first."""
    y = bank["condition"]; C = int(y.max()) + 1
    # pairs both teachers put in the condition class first, then the more confident (the bank keeps only
    # each teacher's top-1 label and its probability, not the probability of the condition class)
    ok_p = bank["photo_teacher_label"] == y; ok_s = bank["sketch_teacher_label"] == y
    score = ok_p.float() * 2 + ok_s.float() * 2 + bank["photo_teacher_conf"] * ok_p + bank["sketch_teacher_conf"] * ok_s
    keep = []
    per = n // C
    for c in range(C):
        idx = torch.nonzero(y == c).flatten()
        order = idx[score[idx].argsort(descending=True)]
        keep.append(order[:per])
    keep = torch.cat(keep)
    return {k: v[keep] for k, v in bank.items()}

base = work / "base"; base.mkdir(parents=True, exist_ok=True)
link = base / "teacher_pretrain"
if not link.exists(): link.symlink_to(teachers_dir)
t0 = time.time(); rec = run_stage("reconstruct", argv_for(base)); print("rec", rec["synthesis_seconds"], time.time() - t0, flush=True)
teachers, blob = load_teachers(str(teachers_dir / "teachers.pt"))
est_blob = torch.load(base / "reconstruct" / "estimators.pt", weights_only=False)
from sbir.config import load_params as lp
import yaml
p = lp(params).reconstruct.model_copy(update={"synthesis": "fast"}).recipe()
for e in extra:
    k, v = e.split("=")
    if k.startswith("reconstruct.fast."): p = p.model_copy(update={k.split(".")[-1]: yaml.safe_load(v)})
est = build_estimators(p, est_blob["num_classes"], est_blob["image_size"], teachers); est.load_state_dict(est_blob["estimators"])
res = []
for f in factors:
    out = work / f"f{f}"; (out).mkdir(parents=True, exist_ok=True)
    l2 = out / "teacher_pretrain"
    if not l2.exists(): l2.symlink_to(teachers_dir)
    if (out / "reconstruct").exists(): shutil.rmtree(out / "reconstruct")
    shutil.copytree(base / "reconstruct", out / "reconstruct")
    generate_pairs(est, teachers, 256, seed=99)
    t1 = time.time()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bank = generate_pairs(est, teachers, p.bank_size * f, seed=seed + 1)
    draw = time.time() - t1
    bank = {k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in bank.items()}
    if f > 1: bank = select(bank, p.bank_size, teachers)
    acc_p = float((bank["photo_teacher_label"] == bank["condition"]).float().mean()); acc_s = float((bank["sketch_teacher_label"] == bank["condition"]).float().mean())
    write_bank(str(out / "reconstruct" / "bank.parquet"), bank)
    run_stage("distill", argv_for(out))
    m = crossx_map(params, out)
    r = {"seed": seed, "factor": f, "extra": extra, "draw_s": round(draw, 2), "rec_synth": rec["synthesis_seconds"], "acc_p": acc_p, "acc_s": acc_s, "mAP": round(m, 4)}
    print(json.dumps(r), flush=True); res.append(r)
with open(REPO / "benchmarks" / "results" / "bank_filter_probe.jsonl", "a") as fh:
    for r in res: fh.write(json.dumps(r) + "\n")
