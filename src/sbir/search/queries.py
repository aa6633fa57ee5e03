"""Sketch query files (raster, SVG, Quick Draw ndjson, stroke-3 ``.npy``) -> uint8 rasters and embeddings."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sbir.search.encoders import SearchEncoder
from sbir.search.errors import SearchError

RASTER_QUERY_EXTS = (".png", ".jpg", ".jpeg")
NDJSON_EXTS = (".ndjson", ".jsonl", ".json")


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


def _ndjson_record(raw: bytes, source: str, line: int | None) -> tuple[dict[str, Any], str]:
    lines = raw.splitlines()
    if line is None:
        nonblank = [i for i, l in enumerate(lines) if l.strip()]
        if len(nonblank) != 1:
            raise SearchError(f"{source}: holds {len(nonblank)} non-blank lines; pick one with --ndjson-line N "
                              f"(1-based; the 'ndjson line' field on the sbir app page)")
        line = nonblank[0] + 1
    if not 1 <= line <= len(lines):
        raise SearchError(f"{source}: has {len(lines)} lines, no line {line}")
    where = f"{source}:{line}"
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
    p = Path(path)
    if not p.is_file():
        raise SearchError(f"query {p} not found")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SearchError(f"{p}: cannot read ({exc})") from exc
    return query_from_bytes(data, str(p), render, ndjson_line)


def query_from_bytes(data: bytes, name: str, render: RenderSpec | None = None, ndjson_line: int | None = None,
                     max_image_pixels: int | None = None) -> Query:
    """:func:`load_query` on the content of a file (an upload) whose type the extension of ``name``
    gives; nothing is written to disk. ``max_image_pixels`` refuses larger rasters before decoding
    them (a small PNG can declare a huge canvas). Errors name ``name`` and the problem."""
    try:
        return _query_from_bytes(data, name, render or RenderSpec(), ndjson_line, max_image_pixels)
    except SearchError:
        raise
    except ValueError as exc:  # the stroke validators name the source in their message
        raise SearchError(str(exc)) from exc


def query_from_drawing(drawing: Any, name: str, render: RenderSpec | None = None) -> Query:
    """A Quick Draw ``drawing`` (``[[[x...], [y...]], ...]``, one entry per stroke, as an ndjson
    record holds it, e.g. the strokes drawn on a canvas) -> a query rendered by the dataset rasteriser."""
    from sbir.data.ingest.quickdraw import quickdraw_drawing_to_stroke3  # the Quick Draw ingest's parser
    from sbir.strokes import validate_stroke3

    try:
        s3 = quickdraw_drawing_to_stroke3(drawing)
    except ValueError as exc:
        raise SearchError(f"{name}: {'drawing has no points' if str(exc) == 'empty' else exc}") from exc
    try:
        s3 = validate_stroke3(s3, name)
    except ValueError as exc:
        raise SearchError(str(exc)) from exc
    return Query(name, "ndjson", _render(s3, render or RenderSpec()), s3)


def _raster_query(data: bytes, name: str, max_image_pixels: int | None) -> Query:
    from PIL import Image

    from sbir.data.images import to_grey  # the ingest's alpha-on-white greyscale conversion

    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_image_pixels is not None and img.width * img.height > max_image_pixels:
                raise SearchError(f"{name}: image is {img.width}x{img.height} pixels, more than the "
                                  f"{max_image_pixels} allowed")
            img.load()
            grey = to_grey(img)
    except SearchError:
        raise
    except Image.UnidentifiedImageError as exc:  # its message names an anonymous BytesIO
        raise SearchError(f"{name}: cannot decode image (not a PNG or JPEG file, or a damaged one)") from exc
    except Exception as exc:  # PIL raises several types for corrupt files
        raise SearchError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return Query(name, "raster", torch.from_numpy(np.array(grey, dtype=np.uint8))[None])


def _query_from_bytes(data: bytes, name: str, render: RenderSpec, ndjson_line: int | None,
                      max_image_pixels: int | None) -> Query:
    from sbir.strokes import polylines_to_stroke3, simplify_stroke3, validate_stroke3

    ext = Path(name).suffix.lower()
    if ext in RASTER_QUERY_EXTS:
        return _raster_query(data, name, max_image_pixels)
    if ext == ".svg":
        from sbir.data.svg import SvgError, svg_to_polylines

        try:
            sk = svg_to_polylines(data, name=name)
        except SvgError as exc:
            raise SearchError(str(exc)) from exc
        s3 = validate_stroke3(polylines_to_stroke3(sk.polylines), name)
        if render.svg_simplify_eps > 0:
            s3 = np.asarray(simplify_stroke3(s3, render.svg_simplify_eps), dtype=np.float32)
        return Query(name, "svg", _render(s3, render), s3)
    if ext in NDJSON_EXTS:
        rec, where = _ndjson_record(data, name, ndjson_line)
        q = query_from_drawing(rec["drawing"], where, render)
        q.name = where if ndjson_line else name
        return q
    if ext == ".npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # ValueError / OSError / UnpicklingError for bad files
            raise SearchError(f"{name}: cannot read the .npy array ({type(exc).__name__}: {exc})") from exc
        s3 = validate_stroke3(arr, name)
        return Query(name, "stroke3", _render(s3, render), s3)
    raise SearchError(f"{name}: unknown query type {ext!r}; expected .png/.jpg (raster), .svg, "
                      f".ndjson/.jsonl/.json (Quick Draw) or .npy (stroke-3 array)")


def embed_queries(encoder: SearchEncoder, queries: Sequence[Query]) -> torch.Tensor:
    """(Q, D) sketch embeddings; each query is resized to the model's size on its own."""
    if not queries:
        raise SearchError("no queries")
    return torch.cat([encoder.embed_sketches(q.image[None]) for q in queries])
