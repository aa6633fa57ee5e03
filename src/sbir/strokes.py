"""Vector sketch formats, conversions, simplification and the project's rasteriser.

Formats (see METHOD.md, "Stroke formats"):

* **stroke-3**: float32 array ``(N, 3)`` of rows ``(dx, dy, p)``. ``dx, dy`` are
  offsets from the previous point; the first row is the offset from the origin
  ``(0, 0)``. ``p = 1`` means the pen lifts *after* this point (it is the last
  point of a stroke). Coordinates are image-like: ``y`` grows downwards.
* **stroke-5**: float32 array ``(N, 5)`` of rows ``(dx, dy, p1, p2, p3)``
  (sketch-rnn convention): ``p1`` pen down (the next point continues the
  stroke), ``p2`` pen up after this point, ``p3`` end of sketch. The end row is
  ``(0, 0, 0, 0, 1)``; padding rows after it are also ``(0, 0, 0, 0, 1)``.

``rasterise`` is the one function that turns strokes into images, for real and
generated sketches alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "SOS_ROW",
    "END_ROW",
    "stroke3_to_stroke5",
    "stroke5_to_stroke3",
    "pad_stroke5",
    "stroke5_mask",
    "stroke3_to_polylines",
    "polylines_to_stroke3",
    "rdp",
    "simplify_stroke3",
    "normalise_stroke3",
    "stroke3_offset_std",
    "validate_stroke3",
    "rasterise",
    "render_to_uint8_rgb",
]

#: Start-of-sequence token of a padded stroke-5 batch (pen down, no offset).
SOS_ROW = np.array([0, 0, 1, 0, 0], dtype=np.float32)
#: End-of-sketch row (also used for padding after the end).
END_ROW = np.array([0, 0, 0, 0, 1], dtype=np.float32)


def _as_stroke3(s3: np.ndarray) -> np.ndarray:
    a = np.asarray(s3, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != 3:
        if a.size == 0:
            return np.zeros((0, 3), dtype=np.float32)
        raise ValueError(f"expected a stroke-3 array of shape (N, 3), got {a.shape}")
    return a


# --------------------------------------------------------------------------- #
# stroke-3 <-> stroke-5
# --------------------------------------------------------------------------- #
def stroke3_to_stroke5(s3: np.ndarray, max_len: int | None = None) -> np.ndarray:
    """Convert stroke-3 to stroke-5, appending the end-of-sketch row.

    Without ``max_len`` the result has ``N + 1`` rows. With ``max_len`` the
    result has exactly ``max_len`` rows: a sketch that is too long keeps its
    first ``max_len - 1`` points (the last kept point gets ``p2 = 1``, the pen
    lifts) followed by the end row; a short one is padded with end rows.
    """
    s3 = _as_stroke3(s3)
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        truncated = s3.shape[0] > max_len - 1
        s3 = s3[: max_len - 1].copy()
        if truncated and s3.shape[0] > 0:
            s3[-1, 2] = 1.0
    n = s3.shape[0]
    rows = n + 1 if max_len is None else max_len
    out = np.zeros((rows, 5), dtype=np.float32)
    out[:n, 0:2] = s3[:, 0:2]
    out[:n, 3] = s3[:, 2]
    out[:n, 2] = 1.0 - s3[:, 2]
    out[n:, 4] = 1.0
    return out


def stroke5_to_stroke3(s5: np.ndarray) -> np.ndarray:
    """Convert stroke-5 to stroke-3, stopping at the first end-of-sketch row.

    The pen state of a row is the arg-max of ``(p1, p2, p3)`` so that soft or
    sampled outputs convert too; the first row whose arg-max is ``p3`` ends the
    sketch (it and everything after it is dropped).
    """
    a = np.asarray(s5, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != 5:
        raise ValueError(f"expected a stroke-5 array of shape (N, 5), got {a.shape}")
    state = np.argmax(a[:, 2:5], axis=1)
    ends = np.flatnonzero(state == 2)
    n = int(ends[0]) if ends.size else a.shape[0]
    out = np.zeros((n, 3), dtype=np.float32)
    out[:, 0:2] = a[:n, 0:2]
    out[:, 2] = (state[:n] == 1).astype(np.float32)
    return out


def pad_stroke5(batch: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch of sketches into one stroke-5 tensor for sequence models.

    Items may be stroke-3 ``(N, 3)`` or stroke-5 ``(N, 5)`` arrays.

    Returns ``(x, lengths)``:

    * ``x``: float32 ``(B, max_len + 1, 5)``. Row 0 of every item is the
      start-of-sequence token ``(0, 0, 1, 0, 0)``; rows ``1 .. max_len`` hold
      the sketch as returned by ``stroke3_to_stroke5(s3, max_len)`` (truncated
      and padded with end rows ``(0, 0, 0, 0, 1)``). For teacher forcing use
      ``x[:, :-1]`` as decoder inputs and ``x[:, 1:]`` as targets.
    * ``lengths``: int64 ``(B,)``, the number of real target rows including
      the end row, i.e. ``min(N + 1, max_len)``. ``stroke5_mask(lengths,
      max_len)`` marks those rows of ``x[:, 1:]``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.empty((len(batch), max_len + 1, 5), dtype=np.float32)
    lengths = np.empty((len(batch),), dtype=np.int64)
    for i, s in enumerate(batch):
        a = np.asarray(s, dtype=np.float32)
        if a.ndim == 2 and a.shape[1] == 5:
            a = stroke5_to_stroke3(a)
        a = _as_stroke3(a)
        out[i, 0] = SOS_ROW
        out[i, 1:] = stroke3_to_stroke5(a, max_len)
        lengths[i] = min(a.shape[0] + 1, max_len)
    return out, lengths


def stroke5_mask(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Boolean ``(B, max_len)`` mask, True for the real rows (``t < lengths[b]``).

    It lines up with the targets ``x[:, 1:]`` of ``pad_stroke5``.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    return np.arange(max_len, dtype=np.int64)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------- #
# stroke-3 <-> polylines
# --------------------------------------------------------------------------- #
def stroke3_to_polylines(s3: np.ndarray) -> list[np.ndarray]:
    """Split a stroke-3 sketch into absolute float32 ``(k, 2)`` polylines, one per stroke.

    A trailing stroke whose last point has ``p = 0`` is kept as a stroke.
    """
    s3 = _as_stroke3(s3)
    if s3.shape[0] == 0:
        return []
    pts = np.cumsum(s3[:, 0:2].astype(np.float64), axis=0).astype(np.float32)
    ends = np.flatnonzero(s3[:, 2] > 0.5) + 1
    if ends.size == 0 or ends[-1] != s3.shape[0]:
        ends = np.append(ends, s3.shape[0])
    starts = np.concatenate([[0], ends[:-1]])
    return [pts[a:b] for a, b in zip(starts, ends) if b > a]


def polylines_to_stroke3(polylines: Sequence[np.ndarray]) -> np.ndarray:
    """Join absolute ``(k, 2)`` polylines into one stroke-3 sketch (empty ones skipped)."""
    parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polylines]
    parts = [p for p in parts if p.shape[0] > 0]
    if not parts:
        return np.zeros((0, 3), dtype=np.float32)
    pts = np.concatenate(parts, axis=0)
    out = np.zeros((pts.shape[0], 3), dtype=np.float32)
    out[0, 0:2] = pts[0]
    out[1:, 0:2] = np.diff(pts, axis=0)
    ends = np.cumsum([p.shape[0] for p in parts]) - 1
    out[ends, 2] = 1.0
    return out


# --------------------------------------------------------------------------- #
# simplification and normalisation
# --------------------------------------------------------------------------- #
def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances of points ``p`` (k, 2) to the segment ``a``-``b``."""
    ab = b - a
    ap = p - a
    denom = ab[0] * ab[0] + ab[1] * ab[1]
    if denom > 0.0:
        t = (ap[:, 0] * ab[0] + ap[:, 1] * ab[1]) / denom
        np.minimum(np.maximum(t, 0.0, out=t), 1.0, out=t)
        ap = ap - t[:, None] * ab
    return np.sqrt(ap[:, 0] * ap[:, 0] + ap[:, 1] * ap[:, 1])


def rdp(points: np.ndarray, epsilon: float) -> np.ndarray:
    """Ramer–Douglas–Peucker simplification of one polyline ``(k, 2)``.

    Keeps both endpoints; every dropped point lies within ``epsilon`` of the
    simplified polyline (distance to the kept *segment*, so closed loops work).
    Iterative (explicit stack), vectorised per segment.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"expected points of shape (k, 2), got {pts.shape}")
    n = pts.shape[0]
    if n <= 2 or epsilon <= 0:
        return pts.copy()
    p64 = pts.astype(np.float64)
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        d = _point_segment_distance(p64[i + 1 : j], p64[i], p64[j])
        k = int(np.argmax(d))
        if d[k] > epsilon:
            m = i + 1 + k
            keep[m] = True
            stack.append((i, m))
            stack.append((m, j))
    return pts[keep].copy()


def simplify_stroke3(s3: np.ndarray, epsilon: float) -> np.ndarray:
    """Apply ``rdp`` to every stroke of a stroke-3 sketch."""
    return polylines_to_stroke3([rdp(p, epsilon) for p in stroke3_to_polylines(s3)])


def normalise_stroke3(s3: np.ndarray, target_size: float = 1.0) -> np.ndarray:
    """Scale a sketch so the longer side of its bounding box equals ``target_size``.

    Only offsets are scaled (about the origin), so the aspect ratio is kept. A
    sketch with a zero-size bounding box (or no points) is returned unchanged.
    """
    s3 = _as_stroke3(s3).copy()
    if s3.shape[0] == 0:
        return s3
    pts = np.cumsum(s3[:, 0:2].astype(np.float64), axis=0)
    extent = float(np.max(pts.max(axis=0) - pts.min(axis=0)))
    if not math.isfinite(extent) or extent <= 0.0:
        return s3
    s3[:, 0:2] = (s3[:, 0:2].astype(np.float64) * (target_size / extent)).astype(np.float32)
    return s3


def stroke3_offset_std(sketches: Sequence[np.ndarray]) -> float:
    """Standard deviation of all ``dx`` and ``dy`` values of a set of sketches (pooled).

    Used to scale offsets for the sequential generator (sketch-rnn style).
    Returns 1.0 when there are no offsets or they are all equal.
    """
    offs = [_as_stroke3(s)[:, 0:2].reshape(-1) for s in sketches]
    offs = [o for o in offs if o.size]
    if not offs:
        return 1.0
    std = float(np.std(np.concatenate(offs).astype(np.float64)))
    return std if std > 0 and math.isfinite(std) else 1.0


def validate_stroke3(s3: np.ndarray, source: str) -> np.ndarray:
    """Check a stroke-3 sketch and return it as float32; ``ValueError`` naming ``source`` otherwise.

    Checks: 2-D with 3 columns, at least one point, finite values, pen in {0, 1}.
    """
    try:
        a = np.asarray(s3, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: strokes are not a numeric array ({exc})") from exc
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{source}: stroke-3 must have shape (N, 3), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{source}: empty sketch (no points)")
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{source}: non-finite value (NaN/inf) in row {row}")
    pen_ok = (a[:, 2] == 0) | (a[:, 2] == 1)
    if not pen_ok.all():
        row = int(np.flatnonzero(~pen_ok)[0])
        raise ValueError(f"{source}: pen value {a[row, 2]!r} in row {row} is not 0 or 1")
    return a


# --------------------------------------------------------------------------- #
# rasterisation
# --------------------------------------------------------------------------- #
# Why hand-written: PIL's ImageDraw draws aliased lines of integer width only,
# its antialiasing depends on supersampling tricks, and it works one image at a
# time; no library we can use does batched, exact-coverage rasterisation of
# polylines. Real and generated sketches must go through exactly the same
# function (METHOD.md, "Rasterisation"), so we own it: coverage of a pixel is
# computed from the exact distance of its centre to every line segment.
#
# Algorithm: the canvas is cut into square tiles; a (segment, tile) pair is
# kept only if the segment passes within reach of the tile (distance from the
# tile centre <= half-diagonal + line radius + 0.5), and for the kept pairs the
# distance of each pixel centre in the tile to the segment is evaluated; a
# scatter-max writes the coverage into the batch of images. Work is thus
# proportional to the inked area, and pairs are processed in chunks to bound
# memory.

_TILE = 8
_CHUNK_ELEMS = 1 << 21  # pixel evaluations per chunk (~8 MB per float32 temporary)
# Intra-op threads: the rasteriser runs on one torch thread by default. Its tensors are
# modest and callers parallelise across processes (data loaders, Ray workers); on a busy
# machine every multi-threaded op can wait a whole scheduler time slice for a descheduled
# OpenMP worker (measured on 2 shared cores: 5 sketches at 32 px took 140 ms with 2 threads,
# 2 ms with one; 256 sketches at 256 px took 2.6 s with 2 threads, 0.5 s with one).


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sketch_segments(
    s3: np.ndarray, size: int, padding: float
) -> np.ndarray:
    """Segments (M, 4) in pixel coordinates (x0, y0, x1, y1) of one fitted sketch."""
    s3 = _as_stroke3(s3)
    n = s3.shape[0]
    if n == 0:
        return np.zeros((0, 4), dtype=np.float64)
    pts = np.cumsum(s3[:, 0:2].astype(np.float64), axis=0)
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        raise ValueError("cannot rasterise a sketch with non-finite coordinates")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float(np.max(hi - lo))
    avail = size * (1.0 - 2.0 * padding)
    scale = avail / extent if extent > 0 else 1.0
    centre = (lo + hi) / 2.0
    pix = (pts - centre) * scale + size / 2.0

    lift = s3[:, 2] > 0.5
    # segment i -> i+1 exists when the pen stays down after point i
    seg_idx = np.flatnonzero(~lift[:-1])
    segs = [np.concatenate([pix[seg_idx], pix[seg_idx + 1]], axis=1)]
    # single-point strokes: start of a stroke that is also its end -> a dot
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = lift[:-1]
    is_end = lift.copy()
    is_end[-1] = True
    dots = np.flatnonzero(is_start & is_end)
    segs.append(np.concatenate([pix[dots], pix[dots]], axis=1))
    return np.concatenate(segs, axis=0)


def rasterise(
    sketches: Sequence[np.ndarray],
    size: int = 32,
    line_width: float = 1.0,
    padding: float = 0.1,
    *,
    num_threads: int | None = 1,
) -> np.ndarray:
    """Render stroke-3 sketches to anti-aliased ink images, float32 ``(B, size, size)`` in [0, 1].

    1 means ink. Each sketch's bounding box is fitted into the canvas minus
    ``padding * size`` on every side, aspect ratio kept, centred; ``y`` grows
    downwards (row index). ``line_width`` is in output pixels. Coverage of a
    pixel = ``clip(line_width / 2 + 0.5 - d, 0, 1)`` where ``d`` is the exact
    distance of the pixel centre to the nearest segment. Single-point strokes
    draw a dot; an empty sketch gives a blank image.

    ``num_threads``: torch intra-op threads used meanwhile (restored after);
    None keeps the caller's ``torch.get_num_threads()``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 0.0 <= padding < 0.5:
        raise ValueError(f"padding must be in [0, 0.5), got {padding}")
    if line_width <= 0:
        raise ValueError(f"line_width must be > 0, got {line_width}")
    b = len(sketches)
    if b == 0:
        return np.zeros((0, size, size), dtype=np.float32)

    seg_list, owner_list = [], []
    for i, s in enumerate(sketches):
        segs = _sketch_segments(s, size, padding)
        seg_list.append(segs)
        owner_list.append(np.full(segs.shape[0], i, dtype=np.int64))
    segs_np = np.concatenate(seg_list, axis=0)
    owner_np = np.concatenate(owner_list, axis=0)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    with _torch_threads(threads), torch.no_grad():
        return _rasterise_segments(segs_np, owner_np, b, size, line_width)


def _rasterise_segments(
    segs_np: np.ndarray, owner_np: np.ndarray, b: int, size: int, line_width: float
) -> np.ndarray:
    """Coverage images (b, size, size) of pixel-space segments owned by sketch indices."""
    nt = -(-size // _TILE)  # tiles per side
    side = nt * _TILE  # padded canvas side
    canvas = torch.zeros(b * side * side, dtype=torch.float32)
    if segs_np.shape[0] == 0:
        return np.zeros((b, size, size), dtype=np.float32)

    radius = line_width / 2.0 + 0.5  # coverage > 0 only within this distance
    segs_t = torch.from_numpy(segs_np.astype(np.float32))
    owner_t = torch.from_numpy(owner_np)

    # tile centres (T, 2) and tile origins
    ty, tx = torch.meshgrid(torch.arange(nt), torch.arange(nt), indexing="ij")
    tile_org = torch.stack([tx.reshape(-1), ty.reshape(-1)], dim=1).float() * _TILE
    tile_ctr = tile_org + _TILE / 2.0
    reach = _TILE * math.sqrt(2.0) / 2.0 + radius
    # pixel centre offsets inside a tile (P, 2) and flat in-tile offsets
    py, px = torch.meshgrid(torch.arange(_TILE), torch.arange(_TILE), indexing="ij")
    pix_off = torch.stack([px.reshape(-1), py.reshape(-1)], dim=1).float() + 0.5
    pix_flat = (py * side + px).reshape(-1)
    n_tiles = tile_ctr.shape[0]
    n_pix = pix_off.shape[0]

    def seg_dist(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # p (..., 2) points, s (..., 4) segments broadcastable -> distances (...)
        a = s[..., 0:2]
        ab = s[..., 2:4] - a
        ap = p - a
        denom = (ab * ab).sum(-1)
        t = torch.where(denom > 0, (ap * ab).sum(-1) / denom.clamp_min(1e-12), torch.zeros_like(denom))
        t = t.clamp(0.0, 1.0)
        d = ap - t.unsqueeze(-1) * ab
        return torch.sqrt((d * d).sum(-1))

    seg_chunk = max(1, _CHUNK_ELEMS // max(n_tiles, 1))
    pair_chunk = max(1, _CHUNK_ELEMS // n_pix)
    for s0 in range(0, segs_t.shape[0], seg_chunk):
        sc = segs_t[s0 : s0 + seg_chunk]
        # cheap bounding-box cull, then exact segment-to-tile-centre distance
        lo = torch.minimum(sc[:, 0:2], sc[:, 2:4]) - reach
        hi = torch.maximum(sc[:, 0:2], sc[:, 2:4]) + reach
        inside = (
            (tile_ctr[None, :, 0] >= lo[:, None, 0])
            & (tile_ctr[None, :, 0] <= hi[:, None, 0])
            & (tile_ctr[None, :, 1] >= lo[:, None, 1])
            & (tile_ctr[None, :, 1] <= hi[:, None, 1])
        )
        si, ti = torch.nonzero(inside, as_tuple=True)
        if si.numel() == 0:
            continue
        near = seg_dist(tile_ctr[ti], sc[si]) <= reach
        si, ti = si[near], ti[near]
        for p0 in range(0, si.numel(), pair_chunk):
            psi = si[p0 : p0 + pair_chunk]
            pti = ti[p0 : p0 + pair_chunk]
            pts = tile_org[pti][:, None, :] + pix_off[None, :, :]  # (K, P, 2)
            d = seg_dist(pts, sc[psi][:, None, :])
            cov = (radius - d).clamp(0.0, 1.0)
            org = tile_org[pti].long()
            base = owner_t[s0 + psi] * (side * side) + org[:, 1] * side + org[:, 0]
            idx = (base[:, None] + pix_flat[None, :]).reshape(-1)
            canvas.scatter_reduce_(0, idx, cov.reshape(-1), reduce="amax", include_self=True)

    out = canvas.reshape(b, side, side)[:, :size, :size]
    return out.numpy().astype(np.float32, copy=True)


def render_to_uint8_rgb(ink: np.ndarray) -> np.ndarray:
    """Black strokes on white: ink ``(..., H, W)`` in [0, 1] -> uint8 ``(..., H, W, 3)``."""
    a = np.clip(np.asarray(ink, dtype=np.float32), 0.0, 1.0)
    grey = np.round(255.0 * (1.0 - a)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
