"""Does class identity cross from sketches to photos without a paired example? Two probes, no training.

Issue #12's class-split studies need a signal that carries a class from one modality to the other when
only one teacher (or none) knows it. This measures the two candidate sources on the embedded test split
(480 sketches query 480 photos, 12 classes):

* ``teachers``: each trained teacher's accuracy on its own modality and on the other one
  (:func:`sbir.dfsbir.evaluate.teacher_accuracy_across_modalities`), from a ``teachers.pt``;
* ``imagenet``: the packaged ImageNet EfficientNet-Lite0 (``sbir.models.pretrained``, no SBIR training at
  all) as the embedding of both modalities, the 32 px images resized to ``--sizes``: sketch -> photo
  mAP@all over every class and over the studies' groups (``unseen``: classes 9-11; ``photo_only``: 0-3;
  ``sketch_only``: 8-11; each against its group's gallery, as evaluate does), with the group's chance.

Writes ``benchmarks/results/cross_modal_features.json`` and prints a table.

    python benchmarks/cross_modal_features.py [--params pipelines/embedded-full/params.yaml]
        [--teachers outputs/embedded-full/teacher_pretrain/teachers.pt] [--sizes 32 64 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"
sys.path.insert(0, str(REPO / "src"))

# the class groups of bench_dfsbir_seeds.py's studies (--split unseen / overlap) on the 12-class bench
GROUPS = {"all": list(range(12)), "unseen": [9, 10, 11], "photo_only": [0, 1, 2, 3], "sketch_only": [8, 9, 10, 11]}


def imagenet_embedding(net, images, size: int, batch: int = 64):
    """Pooled features of the ImageNet ``net`` for uint8 images (grey repeated to RGB), resized to ``size``."""
    import torch
    import torch.nn.functional as F

    from sbir.models.pretrained import LITE_MEAN, LITE_STD

    mean, std = torch.tensor(LITE_MEAN).view(1, 3, 1, 1), torch.tensor(LITE_STD).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float() / 255
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(net((x - mean) / std))
    return torch.cat(out)


def group_maps(q, q_labels, g, g_labels, batch: int) -> dict[str, dict[str, float]]:
    import torch

    from sbir.metrics import category_retrieval_metrics, chance_category_metrics

    out = {}
    for name, classes in GROUPS.items():
        qi, gi = torch.isin(q_labels, torch.tensor(classes)), torch.isin(g_labels, torch.tensor(classes))
        m = category_retrieval_metrics(q[qi], q_labels[qi], g[gi], g_labels[gi], ks_map=[], ks_precision=[],
                                       batch_size=batch)["mAP@all"]
        c = chance_category_metrics(q_labels[qi], g_labels[gi], ks_map=[], ks_precision=[])["mAP@all"]
        out[name] = {"mAP@all": round(float(m), 4), "chance": round(float(c), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=FULL_PARAMS, help="the dataset and outputs folder")
    ap.add_argument("--teachers", type=Path, default=None,
                    help="a teachers.pt (default: the params' outputs_dir/teacher_pretrain/teachers.pt)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cross_modal_features.json")
    args = ap.parse_args()

    import torch

    from sbir.config import load_params
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset
    from sbir.dfsbir.evaluate import teacher_accuracy_across_modalities
    from sbir.models.checkpoints import load_teachers

    torch.set_num_threads(args.threads)
    root = load_params(args.params)
    ds = open_dataset((REPO / root.dataset_dir).resolve())
    sketches, photos = load_image_set(ds, "sketches", ["test"]), load_image_set(ds, "photos", ["test"])
    record: dict = {"what": "cross-modal class signal without paired training (benchmarks/cross_modal_features.py)",
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "params": str(args.params),
                    "queries": len(sketches), "gallery": len(photos), "groups": GROUPS,
                    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    teachers_path = args.teachers or (REPO / root.outputs_dir / "teacher_pretrain" / "teachers.pt")
    if teachers_path.is_file():
        teachers, blob = load_teachers(str(teachers_path))
        record["teachers"] = {"path": str(teachers_path), **teacher_accuracy_across_modalities(
            teachers, sketches, photos, int(blob["params"]["image_size"]))}
    else:
        print(f"{teachers_path}: no teachers (run the params' pipeline first); the teacher probe is left out")
    from sbir.models.pretrained import efficientnet_lite0, packaged_weights_file

    net = efficientnet_lite0(0, packaged_weights_file()).eval()  # loaded once for every size and modality
    record["imagenet"] = {}
    for size in args.sizes:
        q, g = imagenet_embedding(net, sketches.images, size), imagenet_embedding(net, photos.images, size)
        record["imagenet"][str(size)] = group_maps(q, sketches.labels, g, photos.labels, root.evaluate.batch_size)
    print(json.dumps(record.get("teachers", {}), indent=1))
    print("| ImageNet EfficientNet-Lite0, no training: input px | " + " | ".join(GROUPS) + " |")
    print("|---" * (len(GROUPS) + 1) + "|")
    for size, groups in record["imagenet"].items():
        print(f"| {size} | " + " | ".join(f"{v['mAP@all']:.4f} (chance {v['chance']:.4f})" for v in groups.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
