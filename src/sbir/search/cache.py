"""The Parquet embedding cache of a gallery: its key, file name, reader and streaming writer."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sbir.config import params_hash
from sbir.search.encoders import SearchEncoder
from sbir.search.errors import SearchError

CACHE_VERSION = 2  # 2: embeddings as fixed-size binary (1 stored a fixed-size list)
CACHE_META_KEY = b"sbir.search"
# rows per Parquet row group of a cache file: Arrow reads a whole row group at a time, and its
# allocator keeps a few of them, so this bounds the reader's memory (measured at 10^6 x 64: the
# reader's pool peaked at 64 MB with 65536-row groups)
CACHE_ROW_GROUP = 16384


def default_cache_dir() -> Path:
    """``$SBIR_SEARCH_CACHE``, else ``$XDG_CACHE_HOME/sbir/search`` (``~/.cache/sbir/search``).

    Not inside the gallery: a prepared dataset is a DVC output (new files there would change its
    hash) and a photo folder may be read-only or someone else's."""
    env = os.environ.get("SBIR_SEARCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sbir" / "search"


def cache_key(encoder: SearchEncoder, gallery_identity: str) -> dict[str, Any]:
    """What a cache file must have been made with to be reused."""
    return {"version": CACHE_VERSION, "checkpoint_sha256": encoder.checkpoint_sha256, "model": encoder.name,
            "image_size": encoder.image_size, "gallery": gallery_identity}


def cache_filename(key: dict[str, Any], gallery_path: Path) -> str:
    digest = params_hash(key)  # the project's short stable hash of plain data
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in gallery_path.resolve().name)[:40]
    return f"{slug}-{key['model']}-{digest}.parquet"


class EmbeddingCache:
    """A Parquet file of gallery embeddings: columns ``id``, ``label``, ``class_name``, ``embedding``
    and the JSON footer metadata ``sbir.search`` (the cache key, count, dim, skipped photos). Read
    back one batch of rows at a time.

    ``embedding`` is a fixed-size binary of ``dim`` little-endian float32 (L2-normalised): Parquet
    stores a fixed-size *list* with repetition/definition levels per float, which made streaming 10^6
    x 64 embeddings 7x slower (0.73 s vs 0.11 s measured here); the binary column reads as one
    contiguous buffer that numpy and torch view without a copy."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._pf = pq.ParquetFile(self.path)
        except Exception as exc:  # ArrowInvalid / OSError
            raise SearchError(f"{self.path}: not a readable Parquet file ({exc})") from exc
        raw = (self._pf.metadata.metadata or {}).get(CACHE_META_KEY)
        names = set(self._pf.schema_arrow.names)
        if raw is None or not {"id", "embedding"} <= names:
            raise SearchError(f"{self.path}: not an sbir search embedding cache (no '{CACHE_META_KEY.decode()}' "
                              f"metadata or embedding column)")
        self.meta: dict[str, Any] = json.loads(raw)
        self.dim = int(self.meta["dim"])
        if self._pf.schema_arrow.field("embedding").type != pa.binary(self.dim * 4):
            raise SearchError(f"{self.path}: embedding column is {self._pf.schema_arrow.field('embedding').type}, "
                              f"expected fixed_size_binary[{self.dim * 4}] (made by another version of sbir search?)")
        if self._pf.metadata.num_rows != int(self.meta["count"]):
            raise SearchError(f"{self.path}: holds {self._pf.metadata.num_rows} rows, its metadata says "
                              f"{self.meta['count']} (a truncated file?)")

    def __len__(self) -> int:
        return int(self.meta["count"])

    def key(self) -> dict[str, Any]:
        return {k: self.meta.get(k) for k in ("version", "checkpoint_sha256", "model", "image_size", "gallery")}

    def iter_chunks(self, rows: int = CACHE_ROW_GROUP, copy: bool = False) -> Iterator[torch.Tensor]:
        """(n, D) float32 tensors in row order, ``rows`` at a time (only one chunk in memory).

        Without ``copy`` the tensors are read-only views of Arrow's buffers (torch cannot mark them
        read-only): do not write into them (``topk_cosine`` does not)."""
        import warnings

        width = self.dim * 4
        for batch in self._pf.iter_batches(batch_size=rows, columns=["embedding"]):
            col = batch.column(0)
            arr = np.frombuffer(col.buffers()[1], dtype="<f4", count=len(col) * self.dim,
                                offset=col.offset * width).reshape(-1, self.dim)
            if copy:
                yield torch.from_numpy(arr.copy())
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                yield torch.from_numpy(arr)

    def read_all(self) -> torch.Tensor:
        return torch.cat(list(self.iter_chunks(copy=True))) if len(self) else torch.zeros((0, self.dim))

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """id / label / class_name of some rows, reading only the row groups that hold them."""
        md = self._pf.metadata
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        found: dict[int, dict[str, Any]] = {}
        want = sorted(set(int(i) for i in indices))
        groups = sorted({int(np.searchsorted(starts, i, side="right") - 1) for i in want})
        cols = [c for c in ("id", "label", "class_name") if c in self._pf.schema_arrow.names]
        for g in groups:
            t = self._pf.read_row_group(g, columns=cols).to_pydict()
            for i in want:
                if starts[g] <= i < starts[g + 1]:
                    found[i] = {c: t[c][i - starts[g]] for c in cols}
        return [found[int(i)] for i in indices]


class CacheWriter:
    """Streams (ids, labels, class names, embeddings) into a cache file; atomic (tmp -> rename)."""

    def __init__(self, path: str | os.PathLike, dim: int, meta: dict[str, Any],
                 row_group_size: int = CACHE_ROW_GROUP) -> None:
        self.path, self.dim, self.meta = Path(path), int(dim), dict(meta)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.schema = pa.schema([("id", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
                                 ("embedding", pa.binary(self.dim * 4))])
        self.row_group_size = row_group_size
        self.count = 0
        self._buf: list[pa.RecordBatch] = []
        self._buf_rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # embeddings are noise to a compressor; ids and classes compress well
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression={
            "id": "zstd", "label": "zstd", "class_name": "zstd", "embedding": "none"},
            use_dictionary=["id", "class_name"])

    def add(self, ids: Sequence[str], labels: Sequence[int | None], class_names: Sequence[str | None],
            embeddings: torch.Tensor | np.ndarray) -> None:
        emb = np.ascontiguousarray(torch.as_tensor(embeddings).float().numpy(), dtype="<f4")
        if emb.ndim != 2 or emb.shape[1] != self.dim or emb.shape[0] != len(ids):
            raise ValueError(f"embeddings {emb.shape} do not match {len(ids)} ids of dim {self.dim}")
        col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.dim * 4), len(emb), [None, pa.py_buffer(emb.tobytes())])
        batch = pa.RecordBatch.from_arrays([pa.array(list(ids), pa.string()), pa.array(list(labels), pa.int32()),
                                            pa.array(list(class_names), pa.string()), col], schema=self.schema)
        self._buf.append(batch)
        self._buf_rows += batch.num_rows
        self.count += batch.num_rows
        if self._buf_rows >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_table(pa.Table.from_batches(self._buf, self.schema),
                                     row_group_size=self.row_group_size)
        self._buf, self._buf_rows = [], 0

    def close(self) -> EmbeddingCache:
        self._flush()
        # the key, count and skips go into the file footer's key-value metadata, known only now
        meta = {**self.meta, "count": self.count, "dim": self.dim}
        self._writer.add_key_value_metadata({CACHE_META_KEY.decode(): json.dumps(meta)})
        self._writer.close()
        os.replace(self.tmp, self.path)
        return EmbeddingCache(self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)
