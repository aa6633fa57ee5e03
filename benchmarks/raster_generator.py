"""Departure ablation (issue #13, item 5): a raster photo->sketch generator in place of the sequential G.

NOT the paper's method: the paper's G draws stroke sequences (sketch_generator, kept as the default). This
script asks whether a generator that keeps the instance's geometry gives the semi-supervised gain that G's
class-right but instance-blind sketches do not (within its class a G sketch ranks its photo at chance).

Per seed: a small conv encoder-decoder (``RasterG``: stride-2 convolutions down to 8x8 and transposed
convolutions back, with skips) learns photo -> the real sketch's ink on the labelled pairs (per-pixel
binary cross-entropy, ink weighted up against the white page); it draws every unlabelled train photo; the
drawings go into ``<work>/seed_<n>/pseudo_pairs/pseudo_pairs.parquet`` (the stage's schema, no strokes);
then ``bench_fgsbir_seeds.py --stages fgsbir_joint fg_evaluate`` runs supervised-only and semi with that
pool (``semi_no_policy_gradient``: a raster G has no sequence for REINFORCE to score). With ``--full`` the
raster sketches of the test photos are also ranked under that fully supervised F (generator_probe's
figures). Trained here in plain torch on the CPU, outside Ray: a benchmark, not a pipeline stage.

    python benchmarks/raster_generator.py --dataset /tmp/fgx/data_c0 --seeds 0 --work /tmp/raster \\
        --full RUN/fgsbir_joint/checkpoints/full.pt -- --set fgsbir_joint.weights.pseudo_triplet=1.0 ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))


class RasterG(nn.Module):
    """Photo (3x32x32, [0,1]) -> ink logits (1x32x32): a three-level encoder-decoder with skips."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        w = width
        self.d1, self.d2, self.d3 = block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2)
        self.u2 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), nn.ReLU(inplace=True))
        self.m2 = block(4 * w, 2 * w, 1)
        self.u1 = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 2, 2), nn.ReLU(inplace=True))
        self.m1 = block(2 * w, w, 1)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.d1(x)
        b = self.d2(a)
        c = self.d3(b)
        b2 = self.m2(torch.cat([self.u2(c), b], 1))
        return self.head(self.m1(torch.cat([self.u1(b2), a], 1)))


def fit(photos_u8: torch.Tensor, sketches_u8: torch.Tensor, seed: int, steps: int, batch: int = 32,
        lr: float = 1e-3, ink_weight: float = 4.0) -> tuple[RasterG, list[float]]:
    """Fit RasterG on (photo, sketch) pairs; the target is the sketch's ink, (255 - value) / 255. No
    augmentation: a shift would move photo and sketch apart (their frames differ already)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    g = RasterG()
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x_all, ink_all = photos_u8.float() / 255.0, 1.0 - sketches_u8.float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="raster G", mininterval=5):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        logits, ink = g(x_all[idx]), ink_all[idx]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, ink, pos_weight=torch.tensor(ink_weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return g.eval(), losses


@torch.no_grad()
def draw_raster(g: RasterG, photos_u8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 (N,1,32,32) sketches, black ink on white as the dataset's, from G's ink probabilities."""
    ink = torch.cat([torch.sigmoid(g(photos_u8[i : i + batch].float() / 255.0)) for i in range(0, len(photos_u8), batch)])
    return torch.round(255.0 * (1.0 - ink)).to(torch.uint8)


def probe_under_full(g: RasterG, ds, full_path: str) -> dict[str, float]:
    """Generated test sketches ranked under a fully supervised F (as generator_probe does for G)."""
    from generator_probe import within_class_mean_rank

    from sbir.data.datasets import load_image_set
    from sbir.fgsbir.evaluate import fine_grained_metrics
    from sbir.models.backbones import embed
    from sbir.models.checkpoints import load_retrieval_checkpoint

    photos = load_image_set(ds, "photos", ["test"])
    model, blob = load_retrieval_checkpoint(full_path)
    size = blob["arch"].get("image_size")
    with torch.no_grad():
        q = embed(model.sketch_encoder, draw_raster(g, photos.images), size=size, batch=256)
        gal = embed(model.photo_encoder, photos.images, size=size, batch=256)
    true = torch.arange(len(photos))
    m, _ = fine_grained_metrics(q, gal, true, (1, 10))
    return {"mean_rank": round(float(m["mean_rank"]), 2), "acc@1": round(float(m["acc@1"]), 4),
            "acc@10": round(float(m["acc@10"]), 4),
            "within_class_mean_rank": round(within_class_mean_rank(q, gal, true, photos.labels), 2)}


def write_pool(g: RasterG, ds, out_dir: Path) -> int:
    """The unlabelled train photos' raster sketches as a pseudo_pairs.parquet (strokes empty)."""
    import numpy as np

    from sbir.data.datasets import load_image_set
    from sbir.fgsbir.pseudo_pairs import write_pseudo_pairs

    photos = load_image_set(ds, "photos", ["train"])
    unl = torch.nonzero(~photos.labelled).flatten()
    images = draw_raster(g, photos.images[unl])
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(unl)
    write_pseudo_pairs(out_dir / "pseudo_pairs.parquet", [photos.ids[i] for i in unl.tolist()],
                       photos.labels[unl].tolist(), [np.zeros((0, 3), np.float32)] * n, images, torch.zeros(n),
                       torch.zeros(n, dtype=torch.bool))
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="a prepared dataset with labelled pairs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500, help="raster G optimiser steps")
    ap.add_argument("--work", required=True, help="per-seed output folders (bench_fgsbir_seeds' --work)")
    ap.add_argument("--full", default=None, help="a full.pt that ranks the raster test sketches (optional)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/raster_generator.json"))
    ap.add_argument("bench_args", nargs=argparse.REMAINDER,
                    help="after '--': bench_fgsbir_seeds arguments (--teachers, --set ...)")
    args = ap.parse_args(argv)

    import bench_fgsbir_seeds

    from sbir.data.datasets import fine_grained_pairs, load_image_set
    from sbir.data.format import open_dataset

    ds = open_dataset(args.dataset)
    photos, sketches = load_image_set(ds, "photos", ["train"]), load_image_set(ds, "sketches", ["train"])
    s_rows, p_rows = fine_grained_pairs(sketches, photos, labelled_only=True)
    per_seed = {}
    for seed in args.seeds:
        t0 = time.time()
        g, losses = fit(photos.images[p_rows], sketches.images[s_rows], seed, args.steps)
        n = write_pool(g, ds, Path(args.work) / f"seed_{seed}" / "pseudo_pairs")
        per_seed[seed] = {"train_seconds": round(time.time() - t0, 1), "num_pairs": len(s_rows), "num_pseudo": n,
                          "first_loss": round(losses[0], 4), "final_loss": round(sum(losses[-50:]) / 50, 4)}
        if args.full:
            per_seed[seed]["under_full_f"] = probe_under_full(g, ds, args.full)
        print(json.dumps({seed: per_seed[seed]}), flush=True)
    extra = [a for a in args.bench_args if a != "--"]
    bench = bench_fgsbir_seeds.main(["--seeds", *map(str, args.seeds), "--work", args.work, "--stages", "fgsbir_joint",
                                     "fg_evaluate", "--out", str(Path(args.out).with_suffix(".bench.json")),
                                     "--set", f"dataset_dir={args.dataset}", "--set", "fgsbir_joint.variants=[supervised]",
                                     "--set", "fgsbir_joint.ablations=[no_policy_gradient]",
                                     "--set", "fg_evaluate.generated_queries=false", *extra])
    result = {"dataset": args.dataset, "steps": args.steps, "generator": per_seed, "bench": bench}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
