"""Held-out validation signals for sweeps (``sbir.sweep``): never the test split.

The pipeline's own evaluation stages read the test split, so a sweep that picked its best trial on them
would tune on the test set. These functions score a trial's outputs on a validation set carved from the
*train* split instead, always the same set for every trial (a fixed seed, independent of the trial's):

* ``category``: per class ``per_class`` train sketches query ``per_class`` train photos; the distilled
  students (``<outputs>/distill/students.pt``) never saw any real image, so the set is held out for
  them. The teachers did train on these images, so the ``classifier_only`` row is optimistic here and
  is logged only as a reference. Keys: ``val/<method>/mAP@all``, ``val/<method>/P@<k>``.
* ``fine_grained``: real sketches of the *unlabelled* train photos query those photos. fgsbir_joint's
  ``supervised`` and ``semi`` variants never train on these sketches (``semi`` sees the photos with
  generated sketches only; ``full`` trains on them, so it is not scored). Keys: ``val/<variant>/acc@k``,
  ``val/<variant>/mean_rank``.

Which split the objective used is written into every sweep's results (``docs/sweeps.md``).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

ValidationKind = Literal["category", "fine_grained", "none"]


def _per_class_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Row indices: up to ``per_class`` rows of every class, drawn with a fixed seed (sorted)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        rows.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.sort(torch.cat(rows)).values if rows else torch.zeros(0, dtype=torch.long)


def category_validation(dataset_dir: Path, outputs_dir: Path, per_class: int = 20, seed: int = 0,
                        precision_ks: Sequence[int] = (10,), batch_size: int = 256) -> dict[str, float]:
    """Category-level retrieval of the distilled students on a train-split validation set."""
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset
    from sbir.dfsbir.evaluate import method_embeddings
    from sbir.metrics import category_retrieval_metrics

    ds = open_dataset(dataset_dir)
    sketches = load_image_set(ds, "sketches", ["train"])
    photos = load_image_set(ds, "photos", ["train"])
    if len(sketches) == 0 or len(photos) == 0:
        raise ValueError(f"{ds.root}: the train split needs sketches and photos for a validation set "
                         f"({len(sketches)}, {len(photos)})")
    sketches = sketches.subset(_per_class_subset(sketches.labels, per_class, seed))
    photos = photos.subset(_per_class_subset(photos.labels, per_class, seed + 1))
    teachers = outputs_dir / "teacher_pretrain" / "teachers.pt"
    students = outputs_dir / "distill" / "students.pt"
    for f in (teachers, students):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: the trial must run (or link) the stages that write it")
    ks = [k for k in precision_ks if k <= len(photos)] or [len(photos)]
    out: dict[str, float] = {"val/num_queries": float(len(sketches)), "val/gallery_size": float(len(photos))}
    for name, (q, g) in method_embeddings(sketches, photos, teachers, {"crossx_dfl": students}, batch_size).items():
        m = category_retrieval_metrics(q, sketches.labels, g, photos.labels, ks_map=[], ks_precision=ks,
                                       batch_size=batch_size)
        out.update({f"val/{name}/{k}": float(v) for k, v in m.items() if not k.startswith("num_")})
    return out


def fine_grained_validation(dataset_dir: Path, outputs_dir: Path, ks: Sequence[int] = (1, 5, 10),
                            batch_size: int = 256, variants: Sequence[str] = ("semi", "supervised")
                            ) -> dict[str, float]:
    """Instance-level retrieval: real sketches of the unlabelled train photos query those photos."""
    from sbir.data.datasets import load_image_set, pair_index
    from sbir.data.format import open_dataset
    from sbir.fgsbir.evaluate import fine_grained_metrics
    from sbir.models.backbones import embed
    from sbir.models.checkpoints import load_retrieval_checkpoint

    ds = open_dataset(dataset_dir)
    sketches = load_image_set(ds, "sketches", ["train"])
    photos = load_image_set(ds, "photos", ["train"])
    if photos.labelled is None or len(photos) == 0:
        raise ValueError(f"{ds.root}: no train photos with a 'labelled' flag for fine-grained validation")
    unl = torch.nonzero(~photos.labelled).flatten()
    gallery = photos.subset(unl)
    pidx = pair_index(sketches, gallery)
    q_rows = torch.nonzero(pidx >= 0).flatten()
    if len(q_rows) == 0:
        raise ValueError(f"{ds.root}: no train sketch of an unlabelled train photo (sketches need their photo_id)")
    true_idx = pidx[q_rows]
    ck_dir = outputs_dir / "fgsbir_joint" / "checkpoints"
    found = [v for v in variants if (ck_dir / f"{v}.pt").is_file()]
    if not found:
        raise FileNotFoundError(f"{ck_dir}: none of {list(variants)} was written (fgsbir_joint.variants)")
    out: dict[str, float] = {"val/num_queries": float(len(q_rows)), "val/gallery_size": float(len(gallery))}
    for name in found:
        model, blob = load_retrieval_checkpoint(ck_dir / f"{name}.pt")
        size = blob["arch"].get("image_size")
        q = embed(model.sketch_encoder, sketches.images[q_rows], size=size, batch=batch_size)
        g = embed(model.photo_encoder, gallery.images, size=size, batch=batch_size)
        m, _ = fine_grained_metrics(q, g, true_idx, ks)
        out.update({f"val/{name}/{k}": float(v) for k, v in m.items()})
    return out


def run_validation(kind: ValidationKind, dataset_dir: Path, outputs_dir: Path, options: dict[str, Any] | None = None,
                   torch_threads: int | None = None) -> dict[str, float]:
    """Dispatch on ``kind``; ``torch_threads`` pins the thread count so a rerun computes the same floats."""
    from sbir.train.runtime import torch_threads as pinned_threads

    options = dict(options or {})
    with pinned_threads(torch_threads) if torch_threads else nullcontext():
        if kind == "category":
            return category_validation(dataset_dir, outputs_dir, **options)
        if kind == "fine_grained":
            return fine_grained_validation(dataset_dir, outputs_dir, **options)
    return {}
