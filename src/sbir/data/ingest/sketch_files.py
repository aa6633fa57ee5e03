"""Sketch files of any kind (SVG strokes or a raster image) -> checked stroke-3 or a greyscale raster,
every failure reported (TU-Berlin, and the QMUL layouts that hold SVG or PNG sketch files)."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from sbir.data.ingest.common import (
    DEGENERATE_DRAWING,
    EMPTY_DRAWING,
    OUTSIDE_CANVAS,
    UNPARSABLE_SVG,
    IngestOptions,
    IngestReport,
    checked_stroke3,
    load_sketch_raster,
)
from sbir.data.svg import SvgError, svg_to_polylines


# SVG path grammar: a command letter, then its arguments in groups of _PATH_ARGS (repeatable; none for Z)
_PATH_ARGS = {"m": 2, "l": 2, "t": 2, "h": 1, "v": 1, "c": 6, "s": 4, "q": 4, "a": 7, "z": 0}
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_FLAG = re.compile(r"[01]")  # the arc's large-arc and sweep flags may be written without separators
_SEPARATORS = re.compile(r"[\s,]*")


def path_data_error(d: str) -> str | None:
    """What is malformed in SVG path data (the part a lenient parser such as svgelements silently
    drops, e.g. ``L`` without coordinates or stray text), or None when it follows the path grammar."""
    pos = _SEPARATORS.match(d).end()
    if pos < len(d) and d[pos] not in "Mm":
        return f"starts with {d[pos:pos + 8]!r}, not a moveto (M/m)"
    while pos < len(d):
        cmd, start = d[pos], pos
        if cmd.lower() not in _PATH_ARGS:
            return f"expected a command letter at character {pos}, found {d[pos:pos + 8]!r}"
        pos, groups, error = _path_arguments(d, _SEPARATORS.match(d, pos + 1).end(), cmd)
        if error:
            return f"{cmd!r} at character {start}: {error}"
        if _PATH_ARGS[cmd.lower()] and not groups:
            return f"{cmd!r} at character {start} has no coordinates"
    return None


def _path_arguments(d: str, pos: int, cmd: str) -> tuple[int, int, str | None]:
    """Parse the argument groups of one command from ``pos``: (end, number of groups, error or None)."""
    n, groups = _PATH_ARGS[cmd.lower()], 0
    while n and pos < len(d) and d[pos].lower() not in _PATH_ARGS:
        for k in range(n):
            m = (_FLAG if cmd in "Aa" and k in (3, 4) else _NUMBER).match(d, pos)
            if m is None:
                return pos, groups, f"expected {n} numbers per group, found {d[pos:pos + 8]!r} at character {pos}"
            pos = _SEPARATORS.match(d, m.end()).end()
        groups += 1
    return pos, groups, None


def _malformed_path(f: Path) -> str | None:
    """The first ``<path>`` of an SVG file whose ``d`` is malformed, described; None when all are well
    formed (or the XML does not parse: the SVG parser reports that)."""
    try:
        root = ET.parse(f).getroot()
    except (ET.ParseError, OSError):
        return None
    paths = [el for el in root.iter() if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] == "path"]
    for i, el in enumerate(paths):
        why = path_data_error(el.get("d") or "")
        if why:
            return f"path {el.get('id') or i} has malformed data ({why})"
    return None


def _degenerate(polylines: list[np.ndarray]) -> str | None:
    """Why parsed strokes are not a drawing (fewer than 2 points, or all points on one spot), or None."""
    n = sum(len(p) for p in polylines)
    if n < 2:
        return f"{n} point(s): a drawing needs at least 2"
    pts = np.concatenate(polylines, axis=0)
    if np.ptp(pts, axis=0).max() == 0:
        return f"no extent: all {n} points at ({pts[0, 0]:g}, {pts[0, 1]:g})"
    return None


def svg_simplify_eps(opts: IngestOptions) -> float:
    """RDP epsilon of SVG strokes: ``simplify_eps``, 0.5 source units by default."""
    return 0.5 if opts.simplify_eps is None else opts.simplify_eps


def svg_stroke3(f: Path, opts: IngestOptions, report: IngestReport,
                eps: float) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """Parse one SVG sketch -> (stroke-3 or None, None or the (reason, detail) the caller reports).

    Strokes off the canvas and invalid stroke-3 are reported here; a file that cannot be parsed (bad
    XML, malformed path data) or whose strokes are degenerate is left to the caller (TU-Berlin falls
    back on a PNG twin)."""
    from sbir.strokes import polylines_to_stroke3

    try:
        sk = svg_to_polylines(f, flatten_step=opts.flatten_step)
    except SvgError as exc:
        msg = str(exc).replace(f"{f}: ", "")
        return None, (EMPTY_DRAWING if "no strokes" in msg else UNPARSABLE_SVG, msg)
    malformed = _malformed_path(f)
    if malformed:
        return None, (UNPARSABLE_SVG, malformed)
    degenerate = _degenerate(sk.polylines)
    if degenerate:
        return None, (DEGENERATE_DRAWING, degenerate)
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
