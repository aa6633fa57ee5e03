"""Sketch -> photo search with the trained encoders (``sbir search``; also ``python -m sbir.search``).

Pieces (each importable on its own):

* :func:`load_encoder` opens a checkpoint the pipeline wrote: the category-level students
  (``outputs/distill/students.pt``, ``outputs/upper_bound/students.pt``), the teachers
  (``outputs/teacher_pretrain/teachers.pt``, model ``classifier_only``: each teacher's class
  probabilities, the evaluate stage's baseline) or the fine-grained F models
  (``outputs/fgsbir_joint/checkpoints/<variant>.pt``, or the folder plus ``model=<variant>``).
  Loading goes through the stages' own loaders (``load_students``, ``load_teachers``,
  ``load_retrieval_checkpoint``) and images are resized to the model's image size with the same
  ``to_float`` + ``resize`` as the evaluate stages.
* :func:`load_query` reads one sketch: a raster (PNG/JPEG), an SVG, one Quick Draw ndjson line or a
  stroke-3 ``.npy``. Vector inputs are converted and rasterised with the project's own code
  (:mod:`sbir.data.svg`, the Quick Draw parser of :mod:`sbir.data.ingest`, :func:`sbir.strokes.rasterise`)
  at the gallery dataset's sketch size, line width and padding (:func:`render_spec_for`), so a
  query looks like the training sketches.
* :func:`open_gallery`: a folder of photos (recursive, jpg/png) or a prepared dataset's split.
* :func:`embed_gallery` embeds a gallery once into a Parquet cache keyed by the checkpoint's content
  hash, the model name, the image size and the gallery's identity (:class:`EmbeddingCache`).
* :func:`topk_cosine`: exact cosine top-k over a gallery given as a tensor or as a stream of chunks
  (a cache file is read one batch of rows at a time), keeping a running top-k, so memory stays
  bounded by a few blocks (``max_elements``, ``block_rows``) whatever the gallery size.
* :func:`search` ties them together; :func:`save_grid` draws the query and its top-k with scores.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from sbir.config import params_hash

CACHE_VERSION = 2  # 2: embeddings as fixed-size binary (1 stored a fixed-size list)
CACHE_META_KEY = b"sbir.search"
PHOTO_EXTS = (".jpg", ".jpeg", ".png")
RASTER_QUERY_EXTS = (".png", ".jpg", ".jpeg")
NDJSON_EXTS = (".ndjson", ".jsonl", ".json")
DEFAULT_MAX_ELEMENTS = 1 << 20  # similarity entries per step (4 MB of float32)
DEFAULT_BLOCK_ROWS = 16384  # gallery rows per step at most (4 MB of float32 at dim 64)
# rows per Parquet row group of a cache file: Arrow reads a whole row group at a time, and its
# allocator keeps a few of them, so this bounds the reader's memory (measured at 10^6 x 64: the
# reader's pool peaked at 64 MB with 65536-row groups)
CACHE_ROW_GROUP = 16384


class SearchError(ValueError):
    """Bad input to the search (unreadable query, empty gallery, missing or unknown checkpoint...)."""


class CacheMismatchError(SearchError):
    """An explicitly given cache file was made by another checkpoint/model/gallery."""


# ============================================================================ top-k
def _chunks_of(gallery: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray]
               ) -> Iterator[torch.Tensor]:
    if isinstance(gallery, np.ndarray):
        gallery = torch.from_numpy(gallery)
    if isinstance(gallery, torch.Tensor):
        if gallery.ndim != 2:
            raise SearchError(f"gallery embeddings must be 2-D (N, D), got shape {tuple(gallery.shape)}")
        yield gallery
        return
    for chunk in gallery:
        yield torch.from_numpy(chunk) if isinstance(chunk, np.ndarray) else chunk


def _sorted_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``sims`` (Q, C), descending, equal scores in ascending column order.

    ``torch.topk`` picks arbitrarily among equal values at the k-th place, so rows where the k-th
    and (k+1)-th values tie fall back to a stable full sort (rare with real embeddings)."""
    c = sims.shape[1]
    kk = min(k + 1, c)
    vals, idx = sims.topk(kk, dim=1, largest=True, sorted=True)
    if kk > k:
        tied = vals[:, k - 1] == vals[:, k]
        if bool(tied.any()):
            rows = torch.nonzero(tied).flatten()
            sv, si = torch.sort(sims[rows], dim=1, descending=True, stable=True)
            vals[rows], idx[rows] = sv[:, :kk], si[:, :kk]
        vals, idx = vals[:, :k], idx[:, :k]
    # order equal scores by index: sort by index, then a stable sort by score
    order = idx.argsort(dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


# Why not faiss (installed, and used as the reference in tests and the benchmark): IndexFlatIP keeps
# its own copy of the whole gallery in RAM (+245 MB at 10^6 x 64, measured) and cannot stream it from
# a Parquet file; exact search over streamed blocks needs only torch.topk and a merge.
@torch.no_grad()
def topk_cosine(queries: torch.Tensor | np.ndarray,
                gallery: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
                k: int, *, max_elements: int = DEFAULT_MAX_ELEMENTS, block_rows: int = DEFAULT_BLOCK_ROWS,
                normalize: bool = True, gallery_is_unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k of every query over a gallery, streamed.

    ``gallery`` is an (N, D) tensor/array or an iterable of (n_i, D) chunks in gallery order (e.g.
    :meth:`EmbeddingCache.iter_chunks`). Each chunk is cut into blocks of at most
    ``min(block_rows, max_elements // Q)`` rows, the (Q, block) similarity block is reduced to its
    top-k and merged with the running top-k, so no Q x N matrix is ever formed and the working memory
    is a few blocks whatever N (the normalised copy of a block, its similarities, the top-k). Returns ``(scores, indices)``, both
    (Q, min(k, N)), scores descending; equal scores are ordered by gallery index (so the result is
    deterministic). ``normalize`` L2-normalises queries and gallery rows (cosine); pass False for
    plain inner products. ``gallery_is_unit`` skips normalising the gallery rows when they are known
    to be unit length (an :class:`EmbeddingCache`): at one query that normalisation (a pass over
    every gallery row) costs about 10x the similarity itself.
    """
    q = torch.as_tensor(queries).float()
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[0] == 0:
        raise SearchError(f"queries must be a non-empty (Q, D) array, got shape {tuple(q.shape)}")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    if normalize:
        q = F.normalize(q, dim=1)
    nq, dim = q.shape
    step = max(1, min(int(block_rows), int(max_elements) // nq))
    # work on the queries' device: a CUDA query tensor searches a CPU/streamed gallery block by block
    best_v = torch.empty((nq, 0), dtype=torch.float32, device=q.device)
    best_i = torch.empty((nq, 0), dtype=torch.long, device=q.device)
    offset = 0
    for chunk in _chunks_of(gallery):
        if chunk.ndim != 2 or chunk.shape[1] != dim:
            raise SearchError(f"gallery chunk of shape {tuple(chunk.shape)} does not match query dim {dim}")
        for s in range(0, chunk.shape[0], step):
            block = chunk[s : s + step].to(q.device).float()
            if normalize and not gallery_is_unit:
                block = F.normalize(block, dim=1)
            sims = q @ block.T
            v, i = _sorted_topk(sims, min(k, block.shape[0]))
            # running entries come from earlier rows: concatenating them first keeps index order
            # among equal scores through the stable sort
            cat_v = torch.cat([best_v, v], dim=1)
            cat_i = torch.cat([best_i, i + offset], dim=1)
            order = torch.sort(cat_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = cat_v.gather(1, order), cat_i.gather(1, order)
            offset += block.shape[0]
    if offset == 0:
        raise SearchError("the gallery is empty (no embeddings to search)")
    return best_v, best_i


# ============================================================================ encoders
@dataclass
class SearchEncoder:
    """A photo encoder and a sketch encoder embedding into one space, with what they expect."""

    name: str                      # model name (a variant, "students", "classifier_only")
    kind: str                      # "students" | "fine_grained" | "classifier_only"
    checkpoint: Path
    checkpoint_sha256: str
    image_size: int                # inputs are resized to this side before the encoders
    embed_dim: int
    photo_fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    sketch_fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)

    @torch.no_grad()
    def embed_photos(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) photos of one size -> float (N, D), L2-normalised."""
        return self._embed(self.photo_fn, images)

    @torch.no_grad()
    def embed_sketches(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,1|3,H,W) sketches (black ink on white) -> float (N, D), L2-normalised."""
        return self._embed(self.sketch_fn, images)

    def _embed(self, fn, images: torch.Tensor) -> torch.Tensor:
        from sbir.models.backbones import resize, to_float

        if len(images) == 0:
            return torch.zeros((0, self.embed_dim))
        x = resize(to_float(images), self.image_size)  # exactly as the evaluate stages feed the models
        return F.normalize(fn(x).float(), dim=1)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file (streamed; remembered per path, size and mtime within the process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle / zip errors of several types
        raise SearchError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict):
        raise SearchError(f"{path}: not a checkpoint of this project (a {type(blob).__name__}, expected a dict)")
    return blob


def _checkpoint_kind(blob: dict[str, Any]) -> str | None:
    if "students" in blob and "params" in blob:
        return "students"
    if "model" in blob and "arch" in blob:
        return "fine_grained"
    if "model" in blob and "num_classes" in blob and "params" in blob:  # teacher_pretrain's teachers.pt
        return "classifier_only"
    return None


def list_models(checkpoint: str | os.PathLike) -> dict[str, Path]:
    """Model names a checkpoint file or folder offers -> the file holding each.

    A students file offers ``students``, a teachers file ``classifier_only``, an F checkpoint its
    variant; a folder (e.g. ``outputs/fgsbir_joint/checkpoints``) offers every model of its ``*.pt``
    files (the generator/discriminator file is skipped: it embeds nothing)."""
    path = Path(checkpoint)
    if not path.exists():
        raise SearchError(f"checkpoint {path} not found (run the pipeline first, or pass --checkpoint)")
    if path.is_dir():
        out: dict[str, Path] = {}
        for f in sorted(path.glob("*.pt")):
            if f.stem.endswith("discriminator"):
                continue
            for name in list_models(f):
                out.setdefault(name, f)
        if not out:
            raise SearchError(f"{path}: no model checkpoint (*.pt) in this folder")
        return out
    blob = _torch_load(path)
    kind = _checkpoint_kind(blob)
    if kind is None:
        raise SearchError(f"{path}: not a students, teachers or fine-grained checkpoint (keys {sorted(blob)[:8]})")
    name = {"students": "students", "classifier_only": "classifier_only"}.get(kind) or str(blob.get("variant", path.stem))
    return {name: path}


def _preferred(models: dict[str, Path]) -> str | None:
    from sbir.fgsbir.evaluate import ORDER

    for name in ("semi", *ORDER, "students"):
        if name in models:
            return name
    return None


def _teachers_image_size(students_path: Path) -> int | None:
    """The students see images at their teachers' size (distill reads it from teachers.pt); the
    students file does not record it, so look for the pipeline's teachers next to it."""
    cand = students_path.resolve().parent.parent / "teacher_pretrain" / "teachers.pt"
    if not cand.is_file():
        return None
    blob = _torch_load(cand)
    size = (blob.get("params") or {}).get("image_size")
    return int(size) if size else None


def load_encoder(checkpoint: str | os.PathLike, model: str | None = None,
                 image_size: int | None = None) -> SearchEncoder:
    """Open a checkpoint (file or folder) and return the chosen model's encoders (eval mode).

    ``model`` picks one of :func:`list_models`; it may be left out when there is one (or, for a
    folder of F checkpoints, the headline ``semi`` model is used). ``image_size`` overrides the
    model's input size (needed only for a students file without the pipeline's teachers.pt two
    folders up)."""
    path = Path(checkpoint)
    models = list_models(path)
    if model is None:
        if len(models) == 1:
            model = next(iter(models))
        else:
            model = _preferred(models)
            if model is None:
                raise SearchError(f"{path} holds several models ({', '.join(models)}): choose one with --model")
    if model not in models:
        raise SearchError(f"{path} has no model {model!r}; it offers: {', '.join(models)}")
    file = models[model]
    blob = _torch_load(file)
    kind = _checkpoint_kind(blob)
    sha = file_sha256(file)
    if kind == "students":
        from sbir.dfsbir.distill import load_students

        pair, blob = load_students(str(file))
        size = image_size or _teachers_image_size(file)
        if size is None:
            raise SearchError(f"{file}: a students file does not record its input size and no "
                              f"teacher_pretrain/teachers.pt was found beside its folder: pass --image-size")
        dim = int(blob["params"]["student"]["embed_dim"])
        return SearchEncoder(model, kind, file, sha, int(size), dim, pair.photo_encoder, pair.sketch_encoder)
    if kind == "fine_grained":
        from sbir.fgsbir.joint import load_retrieval_checkpoint

        pair, blob = load_retrieval_checkpoint(file)
        size = image_size or blob["arch"].get("image_size")
        if not size:
            raise SearchError(f"{file}: the checkpoint records no image size: pass --image-size")
        return SearchEncoder(model, kind, file, sha, int(size), int(blob["arch"]["embed_dim"]),
                             pair.photo_encoder, pair.sketch_encoder)
    from sbir.dfsbir.teacher import load_teachers

    teachers, blob = load_teachers(str(file))
    size = image_size or int(blob["params"]["image_size"])
    # the evaluate stage's classifier-only baseline: class probabilities as the shared space
    return SearchEncoder(model, "classifier_only", file, sha, int(size), int(blob["num_classes"]),
                         lambda x: teachers.photo_teacher(x).softmax(1),
                         lambda x: teachers.sketch_teacher(x).softmax(1))


# ============================================================================ queries
@dataclass
class RenderSpec:
    """How vector sketches are rasterised: the gallery dataset's sketch size, line width, padding."""

    size: int = 32
    line_width: float = 1.0
    padding: float = 0.1            # sbir.strokes.rasterise's default (the synthetic data uses it)
    svg_simplify_eps: float = 0.5   # RDP epsilon the TU-Berlin ingest applies to SVG strokes


def render_spec_for(dataset_dir: str | os.PathLike | None, fallback_size: int) -> RenderSpec:
    """The rendering a prepared dataset's sketches were made with (from its manifest), else defaults
    at ``fallback_size`` (the model's image size)."""
    spec = RenderSpec(size=int(fallback_size))
    if dataset_dir is None:
        return spec
    from sbir.data.format import open_dataset

    ds = open_dataset(dataset_dir)
    m = ds.manifest
    opts = (m.get("ingest") or {}).get("options") or {}
    cfg = m.get("config") or {}
    if opts:  # real data written by sbir.data.ingest
        spec.size = int(opts.get("image_size", spec.size))
        spec.line_width = float(opts.get("line_width", spec.line_width))
        spec.padding = float(opts.get("padding", spec.padding))
        if opts.get("simplify_eps") is not None:
            spec.svg_simplify_eps = float(opts["simplify_eps"])
    elif cfg:  # the embedded synthetic dataset
        spec.size = int(cfg.get("sketch_size", spec.size))
        spec.line_width = float(cfg.get("line_width", spec.line_width))
    else:  # no record: the size of the stored sketches
        for batch in ds.iter_batches("sketches", columns=["height"], batch_size=1):
            spec.size = int(batch.column("height")[0].as_py())
            break
    return spec


@dataclass
class Query:
    """One sketch query: where it came from and its raster (uint8 (1, H, W), black ink on white)."""

    name: str
    kind: str                        # "raster" | "svg" | "ndjson" | "stroke3"
    image: torch.Tensor
    strokes: np.ndarray | None = None


def _render(s3: np.ndarray, render: RenderSpec) -> torch.Tensor:
    from sbir.strokes import rasterise, render_to_uint8_rgb

    ink = rasterise([s3], size=render.size, line_width=render.line_width, padding=render.padding)
    # the same ink -> grey conversion as the ingest and synthetic writers
    return torch.from_numpy(np.ascontiguousarray(render_to_uint8_rgb(ink)[0, :, :, 0]))[None]


def _ndjson_record(path: Path, line: int | None) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SearchError(f"{path}: cannot read ({exc})") from exc
    lines = raw.splitlines()
    if line is None:
        nonblank = [i for i, l in enumerate(lines) if l.strip()]
        if len(nonblank) != 1:
            raise SearchError(f"{path}: holds {len(nonblank)} non-blank lines; pick one with --ndjson-line N "
                              f"(1-based)")
        line = nonblank[0] + 1
    if not 1 <= line <= len(lines):
        raise SearchError(f"{path}: has {len(lines)} lines, no line {line}")
    where = f"{path}:{line}"
    try:
        rec = json.loads(lines[line - 1])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SearchError(f"{where}: malformed ndjson line ({exc})") from exc
    if not isinstance(rec, dict) or "drawing" not in rec:
        raise SearchError(f"{where}: not a Quick Draw record (no 'drawing' field)")
    return rec, where


def load_query(path: str | os.PathLike, render: RenderSpec | None = None,
               ndjson_line: int | None = None) -> Query:
    """Read a sketch query by its extension: PNG/JPEG raster, SVG, Quick Draw ndjson line (a file of
    one line, or line ``ndjson_line`` (1-based) of a bigger file) or a stroke-3 ``.npy`` (N, 3).
    Vector sketches are rasterised with ``render``. Errors name the file and the problem."""
    try:
        return _load_query(Path(path), render or RenderSpec(), ndjson_line)
    except SearchError:
        raise
    except ValueError as exc:  # the stroke validators name the source in their message
        raise SearchError(str(exc)) from exc


def _load_query(p: Path, render: RenderSpec, ndjson_line: int | None) -> Query:
    from sbir.strokes import polylines_to_stroke3, simplify_stroke3, validate_stroke3

    if not p.is_file():
        raise SearchError(f"query {p} not found")
    ext = p.suffix.lower()
    if ext in RASTER_QUERY_EXTS:
        from PIL import Image

        from sbir.data.ingest import _to_grey  # the ingest's alpha-on-white greyscale conversion

        try:
            with Image.open(p) as img:
                img.load()
                grey = _to_grey(img)
        except Exception as exc:  # PIL raises several types for corrupt files
            raise SearchError(f"{p}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        return Query(str(p), "raster", torch.from_numpy(np.array(grey, dtype=np.uint8))[None])
    if ext == ".svg":
        from sbir.data.svg import SvgError, svg_to_polylines

        try:
            sk = svg_to_polylines(p)
        except SvgError as exc:
            raise SearchError(str(exc)) from exc
        s3 = validate_stroke3(polylines_to_stroke3(sk.polylines), str(p))
        if render.svg_simplify_eps > 0:
            s3 = np.asarray(simplify_stroke3(s3, render.svg_simplify_eps), dtype=np.float32)
        return Query(str(p), "svg", _render(s3, render), s3)
    if ext in NDJSON_EXTS:
        from sbir.data.ingest import _qd_drawing_to_stroke3  # the Quick Draw ingest's parser

        rec, where = _ndjson_record(p, ndjson_line)
        try:
            s3 = _qd_drawing_to_stroke3(rec["drawing"])
        except ValueError as exc:
            msg = "drawing has no points" if str(exc) == "empty" else str(exc)
            raise SearchError(f"{where}: {msg}") from exc
        s3 = validate_stroke3(s3, where)
        return Query(where if ndjson_line else str(p), "ndjson", _render(s3, render), s3)
    if ext == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:  # ValueError / OSError / UnpicklingError for bad files
            raise SearchError(f"{p}: cannot read the .npy array ({type(exc).__name__}: {exc})") from exc
        try:
            s3 = validate_stroke3(arr, str(p))
        except ValueError as exc:
            raise SearchError(str(exc)) from exc
        return Query(str(p), "stroke3", _render(s3, render), s3)
    raise SearchError(f"{p}: unknown query type {ext!r}; expected .png/.jpg (raster), .svg, "
                      f".ndjson/.jsonl/.json (Quick Draw) or .npy (stroke-3 array)")


def embed_queries(encoder: SearchEncoder, queries: Sequence[Query]) -> torch.Tensor:
    """(Q, D) sketch embeddings; each query is resized to the model's size on its own."""
    if not queries:
        raise SearchError("no queries")
    return torch.cat([encoder.embed_sketches(q.image[None]) for q in queries])


# ============================================================================ galleries
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


def _to_batch_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 arrays of any sizes -> float (N,3,size,size) in [0,1] with the model-side resize."""
    from sbir.models.backbones import resize, to_float

    if len({im.shape for im in images}) == 1:
        return resize(to_float(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)), size)
    return torch.cat([resize(to_float(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]), size) for im in images])


# ============================================================================ cache
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


def _cache_filename(key: dict[str, Any], gallery_path: Path) -> str:
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


def embed_gallery(encoder: SearchEncoder, gallery: Gallery, cache: str | os.PathLike | None = None, *,
                  batch_size: int = 256, rebuild: bool = False, progress: bool = True,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> EmbeddingCache:
    """Gallery embeddings from the cache, computed (and cached) when missing.

    ``cache``: None -> :func:`default_cache_dir`; a folder -> a file named after the key inside it; a
    ``.parquet`` path -> exactly that file. A file found under its key-derived name is reused when
    its key matches (a mismatch there means a damaged file: it is recomputed, with a message). An
    explicitly named file made by another checkpoint, model, image size or gallery raises
    :class:`CacheMismatchError` instead: silently replacing a file the user pointed at could discard
    a costly embedding run, and using it would give wrong results. ``rebuild`` recomputes always.
    Unreadable photos are skipped, counted and listed in the cache metadata (``skipped``)."""
    key = cache_key(encoder, gallery.identity())
    explicit = cache is not None and str(cache).endswith(".parquet")
    if explicit:
        path = Path(cache)
    else:
        path = Path(cache or default_cache_dir()) / _cache_filename(key, gallery.path)
    if path.exists() and not rebuild:
        found = EmbeddingCache(path)
        if found.key() == key:
            log(f"gallery embeddings: cache hit {path} ({len(found)} photos, {found.meta.get('skipped', 0)} skipped)")
            return found
        diff = {k: (found.key().get(k), v) for k, v in key.items() if found.key().get(k) != v}
        made_by = f"{found.meta.get('checkpoint', '?')} (sha256 {str(found.meta.get('checkpoint_sha256'))[:12]}), " \
                  f"model {found.meta.get('model')!r}"
        if explicit:
            raise CacheMismatchError(
                f"{path}: this cache was embedded by {made_by} for gallery {found.meta.get('gallery_path')!r}; "
                f"it does not match this search (differs in {', '.join(diff)}). Pass --rebuild-cache to "
                f"overwrite it, or another --cache path")
        log(f"gallery embeddings: {path} does not match its key (differs in {', '.join(diff)}); recomputing")
    meta = {**key, "checkpoint": str(encoder.checkpoint), "gallery_path": str(gallery.path),
            "gallery_kind": gallery.kind, "embed_dim": encoder.embed_dim}
    writer = CacheWriter(path, encoder.embed_dim, meta)
    from tqdm import tqdm

    t0 = time.perf_counter()
    gallery.skipped = []
    try:
        with tqdm(total=len(gallery), desc=f"embedding gallery ({encoder.name})", unit="photo",
                  disable=not progress, file=sys.stderr) as bar:
            seen_skips = 0
            for b in gallery.batches(batch_size):
                if b.images:
                    emb = _embed_float(encoder, _to_batch_tensor(b.images, encoder.image_size))
                    writer.add(b.ids, b.labels, b.class_names, emb)
                bar.update(len(b.images) + len(gallery.skipped) - seen_skips)
                seen_skips = len(gallery.skipped)
        writer.meta.update(skipped=len(gallery.skipped), skipped_examples=gallery.skipped[:20],
                           seconds=round(time.perf_counter() - t0, 3))
        if writer.count == 0:
            raise SearchError(f"gallery {gallery.path}: no photo could be read ({len(gallery.skipped)} unreadable; "
                              f"first: {gallery.skipped[:1]})")
        out = writer.close()
    except BaseException:
        writer.abort()
        raise
    if gallery.skipped:
        log(f"gallery embeddings: skipped {len(gallery.skipped)} unreadable photo(s), e.g. {gallery.skipped[0]}")
    log(f"gallery embeddings: wrote {path} ({len(out)} photos in {writer.meta['seconds']:.1f} s)")
    return out


@torch.no_grad()
def _embed_float(encoder: SearchEncoder, x: torch.Tensor) -> torch.Tensor:
    """Photo embeddings of float images already at the model's size."""
    return F.normalize(encoder.photo_fn(x).float(), dim=1)


# ============================================================================ search
@dataclass
class Hit:
    rank: int
    score: float
    row: int
    id: str
    label: int | None
    class_name: str | None


def search(encoder: SearchEncoder, queries: Sequence[Query], cache: EmbeddingCache, k: int = 10,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[list[Hit]]:
    """Top-k gallery photos of every query (cosine), streamed from the cache."""
    q = embed_queries(encoder, queries)
    rows_per_chunk = max(1, min(CACHE_ROW_GROUP, max_elements // len(queries)))
    # the cache holds unit vectors (embed_gallery normalises them before writing)
    scores, idx = topk_cosine(q, cache.iter_chunks(rows_per_chunk), k, max_elements=max_elements,
                              gallery_is_unit=True)
    info = cache.rows(idx.flatten().tolist())
    out, n = [], idx.shape[1]
    for qi in range(len(queries)):
        hits = []
        for r in range(n):
            meta = info[qi * n + r]
            hits.append(Hit(r + 1, float(scores[qi, r]), int(idx[qi, r]), meta["id"], meta.get("label"),
                            meta.get("class_name")))
        out.append(hits)
    return out


def save_grid(queries: Sequence[Query], results: Sequence[Sequence[Hit]], gallery: Gallery,
              path: str | os.PathLike, title: str | None = None) -> Path:
    """One row per query: the query sketch, then its top-k photos captioned with rank, score and class.

    Drawn here rather than with ``sbir.plots.image_grid`` because every cell needs its own caption."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = gallery.fetch(sorted({h.id for hits in results for h in hits}))
    ncols = 1 + max((len(h) for h in results), default=0)
    fig = Figure(figsize=(1.6 * ncols, 1.9 * len(queries) + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(queries), ncols, squeeze=False)
    for qi, (q, hits) in enumerate(zip(queries, results)):
        for j in range(ncols):
            ax = axes[qi][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.imshow(q.image[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(f"query\n{Path(q.name).name[:18]}", fontsize=7)
            elif j - 1 < len(hits):
                h = hits[j - 1]
                ax.imshow(images[h.id], interpolation="nearest")
                ax.set_title(f"#{h.rank} {h.score:.3f}\n{(h.class_name or Path(h.id).name)[:18]}", fontsize=7)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.1, hspace=0.45)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return out


if __name__ == "__main__":  # python -m sbir.search ... == sbir search ...
    from sbir.cli import main

    sys.exit(main(["search", *sys.argv[1:]]))
