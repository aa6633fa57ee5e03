"""The embedded procedural dataset: photos and sketches generated from a seed.

It lets the whole pipeline run with no download. Every instance is a
parametric vector object (a list of polylines in a unit frame, some of them
closed and filled) whose shape parameters are continuous, so two instances of
one class differ in fine detail and instance-level (fine-grained) retrieval is
possible but not trivial.

* **Photos** render the instance geometry as filled colour regions (colours
  drawn per instance, class-typical but varied) with shading along a random
  light direction, texture noise, a cluttered background (random gradient and
  random shapes, some occluding the object) and a small affine jitter; drawn
  at 3x supersampling with PIL and downsampled with an antialiasing filter.
* **Sketches** draw the same geometry as stroke-3 with human-like
  abstraction: wobbly, jittered lines, RDP simplification, dropped parts and
  occasional extra strokes, split loops, overshoot, a slight global affine
  distortion. Stroke order, start and direction are canonical by default
  (``stroke_order="canonical"``: essential parts first in the class template's
  order, closed outlines from their top-left point clockwise, open strokes from
  their left/top end), the way people draw a familiar object, so a generator can
  learn them from the photo; ``"random"`` shuffles all three. Rendered by
  :func:`sbir.strokes.rasterise` (the one rasteriser of the project).

Splits are by instance (``split`` = "train"/"test"). Every sketch carries the
``photo_id`` of the photo it was drawn from (pairing is a fact of the data).
Among train instances a share ``labelled_share`` is ``labelled``: the
fine-grained pairs a semi-supervised method may use. The other train photos
form the unlabelled photo pool; their sketches stay in the table for
category-level training and for the fully supervised upper bound, unless
``SyntheticConfig.unlabelled_sketches`` is False (then they are not drawn).
Test photos are never ``labelled`` (no test pair is used for training).

Determinism: every class draws from its own RNG stream derived from the seed
and a checksum of the class name, and every instance from a stream derived
from (seed, class, split, index), so the same config gives byte-identical
output and changing one count does not change other instances.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sbir.strokes import polylines_to_stroke3, rasterise, rdp

__all__ = [
    "CLASS_NAMES",
    "SyntheticConfig",
    "PhotoRecord",
    "SketchRecord",
    "SyntheticDataset",
    "Part",
    "generate",
    "instance_geometry",
    "render_photo",
    "draw_sketch",
    "preview_grid",
]

_TAU = 2.0 * math.pi
_SUPERSAMPLE = 3
_SKETCH_FRAME = 256.0  # sketches are stored in a 256-unit, y-down frame (like QuickDraw / QMUL)


# =========================================================================== #
# config and records
# =========================================================================== #
@dataclass
class SyntheticConfig:
    """Parameters of the procedural dataset (see module docstring)."""

    seed: int = 0
    num_classes: int = 12
    train_instances_per_class: int = 100
    test_instances_per_class: int = 30
    photo_size: int = 32
    sketch_size: int = 32
    sketches_per_photo: int = 1
    labelled_share: float = 0.2
    line_width: float = 1.0
    clutter: float = 1.0
    #: "canonical" (a fixed drawing order, start and direction per part) or "random" (see the module docstring)
    stroke_order: str = "canonical"
    #: draw sketches for the unlabelled train photos too (kept with their photo_id)
    unlabelled_sketches: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig.{name} {what}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        need(is_int(self.seed) and self.seed >= 0, "seed", "must be a non-negative integer")
        need(
            is_int(self.num_classes) and 1 <= self.num_classes <= len(CLASS_NAMES),
            "num_classes",
            f"must be an integer in [1, {len(CLASS_NAMES)}]",
        )
        need(
            is_int(self.train_instances_per_class) and self.train_instances_per_class >= 1,
            "train_instances_per_class",
            "must be an integer >= 1",
        )
        need(
            is_int(self.test_instances_per_class) and self.test_instances_per_class >= 0,
            "test_instances_per_class",
            "must be an integer >= 0",
        )
        for name in ("photo_size", "sketch_size"):
            v = getattr(self, name)
            need(is_int(v) and 8 <= v <= 1024, name, "must be an integer in [8, 1024]")
        need(
            is_int(self.sketches_per_photo) and self.sketches_per_photo >= 1,
            "sketches_per_photo",
            "must be an integer >= 1",
        )
        need(
            is_num(self.labelled_share) and 0.0 <= self.labelled_share <= 1.0,
            "labelled_share",
            "must be a number in [0, 1]",
        )
        need(
            is_num(self.line_width) and 0.0 < self.line_width <= 32.0,
            "line_width",
            "must be a number in (0, 32]",
        )
        need(
            is_num(self.clutter) and 0.0 <= self.clutter <= 10.0,
            "clutter",
            "must be a number in [0, 10]",
        )
        need(isinstance(self.unlabelled_sketches, bool), "unlabelled_sketches", "must be a bool")
        need(self.stroke_order in ("canonical", "random"), "stroke_order", 'must be "canonical" or "random"')


@dataclass
class PhotoRecord:
    id: str
    class_name: str
    label: int
    split: str
    labelled: bool
    image: np.ndarray  # uint8 (H, W, 3)


@dataclass
class SketchRecord:
    id: str
    photo_id: str | None
    class_name: str
    label: int
    split: str
    strokes: np.ndarray  # float32 stroke-3 (N, 3), 256-unit y-down frame
    image: np.ndarray  # uint8 (H, W), black ink on white, from sbir.strokes.rasterise


@dataclass
class SyntheticDataset:
    class_names: list[str]
    photos: list[PhotoRecord]
    sketches: list[SketchRecord]
    config: SyntheticConfig = field(default_factory=SyntheticConfig)


# =========================================================================== #
# geometry
# =========================================================================== #
@dataclass
class Part:
    """One polyline of an instance, in a y-up unit frame.

    ``closed`` parts are loops (the first point is not repeated); ``filled``
    closed parts are painted in photos, open parts are drawn as thick lines of
    ``width`` (unit frame). ``role`` picks the colour; ``essential`` parts are
    never dropped from sketches. Parts are listed back to front.
    """

    points: np.ndarray
    closed: bool = True
    filled: bool = True
    role: str = "body"
    width: float = 0.05
    essential: bool = False


def _ellipse(cx, cy, rx, ry, n=32, a0=0.0, a1=_TAU, rot=0.0, endpoint=False) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=endpoint)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _rect(cx, cy, w, h) -> np.ndarray:
    return np.array(
        [[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2], [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]]
    )


def _poly(*pts) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64)


def _rotate(pts: np.ndarray, angle: float, centre=(0.0, 0.0)) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    p = pts - centre
    return np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], axis=1) + centre


def _bezier(p0, p1, p2, n=16) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = map(np.asarray, (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _wave(x0, x1, y, amp, cycles, n=24, phase=0.0) -> np.ndarray:
    x = np.linspace(x0, x1, n)
    return np.stack([x, y + amp * np.sin(phase + cycles * _TAU * (x - x0) / max(x1 - x0, 1e-9))], axis=1)


def _house(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    w, h = u(0.9, 1.6), u(0.55, 1.0)
    rh, over, peak = u(0.3, 0.8), u(0.0, 0.15), u(-0.15, 0.15) * w
    parts: list[Part] = []
    left, right = -w / 2 - over, w / 2 + over

    def roof_y(x: float) -> float:
        if x <= peak:
            return h + rh * (x - left) / (peak - left)
        return h + rh * (right - x) / (right - peak)

    if rng.random() < 0.6:
        side = rng.choice([-1.0, 1.0])
        cx = side * u(0.15, 0.32) * w
        cw = u(0.08, 0.16)
        top = roof_y(cx) + u(0.1, 0.3)
        base = min(roof_y(cx - cw / 2), roof_y(cx + cw / 2)) - 0.05
        parts.append(Part(_rect(cx, (top + base) / 2, cw, top - base), role="chimney"))
    parts.append(Part(_rect(0, h / 2, w, h), role="wall", essential=True))
    parts.append(Part(_poly((left, h), (right, h), (peak, h + rh)), role="roof", essential=True))
    dw, dh, dx = u(0.15, 0.28) * w, u(0.35, 0.65) * h, u(-0.3, 0.3) * w
    parts.append(Part(_rect(dx, dh / 2, dw, dh), role="door"))
    if rng.random() < 0.5:
        parts.append(Part(_ellipse(dx + dw * 0.3, dh * 0.5, 0.02, 0.02, n=6), role="knob"))
    n_win = int(rng.integers(1, 4))
    ws = u(0.14, 0.22) * min(w, h * 1.3)
    wy = u(0.62, 0.78) * h
    slots = np.linspace(-w / 2 + ws, w / 2 - ws, n_win) if n_win > 1 else np.array([-dx * 0.8])
    cross = rng.random() < 0.5
    for sx in slots:
        parts.append(Part(_rect(sx, wy, ws, ws * u(0.9, 1.3)), role="window"))
        if cross:
            parts.append(Part(_poly((sx - ws / 2, wy), (sx + ws / 2, wy)), closed=False, filled=False, role="frame", width=0.025))
    return parts


def _tree(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    tw, th, taper = u(0.12, 0.3), u(0.4, 0.9), u(0.55, 1.0)
    trunk = _poly((-tw / 2, 0), (tw / 2, 0), (tw * taper / 2, th), (-tw * taper / 2, th))
    parts = [Part(trunk, role="trunk", essential=True)]
    if rng.random() < 0.55:  # round, bumpy crown
        r, asp = u(0.45, 0.75), u(0.75, 1.3)
        lobes, amp, ph = int(rng.integers(5, 10)), u(0.03, 0.12), u(0, _TAU)
        t = np.linspace(0, _TAU, 72, endpoint=False)
        rad = r * (1 + amp * np.abs(np.sin(lobes * t / 2 + ph)) * 2 - amp)
        cy = th + r * asp * 0.8
        crown = np.stack([rad * np.cos(t), cy + asp * rad * np.sin(t)], axis=1)
        parts.append(Part(crown, role="leaves", essential=True))
        for _ in range(int(rng.integers(0, 5))):
            a, d = u(0, _TAU), u(0, 0.6) * r
            parts.append(Part(_ellipse(d * math.cos(a), cy + asp * d * math.sin(a), 0.04, 0.04, n=8), role="fruit"))
    else:  # pine: stacked triangles
        layers = int(rng.integers(2, 5))
        width, lh = u(0.9, 1.4), u(0.35, 0.6)
        y = th * 0.8
        for i in range(layers):
            wi = width * (1 - 0.7 * i / layers)
            parts.append(Part(_poly((-wi / 2, y), (wi / 2, y), (u(-0.05, 0.05), y + lh)), role="leaves", essential=i == 0))
            y += lh * u(0.45, 0.7)
    return parts


def _fish(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    rx, ry, nose = u(0.5, 0.8), u(0.2, 0.42), u(-0.25, 0.25)
    t = np.linspace(0, _TAU, 48, endpoint=False)
    body = np.stack([rx * np.cos(t), ry * np.sin(t) * (1 + nose * np.cos(t))], axis=1)
    tl, tw, fork = u(0.25, 0.5), u(0.18, 0.4), u(0.4, 0.9)
    tail = _poly((-rx * 0.85, 0), (-rx - tl, tw), (-rx - tl * fork, 0), (-rx - tl, -tw))
    fx, fh = u(-0.3, 0.2) * rx, u(0.12, 0.35)
    top = ry * (1 + nose * fx / rx) * math.sqrt(max(1 - (fx / rx) ** 2, 0.05))
    fin = _poly((fx - 0.18, top * 0.9), (fx + 0.15, top * 0.9), (fx - 0.2 + u(-0.1, 0.1), top + fh))
    parts = [Part(fin, role="fin"), Part(tail, role="fin", essential=True), Part(body, role="body", essential=True)]
    ex, ey = rx * u(0.4, 0.65), ry * u(0.1, 0.4)
    parts.append(Part(_ellipse(ex, ey, *(2 * [u(0.045, 0.09)]), n=12), role="eye"))
    for _ in range(int(rng.integers(0, 4))):
        sx = u(-0.5, 0.3) * rx
        hh = ry * math.sqrt(max(1 - (sx / rx) ** 2, 0.05)) * 0.85
        bend = u(-0.1, 0.1)
        parts.append(Part(_bezier((sx, hh), (sx + bend, 0), (sx, -hh), 10), closed=False, filled=False, role="stripe", width=0.05))
    if rng.random() < 0.5:
        parts.append(Part(_poly((rx * 0.95, -0.02), (rx * 0.75, -ry * 0.2)), closed=False, filled=False, role="stripe", width=0.03))
    return parts


def _star(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    n, inner, rot = int(rng.integers(5, 9)), u(0.32, 0.62), u(-0.4, 0.4)
    k = np.arange(2 * n)
    rad = np.where(k % 2 == 0, 1.0, inner) * rng.uniform(0.88, 1.12, 2 * n)
    ang = math.pi / 2 + rot + k * math.pi / n
    parts = [Part(np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1), role="star", essential=True)]
    if rng.random() < 0.35:
        parts.append(Part(_ellipse(0, 0, inner * 0.45, inner * 0.45, n=16), role="centre"))
    if rng.random() < 0.35:
        for j in range(int(rng.integers(1, 4))):
            a = u(0, _TAU)
            parts.append(
                Part(_poly((1.1 * math.cos(a), 1.1 * math.sin(a)), (1.35 * math.cos(a), 1.35 * math.sin(a))), closed=False, filled=False, role="spark", width=0.05)
            )
    return parts


def _cup(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    tw, h = u(0.7, 1.1), u(0.7, 1.2)
    bw = tw * u(0.6, 1.0)
    parts: list[Part] = []
    if rng.random() < 0.5:
        parts.append(Part(_ellipse(0, 0, tw * u(0.65, 0.9), u(0.06, 0.12), n=24), role="saucer"))
    hy, hry, hrx = h * u(0.35, 0.65), h * u(0.18, 0.3), u(0.15, 0.3)
    xr = (bw + (tw - bw) * hy / h) / 2
    handle = _ellipse(xr - 0.02, hy, hrx, hry, n=16, a0=-math.pi / 2, a1=math.pi / 2, endpoint=True)
    parts.append(Part(handle, closed=False, filled=False, role="handle", width=u(0.05, 0.1), essential=True))
    parts.append(Part(_poly((-bw / 2, 0), (bw / 2, 0), (tw / 2, h), (-tw / 2, h)), role="cup", essential=True))
    if rng.random() < 0.7:
        parts.append(Part(_ellipse(0, h, tw / 2, u(0.04, 0.1), n=24), role="drink"))
    for _ in range(int(rng.integers(0, 4))):
        x = u(-0.3, 0.3) * tw
        y = np.linspace(h + 0.12, h + u(0.4, 0.7), 12)
        parts.append(Part(np.stack([x + u(0.03, 0.07) * np.sin(u(0, _TAU) + 9 * y), y], 1), closed=False, filled=False, role="steam", width=0.03))
    return parts


def _key(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    length, r, t = u(1.3, 1.9), u(0.25, 0.42), u(0.08, 0.15)
    bx = -length / 2
    kind = rng.integers(0, 3)
    if kind == 0:
        bow = _ellipse(bx, 0, r, r * u(0.8, 1.1), n=32)
    elif kind == 1:
        a = np.linspace(0, _TAU, 48, endpoint=False)
        rr = r * (0.8 + 0.2 * np.cos(3 * a))
        bow = np.stack([bx + rr * np.cos(a), rr * np.sin(a)], 1)
    else:
        bow = _rotate(_rect(bx, 0, 2 * r, 2 * r * u(0.8, 1.1)), u(-0.2, 0.2) + (math.pi / 4) * (rng.random() < 0.5), (bx, 0))
    x0 = bx + r * 0.8
    shaft = _rect((x0 + length / 2) / 2, 0, length / 2 - x0, t)
    parts = [Part(shaft, role="metal", essential=True), Part(bow, role="metal", essential=True)]
    parts.append(Part(_ellipse(bx - r * u(0, 0.3), 0, r * u(0.28, 0.5), r * u(0.28, 0.5), n=16), role="hole"))
    n_teeth = int(rng.integers(2, 5))
    xs = np.sort(u(length * 0.05, length / 2 - 0.06, n_teeth))
    for x in xs:
        tw_, th_ = u(0.06, 0.12), u(0.08, 0.25)
        parts.append(Part(_rect(x, -t / 2 - th_ / 2 + 0.01, tw_, th_ + 0.02), role="metal"))
    return parts


def _car(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    length, bh, wr = u(1.6, 2.1), u(0.3, 0.5), u(0.16, 0.27)
    base = wr * 0.9
    front, back = u(0.0, 0.2), u(0.0, 0.12)
    body = _poly(
        (-length / 2, base), (length / 2, base), (length / 2, base + bh * u(0.6, 0.9)), (length / 2 - front, base + bh),
        (-length / 2 + back, base + bh), (-length / 2, base + bh * u(0.7, 1.0)),
    )
    c0, c1 = -length / 2 + u(0.15, 0.45), length / 2 - u(0.35, 0.7)
    ch, sb, sf = u(0.28, 0.5), u(0.05, 0.25), u(0.1, 0.35)
    top = base + bh
    cabin = _poly((c0, top), (c1, top), (c1 - sf, top + ch), (c0 + sb, top + ch))
    parts = [Part(cabin, role="body", essential=True), Part(body, role="body", essential=True)]
    ins = 0.05
    wx0, wx1, wy0, wy1 = c0 + sb * 0.7 + ins, c1 - sf * 0.7 - ins, top + ins, top + ch - ins
    if rng.random() < 0.5:
        parts.append(Part(_poly((wx0 - sb * 0.3, wy0), (wx1 + sf * 0.3, wy0), (wx1, wy1), (wx0, wy1)), role="window"))
    else:
        mid = (wx0 + wx1) / 2 + u(-0.1, 0.1)
        parts.append(Part(_poly((wx0 - sb * 0.3, wy0), (mid - 0.03, wy0), (mid - 0.03, wy1), (wx0, wy1)), role="window"))
        parts.append(Part(_poly((mid + 0.03, wy0), (wx1 + sf * 0.3, wy0), (wx1, wy1), (mid + 0.03, wy1)), role="window"))
    for sx in (-1, 1):
        x = sx * length * u(0.26, 0.36)
        parts.append(Part(_ellipse(x, wr, wr, wr, n=24), role="wheel", essential=True))
        parts.append(Part(_ellipse(x, wr, wr * 0.45, wr * 0.45, n=12), role="hub"))
    parts.append(Part(_rect(length / 2 - 0.06, base + bh * 0.45, 0.08, u(0.06, 0.12)), role="light"))
    return parts


def _boat(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    length, d = u(1.4, 2.0), u(0.2, 0.42)
    bot = length * u(0.45, 0.8)
    shift = u(-0.15, 0.15)
    hull = _poly((-length / 2, 0), (length / 2, 0), (bot / 2 + shift, -d), (-bot / 2 + shift, -d))
    mx, mh = u(-0.25, 0.2), u(0.8, 1.4)
    parts = []
    sail_back = u(0.35, 0.75)
    parts.append(Part(_poly((mx - 0.02, 0.08), (mx - sail_back, 0.08 + u(0, 0.1)), (mx - 0.02, mh * u(0.85, 0.98))), role="sail", essential=True))
    if rng.random() < 0.6:
        parts.append(Part(_poly((mx + 0.03, 0.08), (mx + u(0.3, 0.6), 0.08), (mx + 0.03, mh * u(0.6, 0.9))), role="sail"))
    parts.append(Part(_poly((mx, 0), (mx, mh)), closed=False, filled=False, role="mast", width=0.05, essential=True))
    if rng.random() < 0.5:
        fl = u(0.12, 0.25)
        parts.append(Part(_poly((mx, mh), (mx + fl, mh - 0.06), (mx, mh - 0.12)), role="flag"))
    parts.append(Part(hull, role="hull", essential=True))
    for i in range(int(rng.integers(0, 4))):
        parts.append(Part(_ellipse(-length * 0.25 + i * 0.2, -d * 0.45, 0.04, 0.04, n=10), role="porthole"))
    if rng.random() < 0.5:
        parts.append(Part(_wave(-length / 2 - 0.1, length / 2 + 0.1, -d - 0.08, u(0.02, 0.05), int(rng.integers(3, 7))), closed=False, filled=False, role="water", width=0.04))
    return parts


def _umbrella(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    w, h, ribs = u(1.4, 2.0), u(0.4, 0.8), int(rng.integers(3, 7))
    depth = u(0.04, 0.14)
    top = _ellipse(0, 0, w / 2, h, n=40, a0=0, a1=math.pi, endpoint=True)
    xs = np.linspace(-w / 2, w / 2, ribs + 1)
    scal = []
    for a, b in zip(xs[:-1], xs[1:]):
        t = np.linspace(0, 1, 8)[1:]
        scal.append(np.stack([a + (b - a) * t, depth * np.sin(math.pi * t)], 1))
    canopy = np.concatenate([top, *scal], axis=0)[:-1]
    length, hr, hd = u(0.7, 1.1), u(0.08, 0.18), rng.choice([-1.0, 1.0])
    shaft = _poly((0, h + u(0.05, 0.15)), (0, -length))
    a0, a1 = (math.pi, _TAU) if hd > 0 else (0.0, -math.pi)
    hook = _ellipse(hd * hr, -length, hr, hr, n=10, a0=a0, a1=a1, endpoint=True)
    parts = [
        Part(np.concatenate([shaft, hook[1:]], 0), closed=False, filled=False, role="shaft", width=0.05, essential=True),
        Part(canopy, role="canopy", essential=True),
    ]
    if rng.random() < 0.6:
        for x in xs[1:-1]:
            parts.append(Part(_bezier((0, h), (x * 0.6, h * 0.7), (x, 0), 8), closed=False, filled=False, role="rib", width=0.025))
    return parts


def _flower(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    n, pl = int(rng.integers(5, 10)), u(0.32, 0.55)
    pw, cr, rot = u(0.3, 0.6) * pl, u(0.12, 0.22), u(0, _TAU)
    ls, bend = u(0.8, 1.3), u(-0.35, 0.35)
    stem = _bezier((0, 0), (bend, -ls / 2), (u(-0.15, 0.15), -ls), 14)
    parts = [Part(stem, closed=False, filled=False, role="stem", width=0.05, essential=True)]
    for side in rng.permutation([-1.0, 1.0])[: int(rng.integers(0, 3))]:
        j = int(rng.integers(5, 12))
        base = stem[j]
        ang = (math.pi / 4 if side > 0 else 3 * math.pi / 4) + u(-0.3, 0.3)
        ll = u(0.2, 0.35)
        parts.append(Part(_ellipse(base[0] + math.cos(ang) * ll / 2, base[1] + math.sin(ang) * ll / 2, ll / 2, ll * 0.22, n=16, rot=ang), role="leaf"))
    for k in range(n):
        a = rot + k * _TAU / n
        d = cr * 0.6 + pl / 2
        parts.append(Part(_ellipse(d * math.cos(a), d * math.sin(a), pl / 2, pw / 2, n=16, rot=a), role="petal", essential=k == 0))
    parts.append(Part(_ellipse(0, 0, cr, cr, n=20), role="centre", essential=True))
    return parts


def _sun(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    r, n, rl, rot = u(0.35, 0.55), int(rng.integers(7, 15)), u(0.18, 0.45), u(0, _TAU)
    tri = rng.random() < 0.5
    parts = []
    for k in range(n):
        a = rot + k * _TAU / n
        c, s = math.cos(a), math.sin(a)
        g = r + 0.06
        if tri:
            hw = 0.6 * math.pi / n
            parts.append(Part(_poly((g * math.cos(a - hw), g * math.sin(a - hw)), ((g + rl) * c, (g + rl) * s), (g * math.cos(a + hw), g * math.sin(a + hw))), role="ray"))
        else:
            parts.append(Part(_poly((g * c, g * s), ((g + rl) * c, (g + rl) * s)), closed=False, filled=False, role="ray", width=0.05))
    parts.append(Part(_ellipse(0, 0, r, r, n=36), role="disc", essential=True))
    if rng.random() < 0.4:
        e = r * u(0.25, 0.4)
        for sx in (-1, 1):
            parts.append(Part(_ellipse(sx * e, r * 0.25, 0.04, 0.05, n=8), role="face"))
        parts.append(Part(_ellipse(0, 0, r * 0.5, r * 0.45, n=10, a0=math.pi * 1.15, a1=math.pi * 1.85, endpoint=True), closed=False, filled=False, role="face", width=0.03))
    return parts


def _heart(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    t = np.linspace(0, _TAU, 64, endpoint=False)
    sx, sy, cleft, tilt = u(0.8, 1.2), u(0.8, 1.2), u(0.5, 2.0), u(-0.3, 0.3)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - cleft * np.cos(3 * t) - np.cos(4 * t)
    pts = _rotate(np.stack([sx * x, sy * y], 1) / 16.0, tilt)
    parts: list[Part] = []
    arrow = rng.random() < 0.35
    if arrow:
        a = u(-0.5, 0.5)
        p0, p1 = np.array([-1.4, -0.5]), np.array([1.4, 0.6])
        p0, p1 = _rotate(np.stack([p0, p1]), a)
        parts.append(Part(np.stack([p0, p1]), closed=False, filled=False, role="arrow", width=0.05))
    parts.append(Part(pts, role="heart", essential=True))
    if rng.random() < 0.3:
        parts.append(Part(pts * u(0.4, 0.6) + u(-0.1, 0.1, 2), role="inner"))
    if arrow:
        d = (p1 - p0) / np.linalg.norm(p1 - p0)
        nrm = np.array([-d[1], d[0]])
        parts.append(Part(np.stack([p1 + 0.08 * d, p1 - 0.22 * d + 0.12 * nrm, p1 - 0.22 * d - 0.12 * nrm]), role="arrow"))
    return parts


def _lamp(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    bw, bh = u(0.5, 0.9), u(0.06, 0.16)
    sh = u(0.6, 1.0)
    stw = u(0.04, 0.1)
    sb, st, shh = u(0.8, 1.3), u(0.35, 0.8), u(0.4, 0.7)
    parts = [Part(_ellipse(0, bh / 2, bw / 2, bh / 2 + 0.02, n=24), role="base", essential=True)]
    if rng.random() < 0.35:
        kx = u(0.15, 0.35) * rng.choice([-1.0, 1.0])
        stem = _poly((0, bh), (kx, bh + sh * 0.55), (0, bh + sh))
        parts.append(Part(stem, closed=False, filled=False, role="stem", width=stw, essential=True))
    else:
        parts.append(Part(_rect(0, bh + sh / 2, stw, sh), role="stem", essential=True))
    y0 = bh + sh - 0.05
    if rng.random() < 0.5:
        parts.append(Part(_ellipse(0, y0 - 0.02, 0.12, 0.14, n=16), role="bulb"))
    parts.append(Part(_poly((-sb / 2, y0), (sb / 2, y0), (st / 2, y0 + shh), (-st / 2, y0 + shh)), role="shade", essential=True))
    if rng.random() < 0.4:
        cx = sb * u(0.2, 0.4)
        parts.append(Part(_poly((cx, y0), (cx, y0 - u(0.15, 0.3))), closed=False, filled=False, role="chain", width=0.02))
    return parts


def _arrow(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    length, t, hl, hw = u(1.4, 2.0), u(0.06, 0.2), u(0.25, 0.5), u(0.3, 0.65)
    x0, x1 = -length / 2, length / 2 - hl
    barb = u(0.0, 0.15)
    outline = _poly(
        (x0, -t / 2), (x1, -t / 2), (x1 - barb, -hw / 2), (length / 2, 0), (x1 - barb, hw / 2), (x1, t / 2), (x0, t / 2)
    )
    parts = [Part(outline, role="arrow", essential=True)]
    if rng.random() < 0.5:
        fl = u(0.15, 0.3)
        for s in (-1, 1):
            parts.append(Part(_poly((x0, s * t / 2), (x0 + fl, s * t / 2), (x0 + fl * 0.6, s * (t / 2 + u(0.1, 0.2))), (x0 - 0.05, s * (t / 2 + u(0.1, 0.2)))), role="fletch"))
    ang = u(-0.6, 0.6) + (math.pi if rng.random() < 0.5 else 0.0)
    for p in parts:
        p.points = _rotate(p.points, ang)
    return parts


def _bottle(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    w, h, sh = u(0.45, 0.8), u(0.8, 1.3), u(0.1, 0.35)
    nw, nh, ch = w * u(0.25, 0.5), u(0.2, 0.5), u(0.08, 0.18)
    right = np.concatenate([[[w / 2, 0], [w / 2, h]], _bezier((w / 2, h), (w / 2, h + sh), (nw / 2, h + sh), 8)[1:], [[nw / 2, h + sh + nh]]])
    left = right[::-1] * np.array([-1, 1])
    parts = [Part(np.concatenate([right, left]), role="glass", essential=True)]
    if rng.random() < 0.75:
        ly, lh = h * u(0.25, 0.55), h * u(0.2, 0.4)
        parts.append(Part(_rect(0, ly, w * 0.98, lh), role="label"))
    parts.append(Part(_rect(0, h + sh + nh + ch / 2, nw * 1.15, ch), role="cap"))
    return parts


def _mushroom(rng: np.random.Generator) -> list[Part]:
    u = rng.uniform
    rx, ry, sw, sh = u(0.6, 1.0), u(0.35, 0.8), u(0.2, 0.42), u(0.4, 0.9)
    taper = u(0.7, 1.1)
    parts = [Part(_poly((-sw / 2, 0), (sw / 2, 0), (sw * taper / 2, sh + 0.05), (-sw * taper / 2, sh + 0.05)), role="stem", essential=True)]
    top = _ellipse(0, sh, rx, ry, n=40, a0=0, a1=math.pi, endpoint=True)
    sag = u(-0.05, 0.12)
    bottom = _bezier((-rx, sh), (0, sh - sag), (rx, sh), 10)[1:-1]
    parts.append(Part(np.concatenate([top, bottom]), role="cap", essential=True))
    for _ in range(int(rng.integers(0, 6))):
        a, d = u(0.2, math.pi - 0.2), u(0.2, 0.75)
        r = u(0.05, 0.11)
        parts.append(Part(_ellipse(d * rx * math.cos(a), sh + d * ry * math.sin(a), r, r * u(0.7, 1.0), n=12), role="spot"))
    if rng.random() < 0.3:
        for k in range(int(rng.integers(2, 5))):
            x = u(-rx, rx)
            parts.append(Part(_poly((x, 0), (x + u(-0.08, 0.08), u(0.08, 0.18))), closed=False, filled=False, role="grass", width=0.025))
    return parts


# palettes: role -> list of (h0, h1, s0, s1, v0, v1) ranges in [0,360] / [0,1]
_ANY = (0, 360, 0.35, 0.95, 0.35, 0.95)
_BG = (0, 360, 0.05, 0.6, 0.25, 0.9)  # background gradient ends
_CLUTTER = (0, 360, 0.1, 0.75, 0.25, 0.9)  # clutter shapes
_CLASSES: dict[str, tuple[Callable[[np.random.Generator], list[Part]], dict[str, list[tuple]]]] = {
    "house": (
        _house,
        {
            "wall": [(20, 60, 0.15, 0.5, 0.7, 0.95), (180, 230, 0.1, 0.4, 0.6, 0.9), _ANY],
            "roof": [(0, 25, 0.5, 0.9, 0.35, 0.75), (0, 360, 0.0, 0.1, 0.2, 0.5)],
            "door": [(15, 35, 0.5, 0.8, 0.2, 0.5)],
            "window": [(190, 220, 0.3, 0.7, 0.7, 1.0)],
            "chimney": [(0, 20, 0.4, 0.7, 0.3, 0.6)],
        },
    ),
    "tree": (
        _tree,
        {
            "trunk": [(15, 35, 0.45, 0.8, 0.2, 0.5)],
            "leaves": [(80, 150, 0.45, 0.9, 0.3, 0.8), (20, 50, 0.6, 0.9, 0.6, 0.9)],
            "fruit": [(0, 15, 0.7, 1.0, 0.6, 0.95)],
        },
    ),
    "fish": (
        _fish,
        {
            "body": [(10, 50, 0.6, 1.0, 0.7, 1.0), (180, 240, 0.4, 0.9, 0.5, 0.9), _ANY],
            "fin": [(0, 60, 0.5, 1.0, 0.5, 0.95), _ANY],
            "eye": [(0, 360, 0.0, 0.1, 0.0, 0.2)],
            "stripe": [(0, 360, 0.0, 0.1, 0.85, 1.0), (0, 360, 0.0, 0.2, 0.0, 0.3)],
        },
    ),
    "star": (
        _star,
        {
            "star": [(40, 60, 0.6, 1.0, 0.8, 1.0), _ANY],
            "centre": [_ANY],
            "spark": [(40, 60, 0.4, 0.9, 0.7, 1.0)],
        },
    ),
    "cup": (
        _cup,
        {
            "cup": [_ANY, (0, 360, 0.0, 0.1, 0.8, 1.0)],
            "handle": [_ANY],
            "drink": [(20, 35, 0.6, 0.9, 0.2, 0.45)],
            "saucer": [(0, 360, 0.0, 0.15, 0.75, 1.0), _ANY],
            "steam": [(0, 360, 0.0, 0.05, 0.85, 1.0)],
        },
    ),
    "key": (
        _key,
        {
            "metal": [(40, 55, 0.5, 0.8, 0.6, 0.9), (0, 360, 0.0, 0.1, 0.55, 0.85)],
            "hole": [(0, 360, 0.0, 0.2, 0.05, 0.3)],
        },
    ),
    "car": (
        _car,
        {
            "body": [_ANY, (0, 10, 0.7, 1.0, 0.6, 0.95)],
            "window": [(185, 215, 0.2, 0.5, 0.6, 0.95)],
            "wheel": [(0, 360, 0.0, 0.1, 0.05, 0.2)],
            "hub": [(0, 360, 0.0, 0.1, 0.6, 0.85)],
            "light": [(45, 60, 0.5, 1.0, 0.8, 1.0)],
        },
    ),
    "boat": (
        _boat,
        {
            "hull": [(10, 30, 0.5, 0.8, 0.3, 0.6), _ANY],
            "sail": [(0, 360, 0.0, 0.1, 0.85, 1.0), _ANY],
            "mast": [(20, 35, 0.5, 0.8, 0.25, 0.5)],
            "flag": [(0, 10, 0.8, 1.0, 0.7, 1.0)],
            "porthole": [(190, 210, 0.2, 0.5, 0.7, 0.95)],
            "water": [(195, 225, 0.5, 0.9, 0.5, 0.9)],
        },
    ),
    "umbrella": (
        _umbrella,
        {
            "canopy": [_ANY],
            "shaft": [(0, 360, 0.0, 0.2, 0.1, 0.4)],
            "rib": [(0, 360, 0.0, 0.2, 0.1, 0.4)],
        },
    ),
    "flower": (
        _flower,
        {
            "petal": [(300, 360, 0.4, 0.9, 0.7, 1.0), (40, 60, 0.6, 1.0, 0.8, 1.0), _ANY],
            "centre": [(35, 55, 0.7, 1.0, 0.6, 1.0), (20, 35, 0.6, 0.9, 0.3, 0.5)],
            "stem": [(90, 140, 0.5, 0.9, 0.3, 0.7)],
            "leaf": [(90, 140, 0.5, 0.9, 0.35, 0.75)],
        },
    ),
    "sun": (
        _sun,
        {
            "disc": [(40, 58, 0.7, 1.0, 0.85, 1.0), (20, 40, 0.7, 1.0, 0.85, 1.0)],
            "ray": [(30, 55, 0.6, 1.0, 0.8, 1.0)],
            "face": [(0, 360, 0.0, 0.3, 0.1, 0.4)],
        },
    ),
    "heart": (
        _heart,
        {
            "heart": [(340, 360, 0.6, 1.0, 0.6, 1.0), (300, 340, 0.4, 0.9, 0.6, 1.0), _ANY],
            "inner": [(0, 360, 0.0, 0.3, 0.8, 1.0), _ANY],
            "arrow": [(20, 40, 0.4, 0.8, 0.3, 0.6)],
        },
    ),
    "lamp": (
        _lamp,
        {
            "base": [(0, 360, 0.0, 0.3, 0.1, 0.5), _ANY],
            "stem": [(0, 360, 0.0, 0.2, 0.3, 0.7)],
            "shade": [(30, 60, 0.2, 0.6, 0.75, 1.0), _ANY],
            "bulb": [(50, 60, 0.3, 0.6, 0.9, 1.0)],
            "chain": [(0, 360, 0.0, 0.1, 0.2, 0.5)],
        },
    ),
    "arrow": (
        _arrow,
        {
            "arrow": [_ANY],
            "fletch": [_ANY],
        },
    ),
    "bottle": (
        _bottle,
        {
            "glass": [(90, 160, 0.4, 0.9, 0.2, 0.6), (20, 40, 0.6, 0.9, 0.3, 0.6), _ANY],
            "label": [(0, 360, 0.0, 0.3, 0.8, 1.0), _ANY],
            "cap": [_ANY],
        },
    ),
    "mushroom": (
        _mushroom,
        {
            "stem": [(30, 50, 0.05, 0.3, 0.75, 1.0)],
            "cap": [(0, 10, 0.7, 1.0, 0.6, 0.95), (20, 35, 0.4, 0.8, 0.35, 0.7)],
            "spot": [(0, 360, 0.0, 0.1, 0.9, 1.0)],
            "grass": [(90, 130, 0.5, 0.9, 0.4, 0.8)],
        },
    ),
}

#: All available class names, in label order (``num_classes`` takes a prefix).
CLASS_NAMES: tuple[str, ...] = tuple(_CLASSES)


def instance_geometry(class_name: str, rng: np.random.Generator) -> list[Part]:
    """Draw one instance of ``class_name``: parts in a y-up frame, fitted into [-1, 1]^2, centred.

    A random horizontal mirror is part of the instance (photo and sketch share it).
    """
    parts = _CLASSES[class_name][0](rng)
    pts = np.concatenate([p.points for p in parts], axis=0)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = 2.0 / float(np.max(hi - lo))
    centre = (lo + hi) / 2
    flip = np.array([-1.0 if rng.random() < 0.5 else 1.0, 1.0])
    for p in parts:
        p.points = (p.points - centre) * scale * flip
        p.width *= scale
    return parts


# =========================================================================== #
# photos
# =========================================================================== #
def _hsv(rng: np.random.Generator, spec: tuple) -> np.ndarray:
    h0, h1, s0, s1, v0, v1 = spec
    h = (rng.uniform(h0, h1) % 360) / 360.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(s0, s1), rng.uniform(v0, v1))) * 255.0


def _part_colours(class_name: str, parts: list[Part], rng: np.random.Generator) -> dict[str, np.ndarray]:
    palette = _CLASSES[class_name][1]
    cols = {}
    for role in dict.fromkeys(p.role for p in parts):
        options = palette.get(role, [_ANY])
        spec = _ANY if rng.random() < 0.1 else options[int(rng.integers(len(options)))]
        cols[role] = _hsv(rng, spec)
    return cols


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], (size, size), bicubic-upsampled random grid."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 127.5 - 1.0


def _random_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, colour: tuple, scale: float) -> None:
    kind = int(rng.integers(4))
    cx, cy = rng.uniform(0, s, 2)
    r = rng.uniform(0.05, 0.22) * s * scale
    if kind == 0:
        rx, ry = r, r * rng.uniform(0.4, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    elif kind == 1:
        ang = rng.uniform(0, _TAU)
        pts = _rotate(_rect(cx, cy, 2 * r, 2 * r * rng.uniform(0.3, 1.0)), ang, (cx, cy))
        draw.polygon([tuple(p) for p in pts], fill=colour)
    elif kind == 2:
        k = int(rng.integers(3, 7))
        a = np.sort(rng.uniform(0, _TAU, k))
        rr = r * rng.uniform(0.4, 1.0, k)
        draw.polygon([(cx + q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(rr, a)], fill=colour)
    else:
        a = rng.uniform(0, _TAU)
        draw.line([(cx - r * math.cos(a), cy - r * math.sin(a)), (cx + r * math.cos(a), cy + r * math.sin(a))], fill=colour, width=max(1, int(rng.uniform(0.01, 0.05) * s)))


def render_photo(
    class_name: str, parts: list[Part], size: int, rng: np.random.Generator, clutter: float = 1.0
) -> np.ndarray:
    """Render an instance as a photo-like uint8 ``(size, size, 3)`` image."""
    s = size * _SUPERSAMPLE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    # background: random linear gradient + smooth noise + random shapes
    c0, c1 = _hsv(rng, _BG), _hsv(rng, _BG)
    ga = rng.uniform(0, _TAU)
    g = (xx - 0.5) * math.cos(ga) + (yy - 0.5) * math.sin(ga) + 0.5
    bg = c0 * (1 - g[..., None]) + c1 * g[..., None]
    bg += 25.0 * clutter * _smooth_noise(rng, s, int(rng.integers(3, 7)))[..., None]
    bg_img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(bg_img)
    for _ in range(int(rng.poisson(4.0 * clutter))):
        _random_shape(draw, rng, s, tuple(int(v) for v in _hsv(rng, _CLUTTER)), 1.0)

    # object geometry -> pixel coordinates with a small affine jitter
    rot, fill = rng.uniform(-0.25, 0.25), rng.uniform(0.6, 0.85)
    sx = fill * rng.uniform(0.92, 1.08) * s / 2
    sy = fill * rng.uniform(0.92, 1.08) * s / 2
    shift = rng.uniform(-0.1, 0.1, 2) * s + s / 2
    cr, sr = math.cos(rot), math.sin(rot)
    mat = np.array([[cr * sx, sr * sy], [sr * sx, -cr * sy]])  # y-up -> y-down

    colours = _part_colours(class_name, parts, rng)
    obj = Image.new("RGB", (s, s))
    mask = Image.new("L", (s, s))
    d_obj, d_mask = ImageDraw.Draw(obj), ImageDraw.Draw(mask)
    for p in parts:
        pix = p.points @ mat.T + shift
        col = colours[p.role] * rng.uniform(0.9, 1.1)
        col = tuple(int(v) for v in np.clip(col, 0, 255))
        xy = [tuple(q) for q in pix]
        if p.closed and p.filled and len(xy) >= 3:
            d_obj.polygon(xy, fill=col)
            d_mask.polygon(xy, fill=255)
        else:
            w = max(1, int(round(p.width * (sx + sy) / 2)))
            d_obj.line(xy, fill=col, width=w, joint="curve")
            d_mask.line(xy, fill=255, width=w, joint="curve")

    # shading along a light direction + texture on the object
    la = rng.uniform(0, _TAU)
    shade = 1.0 + rng.uniform(0.2, 0.45) * (((xx - shift[0] / s) * math.cos(la) + (yy - shift[1] / s) * math.sin(la)) / max(fill, 1e-3))
    tex = 1.0 + rng.uniform(0.05, 0.15) * _smooth_noise(rng, s, int(rng.integers(4, 9)))
    fg = np.asarray(obj, dtype=np.float32) * (shade * tex)[..., None]
    fg += rng.normal(0, 6.0, fg.shape).astype(np.float32)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    out = np.asarray(bg_img, dtype=np.float32) * (1 - m) + fg * m
    out_img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")

    # occluders in front of the object
    draw = ImageDraw.Draw(out_img)
    for _ in range(int(rng.poisson(0.4 * clutter))):
        _random_shape(draw, rng, s, tuple(int(v) for v in _hsv(rng, _CLUTTER)), 0.35)

    small = out_img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(small, dtype=np.float32) + rng.normal(0, 3.0, (size, size, 3))
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


# =========================================================================== #
# sketches
# =========================================================================== #
def _resample(pts: np.ndarray, spacing: float) -> np.ndarray:
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    total = float(seg.sum())
    if total <= 1e-9:
        return pts[:1].copy()
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(total / spacing)) + 1)
    t = np.linspace(0.0, total, n)
    return np.stack([np.interp(t, cum, pts[:, 0]), np.interp(t, cum, pts[:, 1])], axis=1)


def _wobble(pts: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
    if len(pts) < 2:
        return pts + rng.normal(0, amp * 0.3, pts.shape)
    tang = np.gradient(pts, axis=0)
    nrm = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    f1, f2 = rng.uniform(1.0, 4.0), rng.uniform(4.0, 10.0)
    off = amp * (np.sin(f1 * arc + rng.uniform(0, _TAU)) + 0.4 * np.sin(f2 * arc + rng.uniform(0, _TAU)))
    # smoothed per-point jitter (drift)
    drift = np.cumsum(rng.normal(0, amp * 0.15, pts.shape), axis=0)
    drift -= np.linspace(0, 1, len(pts))[:, None] * drift[-1]
    return pts + off[:, None] * nrm + drift + rng.normal(0, amp * 0.15, pts.shape)


def _top_left_first(pts: np.ndarray) -> bool:
    """Whether an open stroke already starts at its top-left end (y-up frame)."""
    return float(pts[0, 0] - pts[0, 1]) <= float(pts[-1, 0] - pts[-1, 1])


def _canonical_loop(pts: np.ndarray) -> np.ndarray:
    """A closed outline clockwise on the page (negative signed area in the y-up frame), starting at its
    top-left point."""
    x, y = pts[:, 0], pts[:, 1]
    if float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) > 0:
        pts = pts[::-1]
    return np.roll(pts, -int(np.argmin(pts[:, 0] - pts[:, 1])), axis=0)


def draw_sketch(parts: list[Part], rng: np.random.Generator, canonical: bool = True) -> np.ndarray:
    """Draw an instance as a human-like stroke-3 sketch (float32, 256-unit y-down frame).

    ``canonical``: essential parts first in template order, closed outlines clockwise from their
    top-left point, open strokes from their top-left end; otherwise order, start and direction are
    random. The random draws are made either way, so both modes share the rest of the noise."""
    order_noise = [rng.normal(0, 1.2) for _ in parts]
    rank = [1e-3 * i if canonical else order_noise[i] for i in range(len(parts))]
    order = sorted(range(len(parts)), key=lambda i: (0 if parts[i].essential else 2) + rank[i])
    amp = rng.uniform(0.006, 0.028)
    drop_p = rng.uniform(0.05, 0.35)
    strokes: list[np.ndarray] = []
    for i in order:
        p = parts[i]
        if not p.essential and rng.random() < drop_p:
            continue
        pts = p.points
        if p.closed:
            shift = int(rng.integers(len(pts)))
            pts = _canonical_loop(pts) if canonical else np.roll(pts, -shift, axis=0)
            over = int(rng.integers(0, 3)) if rng.random() < 0.35 else 0
            pts = np.concatenate([pts, pts[: 1 + over]], axis=0)
        pts = _resample(pts, 0.035)
        pts = _wobble(pts, rng, amp)
        flip = rng.random() < 0.35
        if (not p.closed and not _top_left_first(pts)) if canonical else flip:
            pts = pts[::-1]
        if p.closed and len(pts) > 12 and rng.random() < 0.25:
            k = int(rng.integers(4, len(pts) - 4))
            strokes += [pts[: k + 1], pts[k:]]
        else:
            strokes.append(pts)
    if rng.random() < 0.25:  # an extra stroke: ground line or a stray mark
        allp = np.concatenate(strokes)
        lo, hi = allp.min(0), allp.max(0)
        if rng.random() < 0.5:
            y = lo[1] - rng.uniform(0.0, 0.1)
            line = np.array([[lo[0] - rng.uniform(0, 0.3), y], [hi[0] + rng.uniform(0, 0.3), y]])
        else:
            c = rng.uniform(lo, hi)
            line = np.stack([c, c + rng.normal(0, 0.25, 2)])
        strokes.append(_wobble(_resample(line, 0.035), rng, amp))
    # slight global affine distortion, then to the 256-unit y-down frame
    a = rng.uniform(-0.12, 0.12)
    ca, sa = math.cos(a), math.sin(a)
    aff = np.array([[ca, -sa], [sa, ca]]) @ np.array([[rng.uniform(0.88, 1.12), rng.uniform(-0.12, 0.12)], [0.0, rng.uniform(0.88, 1.12)]])
    aff = aff * np.array([[1.0], [-1.0]]) * (_SKETCH_FRAME * 0.4)
    eps = rng.uniform(0.6, 1.8)
    out = [rdp(s @ aff.T + _SKETCH_FRAME / 2, eps) for s in strokes]
    return polylines_to_stroke3(out)


# =========================================================================== #
# dataset
# =========================================================================== #
def _class_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


_SPLIT_CODE = {"train": 1, "test": 2}


def generate(cfg: SyntheticConfig | None = None, workers: int = 1) -> SyntheticDataset:
    """Generate the dataset for ``cfg`` (deterministic: same config, identical arrays). Every class draws
    from its own RNG streams, so ``workers`` > 1 renders classes in parallel processes with the same result."""
    cfg = cfg or SyntheticConfig()
    names = list(CLASS_NAMES[: cfg.num_classes])
    jobs = [(cfg, label, name) for label, name in enumerate(names)]
    if workers > 1 and len(jobs) > 1:
        import concurrent.futures
        import multiprocessing

        # spawn, not fork: the caller may hold torch/Ray threads, which a forked child must not inherit
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            per_class = list(pool.map(_generate_class, jobs))
    else:
        per_class = [_generate_class(job) for job in jobs]
    photos = [ph for class_photos, _ in per_class for ph in class_photos]
    sketches = [sk for _, class_sketches in per_class for sk in class_sketches]
    return SyntheticDataset(class_names=names, photos=photos, sketches=sketches, config=cfg)


def _generate_class(job: tuple[SyntheticConfig, int, str]) -> tuple[list[PhotoRecord], list[SketchRecord]]:
    """One class's photos and sketches, from the class's own RNG streams (seed, class, split, index)."""
    cfg, label, name = job
    key = _class_key(name)
    class_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, key, 0]))
    n_train = cfg.train_instances_per_class
    n_lab = int(round(cfg.labelled_share * n_train))
    labelled = np.zeros(n_train, dtype=bool)
    labelled[class_rng.permutation(n_train)[:n_lab]] = True
    photos: list[PhotoRecord] = []
    sketches: list[SketchRecord] = []
    class_sketches: list[tuple[str | None, str, str, np.ndarray]] = []
    for split, count in (("train", n_train), ("test", cfg.test_instances_per_class)):
        for idx in range(count):
            ss = np.random.SeedSequence([cfg.seed, key, _SPLIT_CODE[split], idx])
            g_rng, p_rng, s_rng = (np.random.default_rng(c) for c in ss.spawn(3))
            parts = instance_geometry(name, g_rng)
            pid = f"{name}_{split}_{idx:05d}"
            is_lab = bool(labelled[idx]) if split == "train" else False
            image = render_photo(name, parts, cfg.photo_size, p_rng, cfg.clutter)
            photos.append(PhotoRecord(pid, name, label, split, is_lab, image))
            if split == "train" and not is_lab and not cfg.unlabelled_sketches:
                continue
            for k in range(cfg.sketches_per_photo):
                strokes = draw_sketch(parts, s_rng, cfg.stroke_order == "canonical")
                class_sketches.append((pid, f"{pid}_s{k}", split, strokes))
    if class_sketches:
        ink = rasterise([c[3] for c in class_sketches], size=cfg.sketch_size, line_width=cfg.line_width)
        imgs = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
        for (photo_id, sid, split, strokes), img in zip(class_sketches, imgs):
            sketches.append(SketchRecord(sid, photo_id, name, label, split, strokes, img))
    return photos, sketches


def preview_grid(ds: SyntheticDataset, path: str | Path, per_class: int = 2, tile: int = 96) -> Path:
    """Write a PNG: one row per class, ``per_class`` (photo, sketch) pairs, class names on the left."""
    by_photo: dict[str, SketchRecord] = {}
    for s in ds.sketches:
        if s.photo_id is not None and s.photo_id not in by_photo:
            by_photo[s.photo_id] = s
    label_w, gap = 90, 6
    n_rows = len(ds.class_names)
    width = label_w + per_class * (2 * tile + gap)
    canvas = Image.new("RGB", (width, n_rows * (tile + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, name in enumerate(ds.class_names):
        y = gap + r * (tile + gap)
        draw.text((6, y + tile // 2 - 6), name, fill="black", font=font)
        pairs = [(p, by_photo[p.id]) for p in ds.photos if p.class_name == name and p.id in by_photo][:per_class]
        for c, (p, s) in enumerate(pairs):
            x = label_w + c * (2 * tile + gap)
            canvas.paste(Image.fromarray(p.image).resize((tile, tile), Image.NEAREST), (x, y))
            canvas.paste(Image.fromarray(s.image).convert("RGB").resize((tile, tile), Image.NEAREST), (x + tile, y))
            draw.rectangle([x + tile, y, x + 2 * tile - 1, y + tile - 1], outline=(180, 180, 180))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
