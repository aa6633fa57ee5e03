#!/usr/bin/env python
"""Issue #12's class-split studies with generic features beside every method's embedding.

No method on this bench carries a class that a teacher never saw (``unseen``) or that only one teacher
saw (``overlap``'s photo-only / sketch-only groups) across modalities: the teachers recognise the other
modality at chance (``cross_modal_features.json``). Frozen ImageNet features do carry it
(EfficientNet-Lite0, no SBIR training, 0.66 mAP@all on the unseen classes at 128 px). This asks whether
CrossX-DFL's embedding, with those features beside it, beats the softmax baseline on the studies, and
whether it beats the baseline given the same features (the fair comparison).

Per seed folder of ``bench_dfsbir_seeds.py --split S --keep`` (teachers, CrossX-DFL students, upper
bound) it scores sketch -> photo mAP@all over all classes and per class group for:

* ``imagenet_only``: the frozen ImageNet EfficientNet-Lite0's pooled features (inputs resized to ``--size``);
* ``classifier_only_best``, ``crossx_dfl``, ``upper_bound``: as the evaluate stage computes them;
* ``<method>+generic@w``: ``[normalise(method); w * normalise(imagenet)]`` for each ``--weights`` w (cosine
  similarity then adds the two similarities, the generic one scaled by w^2). For the classifier-only
  baseline the best temperature / logits variant is picked per group on the test queries, as evaluate does.

Writes ``benchmarks/results/dfsbir_generic_features.json`` (per split: ``summary -> method -> group ->
mean/std/values``, the per-seed figures) and prints one table per split.

    python benchmarks/generic_features.py --split unseen=/work/runs/unseen --split overlap=/work/runs/overlap
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"


def fused(a, b, weight: float):
    """Each embedding L2-normalised, the generic one scaled by ``weight``, side by side."""
    import torch
    import torch.nn.functional as F

    return torch.cat([F.normalize(a, dim=1), weight * F.normalize(b, dim=1)], dim=1)


def seed_table(seed_dir: Path, sketches, photos, generic: tuple, weights: list[float], batch: int) -> dict:
    """group -> method -> mAP@all for one seed folder."""
    import torch

    from sbir.dfsbir.evaluate import class_groups, method_embeddings
    from sbir.metrics import category_retrieval_metrics
    from sbir.models.checkpoints import load_teachers

    teachers_path = seed_dir / "teacher_pretrain" / "teachers.pt"
    emb = method_embeddings(sketches, photos, teachers_path, {"crossx_dfl": seed_dir / "distill" / "students.pt",
                                                              "upper_bound": seed_dir / "upper_bound" / "students.pt"},
                            batch, [0.5, 1.0, 2.0, 4.0], logits=True)
    emb["imagenet_only"] = generic
    for name in [n for n in emb if n != "imagenet_only"]:
        for w in weights:
            emb[f"{name}+generic@{w:g}"] = (fused(emb[name][0], generic[0], w), fused(emb[name][1], generic[1], w))
    groups = {"all": list(range(int(sketches.labels.max()) + 1)),
              **class_groups(load_teachers(str(teachers_path))[0])}
    table: dict[str, dict[str, float]] = {}
    for group, classes in groups.items():
        qi, gi = torch.isin(sketches.labels, torch.tensor(classes)), torch.isin(photos.labels, torch.tensor(classes))
        scores = {name: float(category_retrieval_metrics(q[qi], sketches.labels[qi], g[gi], photos.labels[gi],
                                                         ks_map=[], ks_precision=[], batch_size=batch)["mAP@all"])
                  for name, (q, g) in emb.items()}
        table[group] = best_classifier(scores, weights)
    return table


def best_classifier(scores: dict[str, float], weights: list[float]) -> dict[str, float]:
    """The scores with the classifier-only variants folded into ``classifier_only_best`` (and
    ``classifier_only_best+generic@w``): the best variant on these queries, as evaluate picks it."""
    out = {k: round(v, 4) for k, v in scores.items() if not k.startswith("classifier_only")}
    for suffix in [""] + [f"+generic@{w:g}" for w in weights]:
        variants = [k for k in scores if k.startswith("classifier_only") and k.endswith(suffix)
                    and ("+generic" in k) == bool(suffix)]
        out[f"classifier_only_best{suffix}"] = round(max(scores[k] for k in variants), 4)
    return out


def summarise(per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    return {group: {m: {"mean": round(statistics.mean(v := [per_seed[s][group][m] for s in seeds]), 4),
                        "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0, "values": v}
                    for m in first[group]} for group in first}


def markdown(split: str, summary: dict, seeds: list[int]) -> str:
    groups = list(summary)
    lines = [f"split {split!r}, seeds {seeds}: mAP@all mean ± std [per seed]",
             "| method | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for m in summary["all"]:
        lines.append(f"| {m} | " + " | ".join(
            f"{summary[g][m]['mean']:.4f} ± {summary[g][m]['std']:.4f} {summary[g][m]['values']}" for g in groups) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", action="append", required=True, metavar="NAME=WORK_DIR",
                    help="a study and the --work folder of its bench_dfsbir_seeds.py --keep run (seed_<n> inside)")
    ap.add_argument("--params", type=Path, default=FULL_PARAMS, help="the dataset the seeds were trained on")
    ap.add_argument("--size", type=int, default=128, help="input px of the ImageNet network (32 px images resized)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0],
                    help="scale of the normalised generic features beside a method's normalised embedding")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dfsbir_generic_features.json")
    args = ap.parse_args()

    import torch

    from bench_dfsbir_seeds import test_sets
    from cross_modal_features import imagenet_embedding
    from sbir.config import load_params
    from sbir.models.pretrained import efficientnet_lite0, packaged_weights_file

    torch.set_num_threads(2)
    batch = load_params(args.params).evaluate.batch_size
    sketches, photos = test_sets(str(args.params))
    net = efficientnet_lite0(0, packaged_weights_file()).eval()
    generic = (imagenet_embedding(net, sketches.images, args.size), imagenet_embedding(net, photos.images, args.size))
    record = {"what": "class-split studies with generic ImageNet features beside each method (benchmarks/generic_features.py)",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "params": str(args.params), "size": args.size,
              "weights": args.weights, "splits": {}}
    for spec in args.split:
        split, work = spec.split("=", 1)
        seed_dirs = sorted(Path(work).glob("seed_*"), key=lambda d: int(d.name.split("_")[1]))
        if not seed_dirs:
            raise SystemExit(f"{work}: no seed_<n> folders (run bench_dfsbir_seeds.py --split {split} --keep "
                             f"--work {work} first)")
        per_seed = {int(d.name.split("_")[1]): seed_table(d, sketches, photos, generic, args.weights, batch)
                    for d in seed_dirs}
        summary = summarise(per_seed)
        record["splits"][split] = {"work": work, "seeds": sorted(per_seed), "summary": summary, "per_seed": per_seed}
        print(markdown(split, summary, sorted(per_seed)), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
