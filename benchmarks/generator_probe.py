"""How well does G draw its photo? Generated test sketches scored under a trained fully supervised F.

For each generator checkpoint (``--generator NAME=PATH``, repeatable) and each decoding setting
(temperature / greedy, pen temperature), G draws one sketch of every test photo (rendered as the pseudo
pairs are); the script reports

* the generated -> own-photo mean rank and Acc@1/10 under ``--full`` (the fully supervised F of an
  fgsbir_joint run: issue #13's target is a mean rank <= 40 of 480),
* the sketch teacher's class accuracy on those sketches (is the drawing recognisable as its class?),
* the own photo's mean rank among the photos of its class only (the instance detail, apart from the class),
* the share of samples that ran to max_len (no end state) and the mean number of points.

Inference only (a minute on two cores), so decoding choices can be screened without rerunning the
joint stage. Writes ``--out`` (JSON) and prints a table.

    python benchmarks/generator_probe.py --dataset /tmp/fgx/data_c0 --full RUN/fgsbir_joint/checkpoints/full.pt \\
        --teachers outputs/teacher_pretrain/teachers.pt --generator global=RUN/sketch_generator/generator.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DECODINGS = {  # name -> draw() keyword arguments
    "t0.4": {"temperature": 0.4},
    "t0.4_pen1": {"temperature": 0.4, "pen_temperature": 1.0},
    "greedy": {"temperature": 1.0, "greedy": True},
    "t0.2_pen1": {"temperature": 0.2, "pen_temperature": 1.0},
}


def probe(generator_path: str, decoding: dict, photos, labels, full, teachers_path: str, line_width: float,
          sketch_size: int, candidates: int = 1) -> dict[str, float]:
    import numpy as np
    import torch

    from sbir.fgsbir.evaluate import fine_grained_metrics
    from sbir.fgsbir.params import PseudoPairsParams
    from sbir.fgsbir.pseudo_pairs import draw_best_of, teacher_agreement
    from sbir.data.datasets import ImageSet
    from sbir.models.backbones import embed
    from sbir.models.checkpoints import load_generator, load_teachers

    g, _ = load_generator(generator_path)
    torch.manual_seed(0)
    # the pseudo_pairs stage's own drawing (candidates > 1: the teachers' best of that many samples)
    p = PseudoPairsParams(**decoding, candidates=candidates, line_width=line_width)
    drawn = draw_best_of(g, photos.images, p, sketch_size, 0, load_teachers(teachers_path) if candidates > 1 else None)
    strokes, lengths, images = drawn["strokes"], drawn["lengths"], drawn["images"]
    model, blob = full
    size = blob["arch"].get("image_size")
    with torch.no_grad():
        q = embed(model.sketch_encoder, images, size=size, batch=256)
        gal = embed(model.photo_encoder, photos.images, size=size, batch=256)
    m, _ = fine_grained_metrics(q, gal, torch.arange(len(photos)), (1, 10))
    within = within_class_mean_rank(q, gal, torch.arange(len(photos)), labels)
    one = ImageSet(ids=["x"], images=images[:1], labels=labels[:1])  # its real-sketch reference is not needed here
    cls = teacher_agreement(teachers_path, images, labels, one)["sketch_teacher_acc_pseudo"]
    return {"mean_rank": round(float(m["mean_rank"]), 2), "acc@1": round(float(m["acc@1"]), 4),
            "acc@10": round(float(m["acc@10"]), 4), "sketch_teacher_acc": cls,
            "within_class_mean_rank": round(within, 2),
            "within_class_chance": round(float(np.mean([(int((labels == c).sum()) + 1) / 2 for c in labels])), 2),
            "share_forced_end": round(float((lengths >= g.config.max_len).float().mean()), 4),
            "mean_points": round(float(np.mean([len(s) for s in strokes])), 2)}


def within_class_mean_rank(q, gal, true_index, gallery_labels) -> float:
    """Mean rank of each sketch's own photo (``true_index``) among the photos of its class only (1 = first):
    the instance detail a sketch carries, apart from drawing the right class (chance: (class size + 1) / 2)."""
    import torch

    q, gal = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(gal, dim=1)
    sim = q @ gal.T
    own = sim.gather(1, true_index.view(-1, 1))
    same_class = gallery_labels[true_index].unsqueeze(1) == gallery_labels.unsqueeze(0)
    return float(((sim > own) & same_class).sum(1).float().add(1).mean())


def real_sketch_reference(ds, full) -> dict[str, float]:
    """The same figures for the real test sketches under ``full``: what a perfect G would reach."""
    import torch

    from sbir.data.datasets import split_pairs
    from sbir.fgsbir.evaluate import fine_grained_metrics
    from sbir.models.backbones import embed

    sketches, photos, rows, photo_rows = split_pairs(ds, "test")
    model, blob = full
    size = blob["arch"].get("image_size")
    with torch.no_grad():
        q = embed(model.sketch_encoder, sketches.images[rows], size=size, batch=256)
        gal = embed(model.photo_encoder, photos.images, size=size, batch=256)
    m, _ = fine_grained_metrics(q, gal, photo_rows, (1, 10))
    return {"mean_rank": round(float(m["mean_rank"]), 2), "acc@1": round(float(m["acc@1"]), 4),
            "acc@10": round(float(m["acc@10"]), 4),
            "within_class_mean_rank": round(within_class_mean_rank(q, gal, photo_rows, photos.labels), 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="the prepared dataset the generators and F were trained on")
    ap.add_argument("--full", required=True, help="an fgsbir_joint checkpoint (checkpoints/full.pt) that ranks")
    ap.add_argument("--teachers", required=True, help="teacher_pretrain's teachers.pt (the class check)")
    ap.add_argument("--generator", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=list(DECODINGS))
    ap.add_argument("--candidates", type=int, nargs="+", default=[1],
                    help="samples per photo, the teachers' best kept (pseudo_pairs.candidates); one row per value "
                         "(values > 1 skip greedy decoding, which draws one sketch)")
    ap.add_argument("--line-width", type=float, default=1.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/generator_probe.json"))
    args = ap.parse_args(argv)

    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset
    from sbir.models.checkpoints import load_retrieval_checkpoint

    ds = open_dataset(args.dataset)
    photos = load_image_set(ds, "photos", ["test"])
    sketch_size = int(load_image_set(ds, "sketches", ["test"]).images.shape[-1])
    full = load_retrieval_checkpoint(args.full)
    rows = []
    for spec in args.generator:
        name, path = spec.split("=", 1)
        for dec in args.decodings:
            for k in args.candidates:
                if k > 1 and DECODINGS[dec].get("greedy"):
                    continue
                r = probe(path, DECODINGS[dec], photos, photos.labels, full, args.teachers, args.line_width,
                          sketch_size, k)
                rows.append({"generator": name, "decoding": dec, "candidates": k, **r})
                print(json.dumps(rows[-1]), flush=True)
    reference = real_sketch_reference(ds, full)
    print(json.dumps({"real test sketches": reference}), flush=True)
    result = {"dataset": args.dataset, "full": args.full, "gallery_size": len(photos), "rows": rows,
              "real_sketches": reference}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
