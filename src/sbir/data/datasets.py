"""In-memory tensors and torch datasets on top of a prepared dataset.

:func:`load_image_set` streams the Parquet row groups of one table, decodes the images and keeps them
as a uint8 tensor (32 px × 10k images is a few MB; real 224 px data should set ``max_images`` or use
:class:`LazyImageDataset`, which keeps only the encoded bytes in memory).
"""
from __future__ import annotations

import contextlib
import io
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sbir.data.format import PreparedDataset, decode_image, strokes_from_arrow


@dataclass
class ImageSet:
    """Decoded images of one table (photos or sketches) with their labels and ids."""

    images: torch.Tensor  # uint8 (N, C, H, W); C=3 photos, C=1 sketches
    labels: torch.Tensor  # int64 (N,)
    ids: list[str]
    photo_ids: list[str | None] = field(default_factory=list)  # sketches: the paired photo
    labelled: torch.Tensor | None = None  # photos: fine-grained labelled flag
    strokes: list[np.ndarray | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: torch.Tensor | Sequence[int]) -> "ImageSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        il = idx.tolist()
        return ImageSet(
            images=self.images[idx], labels=self.labels[idx], ids=[self.ids[i] for i in il],
            photo_ids=[self.photo_ids[i] for i in il] if self.photo_ids else [],
            labelled=self.labelled[idx] if self.labelled is not None else None,
            strokes=[self.strokes[i] for i in il] if self.strokes else [],
        )


def _decode_resized(data: bytes, mode: str, size: int | None, source: str) -> np.ndarray:
    arr = decode_image(data, mode=mode, source=source)
    if size is not None and (arr.shape[0] != size or arr.shape[1] != size):
        img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img)
    return arr


def load_image_set(ds: PreparedDataset, table: str, splits: Sequence[str] | None = None,
                   image_size: int | None = None, with_strokes: bool = False, workers: int = 0) -> ImageSet:
    """Decode every image of ``table`` in ``splits`` (streamed by row group) into an :class:`ImageSet`;
    ``workers`` > 0 decodes each row group on that many threads (PIL releases the GIL while it decodes),
    in row order: the same tensor as without them."""
    with ThreadPoolExecutor(workers) if workers > 0 else contextlib.nullcontext() as pool:
        return _load_image_set(ds, table, splits, image_size, with_strokes, pool)


def _load_image_set(ds: PreparedDataset, table: str, splits: Sequence[str] | None, image_size: int | None,
                    with_strokes: bool, pool: ThreadPoolExecutor | None) -> ImageSet:
    mode = "RGB" if table == "photos" else "L"
    cols = ["id", "label", "image"] + (["labelled"] if table == "photos" else ["photo_id"])
    if with_strokes and table == "sketches":
        cols.append("strokes")
    images: list[np.ndarray] = []
    labels: list[int] = []
    ids: list[str] = []
    photo_ids: list[str | None] = []
    labelled: list[bool] = []
    strokes: list[np.ndarray | None] = []
    for batch in ds.iter_batches(table, columns=cols, splits=splits):
        d = batch.to_pydict() if not with_strokes else {c: batch.column(c).to_pylist() for c in cols if c != "strokes"}
        args = (d["image"], [mode] * len(d["id"]), [image_size] * len(d["id"]),
                [f"{ds.path(table)} row id={i}" for i in d["id"]])
        images += pool.map(_decode_resized, *args) if pool else map(_decode_resized, *args)
        labels += d["label"]
        ids += d["id"]
        if table == "photos":
            labelled += d["labelled"]
        else:
            photo_ids += d["photo_id"]
        if with_strokes and table == "sketches":
            strokes += strokes_from_arrow(batch.column("strokes"))
    if images:
        arr = np.stack(images)
        if arr.ndim == 3:
            arr = arr[:, None]
        else:
            arr = arr.transpose(0, 3, 1, 2)
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        c = 3 if table == "photos" else 1
        tensor = torch.zeros((0, c, image_size or 1, image_size or 1), dtype=torch.uint8)
    return ImageSet(
        images=tensor,
        labels=torch.tensor(labels, dtype=torch.long),
        ids=ids,
        photo_ids=photo_ids,
        labelled=torch.tensor(labelled, dtype=torch.bool) if table == "photos" else None,
        strokes=strokes,
    )


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float [0,1] with 3 channels."""
    from sbir.models.backbones import to_float

    return to_float(x)


class CategoryDataset(Dataset):
    """Category-level (image, label) pairs of one modality; images float [0,1], 3 channels."""

    def __init__(self, images: ImageSet) -> None:
        self.set = images

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_float_images(self.set.images[i : i + 1])[0], int(self.set.labels[i])


class LazyImageDataset(Dataset):
    """(image, label) decoded on access from encoded bytes kept in memory (for large real datasets)."""

    def __init__(self, ds: PreparedDataset, table: str, splits: Sequence[str] | None, image_size: int) -> None:
        tbl = ds.read(table, columns=["id", "label", "image"], splits=splits)
        self.ids = tbl.column("id").to_pylist()
        self.labels = tbl.column("label").to_pylist()
        self.data = tbl.column("image").to_pylist()
        self.mode = "RGB" if table == "photos" else "L"
        self.size = image_size
        self.source = str(ds.path(table))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = _decode_resized(self.data[i], self.mode, self.size, f"{self.source} row id={self.ids[i]}")
        t = torch.from_numpy(np.ascontiguousarray(arr[:, :, None] if arr.ndim == 2 else arr)).permute(2, 0, 1)
        return to_float_images(t[None])[0], self.labels[i]


def pair_index(sketches: ImageSet, photos: ImageSet) -> torch.Tensor:
    """For each sketch, the row of its paired photo in ``photos`` (-1 when unpaired or absent)."""
    row = {pid: i for i, pid in enumerate(photos.ids)}
    return torch.tensor([row.get(pid, -1) if pid is not None else -1 for pid in sketches.photo_ids], dtype=torch.long)


class FineGrainedTripletDataset(Dataset):
    """(sketch, its photo, a negative photo) for instance-level training; negatives prefer the same class."""

    def __init__(self, sketches: ImageSet, photos: ImageSet, seed: int = 0, same_class_negatives: float = 0.5) -> None:
        self.sketches, self.photos = sketches, photos
        self.pairs = pair_index(sketches, photos)
        self.keep = torch.nonzero(self.pairs >= 0).flatten()
        self.rng = random.Random(seed)
        self.same_class = same_class_negatives
        self.by_class: dict[int, list[int]] = {}
        for i, lab in enumerate(photos.labels.tolist()):
            self.by_class.setdefault(lab, []).append(i)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = int(self.keep[i])
        p = int(self.pairs[s])
        lab = int(self.photos.labels[p])
        pool = self.by_class[lab] if self.rng.random() < self.same_class and len(self.by_class[lab]) > 1 else None
        while True:
            n = self.rng.choice(pool) if pool else self.rng.randrange(len(self.photos))
            if n != p:
                break
        f = to_float_images
        return (f(self.sketches.images[s : s + 1])[0], f(self.photos.images[p : p + 1])[0],
                f(self.photos.images[n : n + 1])[0])


class Stroke5Dataset(Dataset):
    """(photo, stroke-5 sequence, length) for the photo-to-sketch generator.

    Sketches are RDP-simplified (``epsilon`` in stroke units) and capped at ``max_len`` points; the
    sequence layout is :func:`sbir.strokes.pad_stroke5`'s (a start token first, end rows after the
    sketch). Sketches without strokes or without a paired photo are counted in ``skipped`` (with a
    reason) rather than silently dropped.
    """

    def __init__(self, sketches: ImageSet, photos: ImageSet, max_len: int = 80, epsilon: float = 2.0) -> None:
        from sbir.strokes import pad_stroke5, simplify_stroke3

        if not sketches.strokes:
            raise ValueError("Stroke5Dataset needs sketches loaded with with_strokes=True")
        pairs = pair_index(sketches, photos)
        keep, seqs = [], []
        self.skipped: dict[str, int] = {"no_strokes": 0, "no_photo": 0}
        for i, s3 in enumerate(sketches.strokes):
            if s3 is None:
                self.skipped["no_strokes"] += 1
            elif int(pairs[i]) < 0:
                self.skipped["no_photo"] += 1
            else:
                keep.append(i)
                seqs.append(simplify_stroke3(s3, epsilon) if epsilon > 0 else s3)
        padded, lengths = pad_stroke5(seqs, max_len) if seqs else (np.zeros((0, max_len + 1, 5), np.float32),
                                                                   np.zeros(0, np.int64))
        self.sequences = torch.from_numpy(np.asarray(padded, dtype=np.float32))
        self.lengths = torch.from_numpy(np.asarray(lengths, dtype=np.int64))
        self.photo_rows = pairs[torch.tensor(keep, dtype=torch.long)] if keep else torch.zeros(0, dtype=torch.long)
        self.photos = photos

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = int(self.photo_rows[i])
        return to_float_images(self.photos.images[p : p + 1])[0], self.sequences[i], self.lengths[i]


def fine_grained_pairs(sketches: ImageSet, photos: ImageSet, labelled_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sketch rows, photo rows) of the sketch-photo pairs.

    ``labelled_only``: only pairs whose photo is flagged ``labelled`` (the labelled share); otherwise
    every sketch whose ``photo_id`` is a photo of ``photos`` (the fully supervised upper bound).
    """
    pidx = pair_index(sketches, photos)
    keep = pidx >= 0
    if labelled_only:
        if photos.labelled is None:
            raise ValueError("photos carry no 'labelled' flag")
        keep &= photos.labelled[pidx.clamp_min(0)]
    s_rows = torch.nonzero(keep).flatten()
    return s_rows, pidx[s_rows]


def split_pairs(ds, split: str) -> tuple[ImageSet, ImageSet, torch.Tensor, torch.Tensor]:
    """(sketches and photos of ``split``, the rows of the sketches whose photo is in the split, their photo
    rows): the queries and true matches of fine-grained retrieval."""
    sketches = load_image_set(ds, "sketches", [split])
    photos = load_image_set(ds, "photos", [split])
    s_rows, p_rows = fine_grained_pairs(sketches, photos, labelled_only=False)
    return sketches, photos, s_rows, p_rows
