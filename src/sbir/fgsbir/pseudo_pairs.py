"""pseudo_pairs: G draws one sketch for every unlabelled train photo.

Output ``pseudo_pairs.parquet`` (schema :data:`PSEUDO_SCHEMA`), one row per unlabelled photo:
photo_id, label, the generated stroke-3 sketch, its image (PNG, rendered by
``sbir.strokes.rasterise`` at the dataset's sketch size, as real sketches are), the generator's
per-sequence log-likelihood (over standardised offsets and pen states, under the tempered
distribution it was sampled from), the number of points, whether the sequence was forced to end at
``max_len``, and ``discriminator_score``.

The discriminator D does not exist yet at this stage: it is trained against G's sketches inside the
joint loop (fgsbir_joint), because it has to follow G as REINFORCE changes it. So
``discriminator_score`` is null here; fgsbir_joint writes the final D's score of every pair to
``outputs/fgsbir_joint/pseudo_scores.parquet`` (with the log-likelihood next to it).

Inference only, so no Ray Train job: starting Ray costs more than drawing ~2k sketches (batched,
a few seconds on a CPU). ``pairs.png``: photo / generated / real sketch, for unlabelled photos (the
real column stays blank when their sketches carry no photo_id) and for test photos.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sbir.data.datasets import ImageSet, load_image_set, pair_index, split_pairs
from sbir.data.format import STROKE3_TYPE, decode_image, encode_png, open_dataset, strokes_from_arrow, strokes_to_arrow
from sbir.fgsbir.generator_train import draw, render_sketches
from sbir.fgsbir.params import PseudoPairsParams
from sbir.models.checkpoints import load_generator, load_teachers
from sbir.models.sketch_generator import PhotoToSketchGenerator
from sbir.train import runtime as rt

PSEUDO_SCHEMA = pa.schema([
    ("photo_id", pa.string()),
    ("label", pa.int32()),
    ("strokes", STROKE3_TYPE),
    ("image", pa.binary()),
    ("log_likelihood", pa.float32()),
    ("num_points", pa.int32()),
    ("forced_end", pa.bool_()),
    ("discriminator_score", pa.float32()),
])


def write_pseudo_pairs(path, photo_ids: list[str], labels: list[int], strokes: list[np.ndarray], images: torch.Tensor,
                       log_likelihood: torch.Tensor, forced_end: torch.Tensor,
                       discriminator_score: torch.Tensor | None = None) -> None:
    n = len(photo_ids)
    cols = {
        "photo_id": pa.array(photo_ids, pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int32)),
        "strokes": strokes_to_arrow(strokes),
        "image": pa.array([encode_png(im[0].numpy()) for im in images], pa.binary()),
        "log_likelihood": pa.array(log_likelihood.numpy().astype(np.float32)),
        "num_points": pa.array(np.asarray([len(s) for s in strokes], dtype=np.int32)),
        "forced_end": pa.array(forced_end.numpy().astype(bool)),
        "discriminator_score": (pa.nulls(n, pa.float32()) if discriminator_score is None
                                else pa.array(discriminator_score.numpy().astype(np.float32))),
    }
    pq.write_table(pa.Table.from_pydict(cols, schema=PSEUDO_SCHEMA), path, row_group_size=4096, compression="zstd")


def read_pseudo_pairs(path, with_strokes: bool = False) -> dict[str, Any]:
    """photo_ids, labels, images (uint8 N×1×H×W), log_likelihood (and strokes) of a pseudo-pair file."""
    table = pq.read_table(path)
    missing = set(PSEUDO_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a pseudo-pair file (missing columns {sorted(missing)})")
    blobs = table.column("image").to_pylist()
    images = (torch.from_numpy(np.stack([decode_image(b, "L", f"{path} row {i}") for i, b in enumerate(blobs)]))[:, None]
              if blobs else torch.zeros((0, 1, 1, 1), dtype=torch.uint8))
    out = {"photo_ids": table.column("photo_id").to_pylist(),
           "labels": torch.from_numpy(table.column("label").to_numpy().astype(np.int64)),
           "images": images.contiguous(),
           "log_likelihood": torch.from_numpy(table.column("log_likelihood").to_numpy().astype(np.float32))}
    if with_strokes:
        out["strokes"] = strokes_from_arrow(table.column("strokes"))
    return out


@rt.with_worker_threads
def run_pseudo_pairs(ctx) -> dict[str, Any]:
    """Stage body: G draws one sketch per unlabelled train photo; ``pseudo_pairs.parquet``, pairs.png."""
    from sbir.plots import image_grid

    p: PseudoPairsParams = ctx.params.pseudo_pairs
    gen_path = ctx.input("sketch_generator", "generator.pt")
    ds = open_dataset(ctx.path(ctx.params.dataset_dir))
    torch.manual_seed(ctx.params.seed)
    t0 = time.time()
    model, blob = load_generator(gen_path)
    photos = load_image_set(ds, "photos", ["train"])
    sketches = load_image_set(ds, "sketches", ["train"])
    size = p.render_size or int(sketches.images.shape[-1])
    unl = torch.nonzero(~photos.labelled).flatten()
    if len(unl) == 0:
        raise ValueError(f"{ds.root}: every train photo is labelled; there is nothing to draw pseudo sketches for")
    teachers = load_teachers(ctx.input("teacher_pretrain", "teachers.pt")) if p.candidates > 1 else None
    drawn = draw_best_of(model, photos.images[unl], p, size, ctx.params.seed, teachers)
    strokes, loglik, lengths, images = drawn["strokes"], drawn["log_likelihood"], drawn["lengths"], drawn["images"]
    max_len = int(blob["config"]["max_len"])
    # a sequence that did not stop by itself ends at row max_len with no end-state choice of its own
    forced = lengths >= max_len
    gen_seconds = time.time() - t0
    ids = [photos.ids[i] for i in unl.tolist()]
    write_pseudo_pairs(ctx.tmp_out / "pseudo_pairs.parquet", ids, photos.labels[unl].tolist(), strokes, images,
                       loglik, forced)

    # preview: unlabelled photos (real sketch only if their sketches keep a photo_id) and test photos
    rows, labels = preview_unlabelled(ds, photos, sketches, unl, images, max(1, p.num_preview // 2))
    preview_test_pairs(ds, model, p, ctx.params.seed, size, p.num_preview - len(rows), rows, labels, teachers)
    best_of = f", best of {p.candidates}" if p.candidates > 1 else ""
    image_grid(rows, ctx.tmp_out / "pairs.png", row_labels=labels, col_labels=["photo", "generated", "real"],
               title=f"pseudo pairs (T={p.temperature}{', greedy' if p.greedy else ''}{best_of})")

    n_pts = np.asarray([len(s) for s in strokes])
    metrics = {
        "num_pseudo_pairs": len(ids),
        "mean_points": round(float(n_pts.mean()), 2),
        "share_empty": round(float((n_pts == 0).mean()), 4),
        "share_forced_end": round(float(forced.float().mean()), 4),
        "mean_log_likelihood": round(float(loglik.mean()), 3),
        "mean_ink": round(float(1.0 - images.float().mean() / 255.0), 4),
        "generate_seconds": round(gen_seconds, 1),
        "candidates": p.candidates,
    }
    if drawn["agreement"] is not None:
        metrics["mean_teacher_agreement"] = round(float(drawn["agreement"].mean()), 4)
        metrics["share_first_candidate_kept"] = round(float((drawn["chosen"] == 0).float().mean()), 4)
    if p.teacher_check:
        metrics.update(teacher_agreement(ctx.input("teacher_pretrain", "teachers.pt"), images, photos.labels[unl],
                                         sketches))
    ctx.write_json("metrics.json", metrics)
    return metrics


def draw_best_of(model: PhotoToSketchGenerator, photos_u8: torch.Tensor, p: PseudoPairsParams, size: int, seed: int,
                 teachers: tuple | None = None) -> dict[str, Any]:
    """G's sketch of every photo, rendered; with ``p.candidates`` > 1 the best of that many samples by
    :func:`class_agreement` (``teachers`` = :func:`load_teachers`'s pair). The first candidate is the
    single-sample draw (same seed), so candidates = 1 is exactly G's sample."""
    best: dict[str, Any] = {"agreement": None, "chosen": None}
    for k in range(p.candidates):
        strokes, loglik, lengths = draw(model, photos_u8, p.temperature, greedy=p.greedy, seed=seed + 7919 * k,
                                        pen_temperature=p.pen_temperature, batch_size=p.batch_size)
        images = render_sketches(strokes, size, p.line_width)
        if p.candidates == 1:
            return {**best, "strokes": strokes, "log_likelihood": loglik, "lengths": lengths, "images": images}
        if teachers is None:
            raise ValueError("pseudo_pairs.candidates > 1 needs the teachers (teacher_pretrain's teachers.pt)")
        score = class_agreement(*teachers, photos_u8, images)
        if k == 0:
            best = {"strokes": strokes, "log_likelihood": loglik, "lengths": lengths, "images": images,
                    "agreement": score, "chosen": torch.zeros(len(score), dtype=torch.long)}
            continue
        better = score > best["agreement"]
        best["strokes"] = [new if b else old for old, new, b in zip(best["strokes"], strokes, better.tolist())]
        for key, value in (("log_likelihood", loglik), ("lengths", lengths), ("images", images), ("agreement", score)):
            best[key] = torch.where(better.view(-1, *([1] * (value.dim() - 1))), value, best[key])
        best["chosen"][better] = k
    return best


@torch.no_grad()
def class_agreement(teachers, blob: dict, photos_u8: torch.Tensor, sketches_u8: torch.Tensor,
                    batch: int = 512) -> torch.Tensor:
    """Per pair, sum_c p_photo(c) * log p_sketch(c): how well the sketch teacher recognises, in the sketch,
    the class the photo teacher sees in the photo (higher is better; uses no labels)."""
    from sbir.models.backbones import resize, to_float

    size = int(blob["params"]["image_size"])
    shared = (teachers.photo_teacher.known & teachers.sketch_teacher.known).cpu()  # classes both teachers learnt
    out = []
    for i in range(0, len(photos_u8), batch):
        p_photo = teachers.photo_teacher(resize(to_float(photos_u8[i : i + batch]), size))[:, shared].softmax(1)
        log_p_sketch = teachers.sketch_teacher(resize(to_float(sketches_u8[i : i + batch]), size))[:, shared].log_softmax(1)
        out.append((p_photo * log_p_sketch).sum(1))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def teacher_agreement(teachers_path, pseudo_images: torch.Tensor, pseudo_labels: torch.Tensor, real: ImageSet,
                      batch: int = 512) -> dict[str, float]:
    """The sketch teacher's accuracy on the pseudo sketches (against their photo's class) and, for
    reference, on the real train sketches (which it was trained on: an optimistic ceiling)."""
    from sbir.models.backbones import resize, to_float

    teachers, blob = load_teachers(teachers_path)
    size = int(blob["params"]["image_size"])

    def acc(images: torch.Tensor, labels: torch.Tensor) -> float:
        pred = torch.cat([teachers.sketch_teacher(resize(to_float(images[i : i + batch]), size)).argmax(1)
                          for i in range(0, len(images), batch)])
        return round(float((pred == labels).float().mean()), 4)

    return {"sketch_teacher_acc_pseudo": acc(pseudo_images, pseudo_labels),
            "sketch_teacher_acc_real_train": acc(real.images, real.labels),
            "chance_class_acc": round(1.0 / int(teachers.sketch_teacher.known.sum()), 4)}


def preview_unlabelled(ds, photos: ImageSet, sketches: ImageSet, unl: torch.Tensor, images: torch.Tensor, k: int
                       ) -> tuple[list[list], list[str]]:
    """Rows (photo, generated, real sketch when one keeps that photo_id) for ``k`` spread unlabelled photos."""
    real_of = {}
    pidx = pair_index(sketches, photos)
    for s, ph in enumerate(pidx.tolist()):
        if ph >= 0 and ph not in real_of:
            real_of[ph] = sketches.images[s, 0].numpy()
    rows, labels = [], []
    for j in torch.linspace(0, len(unl) - 1, min(k, len(unl))).round().long().tolist():
        rows.append([photos.images[unl[j]].permute(1, 2, 0).numpy(), images[j, 0].numpy(), real_of.get(int(unl[j]))])
        labels.append(f"unlab. {ds.class_names[int(photos.labels[unl[j]])]}")
    return rows, labels


def preview_test_pairs(ds, model: PhotoToSketchGenerator, p: PseudoPairsParams, seed: int, size: int, k: int,
                       rows: list[list], labels: list[str], teachers: tuple | None = None) -> None:
    """Append up to ``k`` rows (photo, generated, real) of spread test pairs to ``rows`` / ``labels``, drawn
    as the pseudo pairs are (best of ``p.candidates`` by the teachers)."""
    t_sketches, t_photos, t_rows, t_photo_rows = split_pairs(ds, "test")
    if not len(t_rows):
        return
    spread = torch.linspace(0, len(t_rows) - 1, min(k, len(t_rows))).round().long()
    pick, pick_photos = t_rows[spread], t_photo_rows[spread]
    if not len(pick):
        return
    t_img = draw_best_of(model, t_photos.images[pick_photos], p, size, seed, teachers)["images"]
    for j, (s, ph) in enumerate(zip(pick.tolist(), pick_photos.tolist())):
        rows.append([t_photos.images[ph].permute(1, 2, 0).numpy(), t_img[j, 0].numpy(),
                     t_sketches.images[s, 0].numpy()])
        labels.append(f"test {ds.class_names[int(t_photos.labels[ph])]}")
