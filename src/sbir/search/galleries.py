"""Photo galleries: a folder of photos (recursive) or the splits of a prepared dataset, streamed in batches."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from sbir.search.errors import SearchError

PHOTO_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class GalleryBatch:
    ids: list[str]
    labels: list[int | None]
    class_names: list[str | None]
    images: list[np.ndarray]  # uint8 HxWx3, any size


class Gallery:
    """A source of photos: :meth:`batches` streams them, :meth:`fetch` reads a few by id."""

    path: Path
    kind: str
    skipped: list[str]  # "<where>: <why>" for every photo that could not be read (filled while streaming)

    def identity(self) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[GalleryBatch]:
        raise NotImplementedError

    def fetch(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class FolderGallery(Gallery):
    """Every .jpg/.jpeg/.png under ``root`` (recursive, hidden files skipped), in sorted order; the id
    is the path relative to ``root``; the class is the first folder of that path when there is one."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.path, self.kind, self.skipped = Path(root), "folder", []
        files, self.ignored = [], 0
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.startswith("."):
                    continue
                if f.lower().endswith(PHOTO_EXTS):
                    files.append(Path(dirpath) / f)
                else:
                    self.ignored += 1  # counted and reported, never silently dropped
        self.files = sorted(files, key=lambda f: f.relative_to(self.path).as_posix())
        self.rel = [f.relative_to(self.path).as_posix() for f in self.files]
        self._identity: str | None = None

    def identity(self) -> str:
        # paths, sizes and modification times: hashing a million photos' bytes would cost more than
        # embedding them; a replaced or edited file changes its size or mtime
        if self._identity is None:
            h = hashlib.sha256()
            for f, r in zip(self.files, self.rel):
                st = f.stat()
                h.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            self._identity = f"folder:{h.hexdigest()}"
        return self._identity

    def __len__(self) -> int:
        return len(self.files)

    def _class(self, rel: str) -> str | None:
        parts = rel.split("/")
        return parts[0] if len(parts) > 1 else None

    def _decode(self, f: Path) -> np.ndarray:
        from sbir.data.format import decode_image

        try:
            data = f.read_bytes()
        except OSError as exc:
            raise ValueError(f"{f}: cannot read ({exc})") from exc
        return decode_image(data, "RGB", source=str(f))

    def batches(self, batch_size: int) -> Iterator[GalleryBatch]:
        for s in range(0, len(self.files), batch_size):
            b = GalleryBatch([], [], [], [])
            for f, r in zip(self.files[s : s + batch_size], self.rel[s : s + batch_size]):
                try:
                    img = self._decode(f)
                except ValueError as exc:
                    self.skipped.append(str(exc))
                    continue
                b.ids.append(r)
                b.labels.append(None)
                b.class_names.append(self._class(r))
                b.images.append(img)
            yield b

    def fetch(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self._decode(self.path / i) for i in ids}


class DatasetGallery(Gallery):
    """The photos of some splits of a prepared dataset (default: the test split), streamed by row group."""

    def __init__(self, root: str | os.PathLike, splits: Sequence[str] = ("test",)) -> None:
        from sbir.data.format import open_dataset

        self.ds = open_dataset(root)
        self.path, self.kind, self.skipped = Path(root), "dataset", []
        counts = self.ds.manifest.get("counts", {}).get("photos", {})
        self.splits = list(splits)
        unknown = [s for s in self.splits if s not in counts]
        if unknown:
            raise SearchError(f"{self.path}: no photos in split(s) {unknown}; the dataset has {sorted(counts)}")
        self.count = sum(sum(counts[s].values()) for s in self.splits)

    def identity(self) -> str:
        return f"dataset:{self.ds.checksum}:{','.join(self.splits)}"

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[GalleryBatch]:
        from sbir.data.format import decode_image

        src = self.ds.path("photos")
        for batch in self.ds.iter_batches("photos", columns=["id", "label", "class_name", "image"],
                                          batch_size=batch_size, splits=self.splits):
            d = batch.to_pydict()
            b = GalleryBatch([], [], [], [])
            for i, data in enumerate(d["image"]):
                try:
                    img = decode_image(data, "RGB", source=f"{src} row id={d['id'][i]}")
                except ValueError as exc:
                    self.skipped.append(str(exc))
                    continue
                b.ids.append(d["id"][i])
                b.labels.append(d["label"][i])
                b.class_names.append(d["class_name"][i])
                b.images.append(img)
            yield b

    def fetch(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        from sbir.data.format import decode_image

        want = pa.array(list(ids), pa.string())
        out: dict[str, np.ndarray] = {}
        for batch in self.ds.iter_batches("photos", columns=["id", "image"], splits=self.splits):
            batch = batch.filter(pc.is_in(batch.column("id"), value_set=want))
            for i, data in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist()):
                out[i] = decode_image(data, "RGB", source=f"{self.ds.path('photos')} row id={i}")
        return out


def open_gallery(path: str | os.PathLike, splits: Sequence[str] = ("test",)) -> Gallery:
    """A prepared dataset folder (has ``manifest.json``) or a folder of photos."""
    p = Path(path)
    if not p.is_dir():
        raise SearchError(f"gallery {p} is not a folder (expected a folder of photos or a prepared dataset)")
    if (p / "manifest.json").is_file():
        g: Gallery = DatasetGallery(p, splits)
    else:
        g = FolderGallery(p)
    if len(g) == 0:
        extra = f" ({g.ignored} other files ignored)" if isinstance(g, FolderGallery) and g.ignored else ""
        raise SearchError(f"gallery {p} is empty: no {'photos in the chosen split' if g.kind == 'dataset' else '.jpg/.png files'}{extra}")
    return g


def to_batch_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 arrays of any sizes -> float (N,3,size,size) in [0,1] with the model-side resize."""
    from sbir.models.backbones import resize, to_float

    if len({im.shape for im in images}) == 1:
        return resize(to_float(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)), size)
    return torch.cat([resize(to_float(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]), size) for im in images])
