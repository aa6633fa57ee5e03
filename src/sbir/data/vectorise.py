"""Raster sketch -> stroke-3: binarise, skeletonise, trace the skeleton into polylines, simplify.

Real samples such as QMUL-Shoe-V1 (``.mat`` rasters) and the Sketchy PNGs carry no pen
trajectories, but the fine-grained stages train a *sequential* photo->sketch generator on stroke-5
targets, and METHOD.md asks that real and generated sketches be drawn by the same rasteriser
(:func:`sbir.strokes.rasterise`). This module turns a raster into strokes so both hold.

Steps (:func:`vectorise_raster`):

1. **Binarise**: ink where ``1 - grey/255 >= ink_threshold``; connected ink components smaller than
   ``min_component_px`` pixels are dropped as specks (counted in the result).
2. **Skeleton**: :func:`skimage.morphology.skeletonize` (scikit-image, maintained) thins the lines
   to one-pixel-wide 8-connected curves.
3. **Trace** (hand-written, see :func:`trace_skeleton`): the skeleton is a pixel graph; pixels whose
   number of skeleton neighbours is not 2 (end points, junctions) are nodes, and each run of
   degree-2 pixels between nodes becomes a polyline; closed loops without a node are walked too.
   Short spurs (a free end joined to a junction, ``spur_px`` or shorter, a skeletonisation artefact
   of thick line ends) are pruned. At every junction the two polylines that continue each other
   best (turn under ``max_join_turn_deg``) are joined, so a line crossing another stays one stroke.
4. **Simplify**: :func:`sbir.strokes.rdp` with ``rdp_epsilon`` pixels.
5. **Order**: strokes longest first (``order: length``; the generator truncates long sequences,
   so the main contours come first) or by position (``order: position``: top-left first); each
   stroke starts at its end nearer the top-left corner.

Coordinates are the raster's pixel frame (x = column + 0.5, y = row + 0.5), i.e. stroke units are
source pixels, like the other adapters that keep "the source's units".

Fidelity (:func:`trace_fidelity`): the trace is drawn one pixel wide back into the raster frame
(:func:`skimage.draw.line`) and compared with the binarised ink after a dilation by ``tolerance_px``
of both masks: ``iou`` = IoU of the dilated masks, ``coverage`` = share of ink pixels within the
tolerance of the trace (recall), ``precision`` = share of trace pixels within the tolerance of ink.
The trace is thickened to the original's mean line width first (ink area / traced length), so
thick pen lines are not counted as misses.

Why the tracer is hand-written: scikit-image skeletonises but has no skeleton-to-polyline tracer;
the library that does (``skan``) needs numba and pandas (a large install and a JIT warm-up per
process, for ~100 lines of graph walking here), and no library joins branches at junctions by
continuation angle, which the generator needs to see long strokes rather than junction fragments.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from sbir.strokes import polylines_to_stroke3, rdp, stroke3_to_polylines

__all__ = [
    "VectoriseParams",
    "VectoriseResult",
    "VectoriseStats",
    "binarise",
    "render_trace",
    "stroke3_fidelity",
    "trace_fidelity",
    "trace_skeleton",
    "vectorise_raster",
]

# 8-neighbourhood offsets (row, col)
_NEIGH = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


@dataclass(frozen=True)
class VectoriseParams:
    """Knobs of :func:`vectorise_raster` (defaults measured on the QMUL-V1 and Sketchy samples)."""

    ink_threshold: float = 0.25        # ink share (1 - grey/255) above which a pixel is ink
    min_component_px: int = 4          # ink components smaller than this are specks (dropped, counted)
    spur_px: int = 4                   # prune free-end branches this long or shorter that touch a junction
    max_join_turn_deg: float = 50.0    # join two branches at a junction when the turn is below this
    rdp_epsilon: float = 1.0           # RDP tolerance in source pixels
    min_stroke_px: float = 2.0         # strokes shorter than this (path length) are dropped (counted)
    order: Literal["length", "position"] = "length"
    tolerance_px: int = 2              # fidelity: dilation radius of both masks

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"vectorise: {what}")
        need(0.0 < self.ink_threshold < 1.0, f"ink_threshold must be in (0, 1), got {self.ink_threshold}")
        need(self.min_component_px >= 0, f"min_component_px must be >= 0, got {self.min_component_px}")
        need(self.spur_px >= 0, f"spur_px must be >= 0, got {self.spur_px}")
        need(0.0 <= self.max_join_turn_deg <= 180.0, f"max_join_turn_deg must be in [0, 180], got {self.max_join_turn_deg}")
        need(self.rdp_epsilon >= 0, f"rdp_epsilon must be >= 0, got {self.rdp_epsilon}")
        need(self.min_stroke_px >= 0, f"min_stroke_px must be >= 0, got {self.min_stroke_px}")
        need(self.order in ("length", "position"), f"order must be 'length' or 'position', got {self.order!r}")
        need(self.tolerance_px >= 0, f"tolerance_px must be >= 0, got {self.tolerance_px}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VectoriseResult:
    """One traced sketch: stroke-3 in source pixels (empty ``(0, 3)`` when nothing was traced)."""

    strokes: np.ndarray
    n_strokes: int
    n_points: int
    ink_px: int                 # ink pixels after binarisation and speck removal
    specks_removed: int         # ink components dropped as specks
    short_strokes_dropped: int  # traced polylines shorter than min_stroke_px
    spurs_pruned: int
    iou: float                  # NaN when the image has no ink
    coverage: float
    precision: float

    @property
    def empty(self) -> bool:
        return self.strokes.shape[0] == 0


# ----------------------------------------------------------------------------- binarise / skeleton
def binarise(grey: np.ndarray, ink_threshold: float = 0.25, min_component_px: int = 4) -> tuple[np.ndarray, int]:
    """uint8 greyscale (black ink on white) -> (bool ink mask, number of speck components removed)."""
    from scipy import ndimage

    g = np.asarray(grey)
    if g.ndim == 3:  # RGB(A): luminance of the first three channels
        g = g[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if g.ndim != 2:
        raise ValueError(f"expected a greyscale (H, W) or colour (H, W, C) image, got shape {np.shape(grey)}")
    ink = (1.0 - g.astype(np.float32) / 255.0) >= ink_threshold
    removed = 0
    if min_component_px > 1 and ink.any():
        lab, n = ndimage.label(ink, structure=np.ones((3, 3), bool))
        sizes = np.bincount(lab.ravel())
        small = np.flatnonzero(sizes < min_component_px)
        small = small[small > 0]
        if small.size:
            ink &= ~np.isin(lab, small)
            removed = int(small.size)
    return ink, removed


def _neighbours(mask: np.ndarray, r: int, c: int) -> list[tuple[int, int]]:
    h, w = mask.shape
    out = []
    for dr, dc in _NEIGH:
        rr, cc = r + dr, c + dc
        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc]:
            out.append((rr, cc))
    return out


def _path_length(p: np.ndarray) -> float:
    return float(np.sqrt((np.diff(p, axis=0) ** 2).sum(axis=1)).sum()) if len(p) > 1 else 0.0


# ----------------------------------------------------------------------------- tracing
def trace_skeleton(skel: np.ndarray, spur_px: int = 4, max_join_turn_deg: float = 50.0
                   ) -> tuple[list[np.ndarray], int]:
    """One-pixel-wide skeleton (bool H x W) -> (polylines of (row, col) float points, spurs pruned).

    Nodes are skeleton pixels with != 2 skeleton neighbours; every edge (run of degree-2 pixels
    between two nodes, or a node-free loop) becomes one polyline. Then spurs are pruned and
    branches are joined through junctions by continuation angle (see the module doc).
    """
    sk = np.asarray(skel, dtype=bool)
    pixels = list(zip(*np.nonzero(sk)))
    if not pixels:
        return [], 0
    nbrs = {p: _neighbours(sk, *p) for p in pixels}
    deg = {p: len(n) for p, n in nbrs.items()}
    is_node = {p: deg[p] != 2 for p in pixels}
    visited_edges: set[tuple[tuple[int, int], tuple[int, int]]] = set()

    def key(a, b):
        return (a, b) if a <= b else (b, a)

    paths: list[list[tuple[int, int]]] = []
    # edges starting at nodes; neighbouring nodes (junction clusters) give 2-pixel edges
    for p in pixels:
        if not is_node[p]:
            continue
        if deg[p] == 0:
            paths.append([p])  # an isolated pixel: a dot
            continue
        for q in nbrs[p]:
            if key(p, q) in visited_edges:
                continue
            path = [p, q]
            visited_edges.add(key(p, q))
            prev, cur = p, q
            while not is_node[cur]:
                nxt = [n for n in nbrs[cur] if n != prev and key(cur, n) not in visited_edges]
                if not nxt:
                    break
                # prefer a 4-neighbour step (skeleton corners have both a diagonal and two 4-steps)
                nxt.sort(key=lambda n: abs(n[0] - cur[0]) + abs(n[1] - cur[1]))
                n = nxt[0]
                visited_edges.add(key(cur, n))
                path.append(n)
                prev, cur = cur, n
            paths.append(path)
    # loops made only of degree-2 pixels
    for p in pixels:
        if is_node[p] or all(key(p, q) in visited_edges for q in nbrs[p]):
            continue
        path = [p]
        prev, cur = None, p
        while True:
            nxt = [n for n in nbrs[cur] if n != prev and key(cur, n) not in visited_edges]
            if not nxt:
                break
            n = nxt[0]
            visited_edges.add(key(cur, n))
            path.append(n)
            prev, cur = cur, n
            if cur == p:
                break
        if len(path) > 1:
            paths.append(path)

    polys = [np.asarray(pth, dtype=np.float64) for pth in paths]
    polys, pruned = _prune_spurs(polys, deg, spur_px)
    polys = _join_at_junctions(polys, max_join_turn_deg)
    return polys, pruned


def _prune_spurs(polys: list[np.ndarray], deg: dict, spur_px: int) -> tuple[list[np.ndarray], int]:
    """Drop branches with one free end (degree 1) and one junction end (degree >= 3), at most
    ``spur_px`` long: thick line ends skeletonise into such forks."""
    if spur_px <= 0:
        return polys, 0
    keep, pruned = [], 0
    for p in polys:
        if len(p) >= 2:
            a, b = tuple(int(v) for v in p[0]), tuple(int(v) for v in p[-1])
            da, db = deg.get(a, 2), deg.get(b, 2)
            if min(da, db) == 1 and max(da, db) >= 3 and _path_length(p) <= spur_px:
                pruned += 1
                continue
        keep.append(p)
    return keep, pruned


def _end_direction(p: np.ndarray, at_start: bool, reach: int = 5) -> np.ndarray:
    """Unit vector pointing *out of* the polyline at one end (from a few pixels inside to the end)."""
    if len(p) < 2:
        return np.zeros(2)
    k = min(reach, len(p) - 1)
    v = p[0] - p[k] if at_start else p[-1] - p[-1 - k]
    n = float(np.hypot(*v))
    return v / n if n > 0 else np.zeros(2)


def _join_at_junctions(polys: list[np.ndarray], max_turn_deg: float) -> list[np.ndarray]:
    """Join polylines whose ends meet (same or adjacent pixel) and continue each other.

    Ends are grouped into meeting points (ends within one pixel, transitively); at each meeting point
    the pairs of ends with the smallest turn are linked greedily (each end at most once, turn below
    ``max_turn_deg``), then the linked polylines are concatenated into chains. Dots and closed
    polylines are left alone."""
    polys = [p for p in polys if len(p) > 0]
    if max_turn_deg <= 0 or len(polys) < 2:
        return polys
    ends: list[tuple[int, bool]] = []  # (poly index, at_start)
    for i, p in enumerate(polys):
        if len(p) >= 2 and not np.array_equal(p[0], p[-1]):
            ends += [(i, True), (i, False)]
    group = _meeting_points([tuple(int(v) for v in (polys[i][0] if s else polys[i][-1])) for i, s in ends])
    # connectors inside one meeting point (junction clusters of the skeleton give 1-2 pixel edges
    # between adjacent junction pixels) have no direction of their own: drop them, the strokes that
    # meet there are joined across the gap instead
    inner = {ends[k][0] for k in range(0, len(ends), 2)
             if group[k] == group[k + 1] and _path_length(polys[ends[k][0]]) <= 2.0}
    if inner:
        keep = [i for i in range(len(polys)) if i not in inner]
        return _join_at_junctions([polys[i] for i in keep], max_turn_deg)
    link = _link_ends(polys, ends, group, math.cos(math.radians(max_turn_deg)))
    if not link:
        return polys
    return _chains(polys, link)


def _meeting_points(pt: list[tuple[int, int]]) -> list[int]:
    """Group index of each end point: connected groups of points within one pixel of each other."""
    grid: dict[tuple[int, int], list[int]] = {}
    for k, q in enumerate(pt):
        grid.setdefault(q, []).append(k)
    group = [-1] * len(pt)
    n_groups = 0
    for k in range(len(pt)):
        if group[k] >= 0:
            continue
        group[k] = n_groups
        stack = [k]
        while stack:
            e = stack.pop()
            r, c = pt[e]
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    for f in grid.get((r + dr, c + dc), ()):
                        if group[f] < 0:
                            group[f] = n_groups
                            stack.append(f)
        n_groups += 1
    return group


def _link_ends(polys: list[np.ndarray], ends: list[tuple[int, bool]], group: list[int],
               cos_min: float) -> dict[tuple[int, bool], tuple[int, bool]]:
    """At each meeting point, link pairs of ends of different polylines greedily by the smallest turn
    (cosine >= ``cos_min``; each end at most once). Returns end -> linked end, both ways."""
    members: dict[int, list[int]] = {}
    for k, g in enumerate(group):
        members.setdefault(g, []).append(k)
    direction = [_end_direction(polys[i], s) for i, s in ends]
    link: dict[tuple[int, bool], tuple[int, bool]] = {}
    for ks in members.values():
        if len(ks) < 2:
            continue
        cands = []
        for x in range(len(ks)):
            for y in range(x + 1, len(ks)):
                a, b = ks[x], ks[y]
                if ends[a][0] == ends[b][0]:
                    continue
                c = float(direction[a] @ -direction[b])  # leave A, enter B
                if c >= cos_min:
                    cands.append((c, a, b))
        used: set[int] = set()
        for c, a, b in sorted(cands, reverse=True):
            if a in used or b in used:
                continue
            used.update((a, b))
            link[ends[a]] = ends[b]
            link[ends[b]] = ends[a]
    return link


def _chains(polys: list[np.ndarray], link: dict[tuple[int, bool], tuple[int, bool]]) -> list[np.ndarray]:
    """Concatenate linked polylines into chains: first those with a free end (starting there), then
    the cycles that are left."""

    def chain_from(i: int, start_at_start: bool, seen: set[int]) -> np.ndarray:
        parts = []
        cur, at_start = i, start_at_start
        while cur not in seen:
            seen.add(cur)
            q = polys[cur] if at_start else polys[cur][::-1]
            if parts and np.array_equal(parts[-1][-1], q[0]):
                q = q[1:]
            parts.append(q)
            nxt = link.get((cur, not at_start))  # the end we leave through
            if nxt is None:
                break
            cur, at_start = nxt[0], nxt[1]
        return np.concatenate(parts, axis=0)

    out, seen = [], set()
    for i in range(len(polys)):  # chains that have a free end start there
        if i in seen:
            continue
        if (i, True) not in link:
            out.append(chain_from(i, True, seen))
        elif (i, False) not in link:
            out.append(chain_from(i, False, seen))
    for i in range(len(polys)):  # what is left is linked in cycles
        if i not in seen:
            out.append(chain_from(i, True, seen))
    return out


# ----------------------------------------------------------------------------- fidelity
def render_trace(polylines_xy: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Absolute (x, y) polylines in the raster's pixel frame -> one-pixel-wide bool mask."""
    from skimage.draw import line

    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for p in polylines_xy:
        rc = np.floor(np.asarray(p, dtype=np.float64)[:, ::-1]).astype(np.int64)  # (row, col)
        rc[:, 0] = np.clip(rc[:, 0], 0, h - 1)
        rc[:, 1] = np.clip(rc[:, 1], 0, w - 1)
        if len(rc) == 1:
            mask[rc[0, 0], rc[0, 1]] = True
        for (r0, c0), (r1, c1) in zip(rc[:-1], rc[1:]):
            rr, cc = line(int(r0), int(c0), int(r1), int(c1))
            mask[rr, cc] = True
    return mask


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r


def trace_fidelity(ink: np.ndarray, trace: np.ndarray, tolerance_px: int = 2,
                   line_radius_px: int = 0) -> dict[str, float]:
    """Compare a one-pixel trace with the ink it was traced from.

    The trace is first thickened to the original's line width (``line_radius_px``), then both masks
    are dilated by ``tolerance_px``: ``iou`` of those masks; ``coverage`` = ink pixels within the
    tolerance of the (thickened) trace; ``precision`` = trace pixels within the tolerance of ink.
    All NaN when ``ink`` is empty."""
    from scipy import ndimage

    ink = np.asarray(ink, bool)
    trace = np.asarray(trace, bool)
    if not ink.any():
        return {"iou": float("nan"), "coverage": float("nan"), "precision": float("nan")}
    if not trace.any():
        return {"iou": 0.0, "coverage": 0.0, "precision": 0.0}
    thick = ndimage.binary_dilation(trace, structure=_disk(line_radius_px)) if line_radius_px > 0 else trace
    if tolerance_px > 0:
        di = ndimage.binary_dilation(ink, structure=_disk(tolerance_px))
        dt = ndimage.binary_dilation(thick, structure=_disk(tolerance_px))
    else:
        di, dt = ink, thick
    inter = np.logical_and(di, dt).sum()
    union = np.logical_or(di, dt).sum()
    return {"iou": float(inter / union), "coverage": float((ink & dt).sum() / ink.sum()),
            "precision": float((trace & di).sum() / trace.sum())}


# ----------------------------------------------------------------------------- the whole thing
def _order(polys: list[np.ndarray], order: str) -> list[np.ndarray]:
    out = []
    for p in polys:  # start at the end nearer the top-left corner
        if len(p) > 1 and (p[-1].sum() < p[0].sum()) and not np.array_equal(p[0], p[-1]):
            p = p[::-1]
        out.append(p)
    if order == "length":
        out.sort(key=lambda p: (-_path_length(p), float(p[0, 1]), float(p[0, 0])))
    else:
        out.sort(key=lambda p: (float(p[:, 1].min() + p[:, 0].min()), -_path_length(p)))
    return out


def _line_radius(ink_px: int, length: float) -> int:
    """Radius (pixels) of a line of mean width ink_px / length, for thickening the 1-px trace."""
    if length <= 0:
        return 0
    return int(max(0, math.floor((ink_px / length - 1) / 2 + 0.5)))


def vectorise_raster(grey: np.ndarray, params: VectoriseParams | None = None) -> VectoriseResult:
    """Trace a raster sketch (uint8, black ink on white) into stroke-3 in its pixel frame."""
    from skimage.morphology import skeletonize

    p = params or VectoriseParams()
    ink, specks = binarise(grey, p.ink_threshold, p.min_component_px)
    if not ink.any():
        return VectoriseResult(np.zeros((0, 3), np.float32), 0, 0, 0, specks, 0, 0,
                               float("nan"), float("nan"), float("nan"))
    skel = skeletonize(ink)
    polys_rc, pruned = trace_skeleton(skel, p.spur_px, p.max_join_turn_deg)
    # (row, col) pixel indices -> (x, y) at pixel centres
    polys = [np.stack([q[:, 1] + 0.5, q[:, 0] + 0.5], axis=1) for q in polys_rc]
    short = sum(1 for q in polys if _path_length(q) < p.min_stroke_px and len(q) > 1)
    polys = [q for q in polys if len(q) == 1 or _path_length(q) >= p.min_stroke_px]
    # the original's mean line width ~ ink area / traced length (diagonal steps count sqrt 2)
    radius = _line_radius(int(ink.sum()), sum(_path_length(q) for q in polys) + len(polys))
    polys = [rdp(q, p.rdp_epsilon) if p.rdp_epsilon > 0 else q for q in polys]
    polys = _order(polys, p.order)
    s3 = polylines_to_stroke3(polys)
    fid = trace_fidelity(ink, render_trace(polys, ink.shape), p.tolerance_px, radius)
    return VectoriseResult(strokes=s3, n_strokes=len(polys), n_points=int(s3.shape[0]), ink_px=int(ink.sum()),
                           specks_removed=specks, short_strokes_dropped=short, spurs_pruned=pruned, **fid)


def stroke3_fidelity(s3: np.ndarray, grey: np.ndarray, params: VectoriseParams | None = None) -> dict[str, float]:
    """Fidelity of stroke-3 (in the raster's pixel frame) against a raster (re-checks a stored trace)."""
    p = params or VectoriseParams()
    from skimage.morphology import skeletonize

    ink, _ = binarise(grey, p.ink_threshold, p.min_component_px)
    polys_rc, _ = trace_skeleton(skeletonize(ink), p.spur_px, p.max_join_turn_deg) if ink.any() else ([], 0)
    radius = _line_radius(int(ink.sum()), sum(_path_length(q) for q in polys_rc) + len(polys_rc))
    return trace_fidelity(ink, render_trace(stroke3_to_polylines(s3), ink.shape), p.tolerance_px, radius)


@dataclass
class VectoriseStats:
    """Running totals over many traced sketches (for the ingest report and manifest)."""

    params: VectoriseParams
    n: int = 0
    n_empty: int = 0
    strokes: list[int] = field(default_factory=list)
    points: list[int] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    specks_removed: int = 0
    short_strokes_dropped: int = 0
    spurs_pruned: int = 0
    empty_ids: list[str] = field(default_factory=list)

    def add(self, sid: str, r: VectoriseResult) -> None:
        self.n += 1
        self.specks_removed += r.specks_removed
        self.short_strokes_dropped += r.short_strokes_dropped
        self.spurs_pruned += r.spurs_pruned
        if r.empty:
            self.n_empty += 1
            if len(self.empty_ids) < 1000:
                self.empty_ids.append(sid)
            return
        self.strokes.append(r.n_strokes)
        self.points.append(r.n_points)
        for name in ("iou", "coverage", "precision"):
            getattr(self, name).append(getattr(r, name))

    def summary(self) -> dict[str, Any]:
        def dist(xs: list) -> dict[str, float] | None:
            if not xs:
                return None
            a = np.asarray(xs, dtype=np.float64)
            return {"mean": round(float(a.mean()), 4), "min": round(float(a.min()), 4),
                    "p10": round(float(np.percentile(a, 10)), 4), "median": round(float(np.median(a)), 4),
                    "max": round(float(a.max()), 4)}

        return {"params": self.params.to_dict(), "sketches": self.n, "traced": self.n - self.n_empty,
                "no_strokes": self.n_empty, "no_strokes_ids": self.empty_ids,
                "strokes_per_sketch": dist(self.strokes), "points_per_sketch": dist(self.points),
                "iou": dist(self.iou), "coverage": dist(self.coverage), "precision": dist(self.precision),
                "specks_removed": self.specks_removed, "short_strokes_dropped": self.short_strokes_dropped,
                "spurs_pruned": self.spurs_pruned}
