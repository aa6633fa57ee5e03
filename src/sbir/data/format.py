"""The project's on-disk dataset format: two Parquet tables and a manifest.

A prepared dataset is a folder holding

* ``photos.parquet``   id, class_name, label, split, labelled, image (PNG/JPEG bytes), height, width, source
* ``sketches.parquet`` id, photo_id (null when unpaired), class_name, label, split, strokes (stroke-3 list,
  null when the source has only a raster), image (PNG bytes), height, width, source
* ``manifest.json``    schema version, class list, counts per table/split/class, content checksum

Every stage reads it through :func:`open_dataset`, which checks the schema version, and streams row
groups (:meth:`PreparedDataset.iter_batches`) so a dataset larger than memory stays readable.
Writers go through :class:`DatasetWriter`, which writes into a temporary folder and renames it into
place on success, so a crashed ingest never leaves a half-written dataset behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

SCHEMA_VERSION = 1
PHOTOS_FILE = "photos.parquet"
SKETCHES_FILE = "sketches.parquet"
MANIFEST_FILE = "manifest.json"
TABLES = ("photos", "sketches")

STROKE3_TYPE = pa.list_(pa.list_(pa.float32(), 3))

PHOTO_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("class_name", pa.string()),
        ("label", pa.int32()),
        ("split", pa.string()),
        ("labelled", pa.bool_()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),
    ]
)

SKETCH_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("photo_id", pa.string()),
        ("class_name", pa.string()),
        ("label", pa.int32()),
        ("split", pa.string()),
        ("strokes", STROKE3_TYPE),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),
    ]
)

SCHEMAS = {"photos": PHOTO_SCHEMA, "sketches": SKETCH_SCHEMA}
FILES = {"photos": PHOTOS_FILE, "sketches": SKETCHES_FILE}


class DatasetFormatError(RuntimeError):
    """A prepared dataset is missing, incomplete or of another schema version."""


# --------------------------------------------------------------------------------------- images
def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxW or HxWx3 array -> PNG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, mode: str = "RGB", source: str = "<bytes>") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array (HxWx3 for RGB, HxW for L). Names ``source`` on failure."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert(mode))
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ValueError(f"{source}: cannot decode image ({exc})") from exc


# --------------------------------------------------------------------------------------- strokes
def strokes_to_arrow(strokes: Sequence[np.ndarray | None]) -> pa.Array:
    """A list of (N,3) stroke-3 arrays (or None) -> Arrow list<fixed_size_list<float32,3>>."""
    offsets = [0]
    valid = []
    chunks = []
    for s in strokes:
        if s is None:
            valid.append(False)
            offsets.append(offsets[-1])
            continue
        s = np.asarray(s, dtype=np.float32).reshape(-1, 3)
        valid.append(True)
        chunks.append(s.reshape(-1))
        offsets.append(offsets[-1] + len(s))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    points = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 3)
    mask = pa.array([not v for v in valid], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), points, mask=mask)


def strokes_from_arrow(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray | None]:
    """Inverse of :func:`strokes_to_arrow`."""
    if isinstance(column, pa.ChunkedArray):
        out: list[np.ndarray | None] = []
        for chunk in column.chunks:
            out.extend(strokes_from_arrow(chunk))
        return out
    offsets = column.offsets.to_numpy()
    flat = column.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 3)
    # ``values`` ignores a slice's offset while ``offsets`` index into the full values: no rebasing
    out = []
    for i in range(len(column)):
        if not column[i].is_valid:
            out.append(None)
        else:
            out.append(flat[offsets[i] : offsets[i + 1]].copy())
    return out


# --------------------------------------------------------------------------------------- records
@dataclass
class PhotoRow:
    id: str
    class_name: str
    label: int
    split: str
    image: bytes
    height: int
    width: int
    source: str = ""
    labelled: bool = False


@dataclass
class SketchRow:
    id: str
    class_name: str
    label: int
    split: str
    image: bytes
    height: int
    width: int
    strokes: np.ndarray | None = None
    photo_id: str | None = None
    source: str = ""


# --------------------------------------------------------------------------------------- writer
class DatasetWriter:
    """Streams photo and sketch rows into Parquet row groups and writes the manifest on close.

    Use as a context manager. Output goes to ``<out_dir>.tmp`` and is renamed to ``out_dir`` only
    when the block exits without an exception.
    """

    def __init__(self, out_dir: str | os.PathLike, class_names: Sequence[str], name: str = "dataset",
                 row_group_size: int = 2048, extra: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".tmp")
        self.class_names = list(class_names)
        self.name = name
        self.row_group_size = row_group_size
        self.extra = extra or {}
        self._buffers: dict[str, list] = {t: [] for t in TABLES}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._hash = {t: hashlib.sha256() for t in TABLES}
        self._counts: dict[str, dict[str, dict[str, int]]] = {
            t: defaultdict(lambda: defaultdict(int)) for t in TABLES
        }
        self._ids: dict[str, set[str]] = {t: set() for t in TABLES}
        self._labelled_photos = 0
        self._paired_sketches = 0

    def __enter__(self) -> "DatasetWriter":
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for w in self._writers.values():
                w.close()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            return
        self.close()

    def _check(self, table: str, row_id: str, label: int, class_name: str) -> None:
        if row_id in self._ids[table]:
            raise ValueError(f"duplicate {table[:-1]} id {row_id!r}")
        self._ids[table].add(row_id)
        if not 0 <= label < len(self.class_names) or self.class_names[label] != class_name:
            raise ValueError(f"{table[:-1]} {row_id!r}: label {label} does not match class {class_name!r}")

    def add_photo(self, row: PhotoRow) -> None:
        self._check("photos", row.id, row.label, row.class_name)
        self._counts["photos"][row.split][row.class_name] += 1
        self._labelled_photos += int(row.labelled)
        self._buffers["photos"].append(row)
        if len(self._buffers["photos"]) >= self.row_group_size:
            self._flush("photos")

    def add_sketch(self, row: SketchRow) -> None:
        self._check("sketches", row.id, row.label, row.class_name)
        self._counts["sketches"][row.split][row.class_name] += 1
        self._paired_sketches += int(row.photo_id is not None)
        self._buffers["sketches"].append(row)
        if len(self._buffers["sketches"]) >= self.row_group_size:
            self._flush("sketches")

    def _flush(self, table: str) -> None:
        rows = self._buffers[table]
        if not rows:
            return
        schema = SCHEMAS[table]
        cols: dict[str, Any] = {}
        for field in schema:
            if field.name == "strokes":
                cols["strokes"] = strokes_to_arrow([r.strokes for r in rows])
            else:
                cols[field.name] = pa.array([getattr(r, field.name) for r in rows], field.type)
        batch = pa.RecordBatch.from_pydict(cols, schema=schema)
        h = self._hash[table]
        for r in rows:  # content checksum: order-sensitive, independent of row-group size
            h.update(r.id.encode())
            h.update(r.image)
            if table == "sketches" and r.strokes is not None:
                h.update(np.ascontiguousarray(r.strokes, dtype=np.float32).tobytes())
            h.update(f"{r.label}|{r.split}|{getattr(r, 'photo_id', None)}|{getattr(r, 'labelled', None)}".encode())
        if table not in self._writers:
            self._writers[table] = pq.ParquetWriter(self.tmp_dir / FILES[table], schema, compression="zstd")
        self._writers[table].write_batch(batch)
        self._buffers[table] = []

    def close(self) -> dict[str, Any]:
        for t in TABLES:
            self._flush(t)
            if t not in self._writers:  # an empty table still gets a valid file
                pq.write_table(SCHEMAS[t].empty_table(), self.tmp_dir / FILES[t])
            else:
                self._writers[t].close()
        checksum = hashlib.sha256()
        for t in TABLES:
            checksum.update(self._hash[t].digest())
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "class_names": self.class_names,
            "counts": {t: {s: dict(sorted(c.items())) for s, c in sorted(self._counts[t].items())} for t in TABLES},
            "totals": {t: len(self._ids[t]) for t in TABLES},
            "labelled_photos": self._labelled_photos,
            "paired_sketches": self._paired_sketches,
            "checksum": checksum.hexdigest(),
            **self.extra,
        }
        (self.tmp_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return manifest


# --------------------------------------------------------------------------------------- reader
class PreparedDataset:
    """Read access to a prepared dataset folder (see module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_FILE
        if not self.root.is_dir():
            raise DatasetFormatError(f"dataset folder {self.root} does not exist (run the prepare/ingest stage first)")
        if not manifest_path.is_file():
            raise DatasetFormatError(f"{manifest_path} is missing: {self.root} is not a prepared dataset")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{manifest_path}: not valid JSON ({exc})") from exc
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetFormatError(
                f"{manifest_path}: schema version {version!r}, this code reads version {SCHEMA_VERSION}; "
                "re-run prepare/ingest with this version of sbir"
            )
        for t in TABLES:
            if not (self.root / FILES[t]).is_file():
                raise DatasetFormatError(f"{self.root / FILES[t]} is missing")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def checksum(self) -> str:
        return str(self.manifest["checksum"])

    def path(self, table: str) -> Path:
        if table not in FILES:
            raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
        return self.root / FILES[table]

    def iter_batches(self, table: str, columns: Sequence[str] | None = None, batch_size: int = 1024,
                     splits: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream record batches (one row group at a time in memory), optionally keeping some splits."""
        pf = pq.ParquetFile(self.path(table))
        wanted = list(columns) if columns is not None else None
        if wanted is not None and splits is not None and "split" not in wanted:
            wanted = wanted + ["split"]
        for batch in pf.iter_batches(batch_size=batch_size, columns=wanted):
            if splits is not None:
                mask = pc.is_in(batch.column("split"), value_set=pa.array(list(splits)))
                batch = batch.filter(mask)
                if columns is not None and "split" not in columns:
                    batch = batch.drop_columns(["split"])
            if batch.num_rows:
                yield batch

    def read(self, table: str, columns: Sequence[str] | None = None,
             splits: Sequence[str] | None = None) -> pa.Table:
        """Read the selected rows into memory (streamed, filtered per batch)."""
        batches = list(self.iter_batches(table, columns=columns, splits=splits))
        if batches:
            return pa.Table.from_batches(batches)
        schema = SCHEMAS[table]
        names = list(columns) if columns is not None else schema.names
        return pa.schema([schema.field(n) for n in names]).empty_table()


def open_dataset(root: str | os.PathLike) -> PreparedDataset:
    """Open and validate a prepared dataset folder."""
    return PreparedDataset(root)
