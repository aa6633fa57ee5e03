"""Sketch files of any kind (SVG strokes or a raster image) -> checked stroke-3 or a greyscale raster,
every failure reported (TU-Berlin, and the QMUL layouts that hold SVG or PNG sketch files)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sbir.data.ingest.common import (
    EMPTY_DRAWING,
    OUTSIDE_CANVAS,
    UNPARSABLE_SVG,
    IngestOptions,
    IngestReport,
    checked_stroke3,
    load_sketch_raster,
)
from sbir.data.svg import SvgError, svg_to_polylines


def svg_simplify_eps(opts: IngestOptions) -> float:
    """RDP epsilon of SVG strokes: ``simplify_eps``, 0.5 source units by default."""
    return 0.5 if opts.simplify_eps is None else opts.simplify_eps


def svg_stroke3(f: Path, opts: IngestOptions, report: IngestReport,
                eps: float) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """Parse one SVG sketch -> (stroke-3 or None, None or the (reason, detail) the caller reports).

    Strokes off the canvas and invalid stroke-3 are reported here; a file that cannot be parsed is
    left to the caller (TU-Berlin falls back on a PNG twin)."""
    from sbir.strokes import polylines_to_stroke3

    try:
        sk = svg_to_polylines(f, flatten_step=opts.flatten_step)
    except SvgError as exc:
        msg = str(exc).replace(f"{f}: ", "")
        return None, (EMPTY_DRAWING if "no strokes" in msg else UNPARSABLE_SVG, msg)
    x0, y0, x1, y1 = sk.bbox()
    if math.isfinite(sk.width) and math.isfinite(sk.height) and sk.width > 0 and sk.height > 0:
        tol_x, tol_y = opts.canvas_tolerance * sk.width, opts.canvas_tolerance * sk.height
        if x0 < -tol_x or y0 < -tol_y or x1 > sk.width + tol_x or y1 > sk.height + tol_y:
            report.add(f, OUTSIDE_CANVAS, f"strokes span x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f} on a "
                                          f"{sk.width:g} x {sk.height:g} canvas (kept)")
    s3 = polylines_to_stroke3(sk.polylines)
    s3 = checked_stroke3(s3, f, report, eps)
    return s3, None


def read_sketch_file(f: Path, opts: IngestOptions, report: IngestReport) -> Any:
    """A sketch file of any kind -> stroke-3 (SVG) or (png, h, w) raster, or None (reported)."""
    if f.suffix.lower() == ".svg":
        s3, failure = svg_stroke3(f, opts, report, svg_simplify_eps(opts))
        if s3 is None and failure is not None:
            report.add(f, *failure)
        return s3
    return load_sketch_raster(f, report)
