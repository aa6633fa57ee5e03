"""Issue #12's next lever, probed: students on a frozen ImageNet EfficientNet-Lite0 (inputs resized to
``--size`` px) with the distill objective, trained either from a seed's reconstruction bank (data-free,
as distill's ``fast`` mode: bank only) or from the real train pairs of the classes the teachers know
(labels; a data-dependent reference). Scores sketch -> photo mAP@all on the test split over all classes
and over the seen / unseen groups of that seed's teachers. One seed folder of ``bench_dfsbir_seeds.py
--split unseen --keep`` (its teachers and bank). Appends to benchmarks/results/imagenet_students.json.

    python benchmarks/imagenet_students.py SEED_DIR {bank,real} [--size 128]
"""
import argparse
import os
import sys
import time
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sbir.config import BackboneParams, load_params  # noqa: E402
from sbir.data.datasets import load_image_set  # noqa: E402
from sbir.data.format import open_dataset  # noqa: E402
from sbir.dfsbir.distill import build_proxies, student_losses, weighted_total  # noqa: E402
from sbir.dfsbir.reconstruct import read_bank  # noqa: E402
from sbir.metrics import category_retrieval_metrics  # noqa: E402
from sbir.models.backbones import EncoderPair, embed, resize, to_float  # noqa: E402
from sbir.models.checkpoints import load_teachers  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("seed_dir", type=Path)
ap.add_argument("source", choices=["bank", "real"])
ap.add_argument("--size", type=int, default=128)
ap.add_argument("--params", type=Path, default=REPO / "pipelines" / "embedded-full" / "params.yaml")
ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "imagenet_students.json")
args = ap.parse_args()
seed_dir, source, size = str(args.seed_dir), args.source, args.size
torch.set_num_threads(2)
torch.manual_seed(0)
P = load_params(args.params)
p = P.distill
teachers, blob = load_teachers(f"{seed_dir}/teacher_pretrain/teachers.pt")
class Resize(nn.Module):
    def forward(self, x): return resize(x, size)
students = EncoderPair(BackboneParams(name="efficientnet_lite0", pretrained=True), p.student.embed_dim, "mlp")
for enc in (students.photo_encoder, students.sketch_encoder):
    enc.normalise = nn.Sequential(Resize(), enc.normalise); enc.backbone.requires_grad_(False)
proxies = build_proxies(p, teachers, blob["num_classes"], 0)
heads = [q for n, q in students.named_parameters() if ".backbone." not in n]
opt = torch.optim.AdamW([{"params": heads, "lr": p.lr}, {"params": proxies.parameters(), "lr": p.lr * p.proxy_lr_scale}], weight_decay=1e-4)
ds = open_dataset((REPO / P.dataset_dir).resolve())
if source == "bank":
    bank = read_bank(f"{seed_dir}/reconstruct/bank.parquet"); X_p, X_s = bank["photo"], bank["sketch"]; Y_p = Y_s = None
else:
    ph, sk = load_image_set(ds, "photos", ["train"]), load_image_set(ds, "sketches", ["train"])
    kp, ks = teachers.photo_teacher.known[ph.labels], teachers.sketch_teacher.known[sk.labels]
    X_p, Y_p, X_s, Y_s = ph.images[kp], ph.labels[kp], sk.images[ks], sk.labels[ks]
gen = torch.Generator().manual_seed(0)
t0 = time.time(); steps = p.rounds * p.student_steps
students.train(); [m.eval() for m in students.modules() if isinstance(m, nn.BatchNorm2d)]
for step in range(steps):
    ip, is_ = torch.randint(0, len(X_p), (p.batch_size,), generator=gen), torch.randint(0, len(X_s), (p.batch_size,), generator=gen)
    x_p, x_s = to_float(X_p[ip]), to_float(X_s[is_])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = student_losses(students, proxies, teachers, x_p, x_s, p,
                               labels_p=None if Y_p is None else Y_p[ip], labels_s=None if Y_s is None else Y_s[is_])
        total = weighted_total(terms, p)
    opt.zero_grad(); total.backward(); opt.step()
    if step % 100 == 0: print(step, {k: round(float(v.detach()), 3) for k, v in terms.items()}, round(time.time() - t0), flush=True)
students.eval()
sk, ph = load_image_set(ds, "sketches", ["test"]), load_image_set(ds, "photos", ["test"])
q, g = embed(students.sketch_encoder, sk.images), embed(students.photo_encoder, ph.images)
out = {}
known = torch.nonzero(teachers.photo_teacher.known & teachers.sketch_teacher.known).flatten().tolist()
for name, classes in (("all", list(range(12))), ("seen", known), ("unseen", [c for c in range(12) if c not in known])):
    qi, gi = torch.isin(sk.labels, torch.tensor(classes)), torch.isin(ph.labels, torch.tensor(classes))
    out[name] = round(float(category_retrieval_metrics(q[qi], sk.labels[qi], g[gi], ph.labels[gi], ks_map=[], ks_precision=[], batch_size=256)["mAP@all"]), 4)
record = {"source": source, "size": size, "seed_dir": seed_dir, "steps": steps, "mAP@all": out,
          "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count()}
print(json.dumps(record))
runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
args.out.write_text(json.dumps({"what": "frozen ImageNet students, bank vs real pairs (benchmarks/imagenet_students.py)",
                                "runs": runs + [record]}, indent=2))
