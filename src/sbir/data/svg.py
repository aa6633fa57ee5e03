"""Vector sketches stored as SVG (TU-Berlin, QMUL-Shoe-V2 renders) -> absolute polylines.

:func:`svg_to_polylines` parses an SVG file with ``svgelements``: every group and element
transform (and the viewBox -> viewport mapping) is applied, so the returned points are in the
document's viewport units (``0..width`` x ``0..height``, e.g. 800 x 800 for TU-Berlin). Each
*subpath* of a ``<path>`` (one ``M``/``m`` followed by drawing commands) becomes one stroke; in
TU-Berlin every ``<path>`` holds exactly one subpath, so this is "one stroke per path". Curves
are flattened: a cubic or quadratic Bézier becomes ``ceil(control-polygon length / flatten_step)``
points (at least 1, at most ``max_points_per_segment``) sampled uniformly in ``t``; arcs are
sampled the same way along their length; lines and closes contribute their end point.
``<polyline>``, ``<polygon>`` and ``<line>`` elements are strokes too; filled shapes such as the
white background ``<rect>`` of QMUL's renders are not strokes and are ignored.

Errors (malformed XML, path data the parser would silently truncate, no strokes at all) raise
:class:`SvgError` with the file name and the reason.
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from typing import Union

import numpy as np

__all__ = ["SvgError", "SvgSketch", "svg_to_polylines"]

# characters that may appear in SVG path data; anything else means svgelements would stop
# parsing at that point and silently drop the rest of the path
_PATH_DATA_OK = re.compile(r"^[MmLlHhVvCcSsQqTtAaZz0-9eE.,+\-\s]*$")


class SvgError(ValueError):
    """An SVG file that cannot be turned into strokes (the message names the file)."""


@dataclass
class SvgSketch:
    polylines: list[np.ndarray]  # absolute float64 (k, 2) arrays, one per stroke, drawing order
    width: float                 # viewport size (the canvas the strokes were drawn on)
    height: float

    def bbox(self) -> tuple[float, float, float, float]:
        pts = np.concatenate(self.polylines, axis=0)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _n_samples(length: float, flatten_step: float, max_points: int) -> int:
    if not math.isfinite(length) or length <= 0:
        return 1
    return int(min(max_points, max(1, math.ceil(length / flatten_step))))


def _cubic(p0, p1, p2, p3, n: int) -> np.ndarray:
    t = np.arange(1, n + 1, dtype=np.float64)[:, None] / n
    u = 1.0 - t
    return (u ** 3) * p0 + 3 * (u ** 2) * t * p1 + 3 * u * (t ** 2) * p2 + (t ** 3) * p3


def _quad(p0, p1, p2, n: int) -> np.ndarray:
    t = np.arange(1, n + 1, dtype=np.float64)[:, None] / n
    u = 1.0 - t
    return (u ** 2) * p0 + 2 * u * t * p1 + (t ** 2) * p2


def _xy(p) -> np.ndarray:
    return np.array([float(p.x), float(p.y)], dtype=np.float64)


def _segments_to_polylines(segments, se, flatten_step: float, max_points: int) -> list[np.ndarray]:
    """Split a segment list at every Move; flatten curves; drop subpaths with no drawing segment."""
    out: list[np.ndarray] = []
    current: list[np.ndarray] = []
    drawn = False

    def finish() -> None:
        if current and drawn:
            out.append(np.concatenate(current, axis=0))

    for seg in segments:
        if isinstance(seg, se.Move):
            finish()
            current, drawn = [_xy(seg.end)[None, :]], False
            continue
        if not current:  # a drawing segment without a Move: start at its start point
            start = seg.start if seg.start is not None else seg.end
            current, drawn = [_xy(start)[None, :]], False
        if isinstance(seg, se.CubicBezier):
            p = [_xy(seg.start), _xy(seg.control1), _xy(seg.control2), _xy(seg.end)]
            length = sum(float(np.linalg.norm(p[i + 1] - p[i])) for i in range(3))
            current.append(_cubic(*p, _n_samples(length, flatten_step, max_points)))
        elif isinstance(seg, se.QuadraticBezier):
            p = [_xy(seg.start), _xy(seg.control), _xy(seg.end)]
            length = sum(float(np.linalg.norm(p[i + 1] - p[i])) for i in range(2))
            current.append(_quad(*p, _n_samples(length, flatten_step, max_points)))
        elif isinstance(seg, se.Arc):
            n = _n_samples(float(seg.length()), flatten_step, max_points)
            pts = [seg.point(i / n) for i in range(1, n + 1)]
            current.append(np.array([[float(q[0]), float(q[1])] for q in pts], dtype=np.float64))
        else:  # Line, Close (and anything linear)
            current.append(_xy(seg.end)[None, :])
        drawn = True
    finish()
    return out


def svg_to_polylines(source: Union[str, os.PathLike, bytes], flatten_step: float = 2.0,
                     max_points_per_segment: int = 64, name: str | None = None) -> SvgSketch:
    """Parse an SVG (path or bytes) into absolute polylines in viewport units; see the module doc."""
    import svgelements as se  # imported lazily: only SVG ingests need it

    label = name or (str(source) if not isinstance(source, bytes) else "<svg bytes>")
    try:
        data = source if isinstance(source, bytes) else open(source, "rb").read()
    except OSError as exc:
        raise SvgError(f"{label}: cannot read file ({exc})") from exc
    try:
        svg = se.SVG.parse(io.BytesIO(data), reify=True)
    except Exception as exc:  # xml.etree ParseError and svgelements' own errors
        raise SvgError(f"{label}: not a parsable SVG ({type(exc).__name__}: {exc})") from exc

    polylines: list[np.ndarray] = []
    n_elements = 0
    for el in svg.elements():
        if isinstance(el, se.Path):
            d = el.values.get("d", "") if hasattr(el, "values") else ""
            if d and not _PATH_DATA_OK.match(d):
                bad = next(ch for ch in d if not _PATH_DATA_OK.match(ch))
                raise SvgError(f"{label}: path {el.id or n_elements} has unparsable data (character {bad!r})")
        elif not isinstance(el, (se.Polyline, se.Polygon, se.SimpleLine)):
            continue
        n_elements += 1
        try:
            segs = list(el.segments())
        except Exception as exc:
            raise SvgError(f"{label}: element {el.id or n_elements} cannot be read ({exc})") from exc
        polylines.extend(_segments_to_polylines(segs, se, flatten_step, max_points_per_segment))
    for p in polylines:
        if not np.isfinite(p).all():
            raise SvgError(f"{label}: non-finite coordinates after applying transforms")
    if not polylines:
        raise SvgError(f"{label}: no strokes (no path/polyline/line with drawing commands)")
    try:
        width, height = float(svg.width), float(svg.height)
    except (TypeError, ValueError):
        width = height = float("nan")
    return SvgSketch(polylines=polylines, width=width, height=height)
