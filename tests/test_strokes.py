"""Tests for sbir.strokes: format conversions, simplification, rasteriser."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sbir.strokes import (
    END_ROW,
    SOS_ROW,
    normalise_stroke3,
    pad_stroke5,
    polylines_to_stroke3,
    rasterise,
    rdp,
    render_to_uint8_rgb,
    simplify_stroke3,
    stroke3_offset_std,
    stroke3_to_polylines,
    stroke3_to_stroke5,
    stroke5_mask,
    stroke5_to_stroke3,
    validate_stroke3,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

coord = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def stroke3(draw, min_len: int = 1, max_len: int = 40, last_up: bool = True) -> np.ndarray:
    n = draw(st.integers(min_len, max_len))
    xy = draw(arrays(np.float32, (n, 2), elements=coord))
    pen = draw(arrays(np.float32, (n,), elements=st.sampled_from([0.0, 1.0])))
    if last_up:
        pen[-1] = 1.0
    return np.concatenate([xy, pen[:, None]], axis=1).astype(np.float32)


@st.composite
def polyline(draw, min_len: int = 1, max_len: int = 30) -> np.ndarray:
    n = draw(st.integers(min_len, max_len))
    return draw(arrays(np.float64, (n, 2), elements=st.floats(-100, 100, allow_nan=False)))


# ----------------------------------------------------------------- stroke-5
@SETTINGS
@given(stroke3(last_up=False))
def test_stroke3_stroke5_round_trip(s3):
    s5 = stroke3_to_stroke5(s3)
    assert s5.shape == (len(s3) + 1, 5) and s5.dtype == np.float32
    np.testing.assert_array_equal(s5[-1], END_ROW)
    np.testing.assert_array_equal(s5[:-1, 2:5].sum(1), 1.0)
    np.testing.assert_array_equal(stroke5_to_stroke3(s5), s3)


@SETTINGS
@given(stroke3(), st.integers(1, 50))
def test_stroke5_max_len_truncates_and_pads(s3, max_len):
    s5 = stroke3_to_stroke5(s3, max_len)
    assert s5.shape == (max_len, 5)
    n = min(len(s3), max_len - 1)
    np.testing.assert_array_equal(s5[n:], np.tile(END_ROW, (max_len - n, 1)))
    back = stroke5_to_stroke3(s5)
    assert len(back) == n
    np.testing.assert_array_equal(back[:, :2], s3[:n, :2])
    if n:
        assert back[-1, 2] == 1.0  # pen lifts at the (possibly truncated) end


def test_stroke5_to_stroke3_stops_at_first_end_and_uses_argmax():
    s5 = np.array(
        [[1, 2, 0.9, 0.1, 0], [3, 4, 0.2, 0.7, 0.1], [0, 0, 0, 0, 1], [5, 5, 1, 0, 0]], np.float32
    )
    np.testing.assert_array_equal(stroke5_to_stroke3(s5), [[1, 2, 0], [3, 4, 1]])


def test_pad_stroke5_layout_and_mask():
    a = np.array([[1, 1, 0], [2, 2, 1]], np.float32)
    b = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]], np.float32)
    x, lengths = pad_stroke5([a, b, stroke3_to_stroke5(a)], max_len=4)
    assert x.shape == (3, 5, 5) and x.dtype == np.float32
    assert lengths.dtype == np.int64
    np.testing.assert_array_equal(lengths, [3, 4, 3])
    np.testing.assert_array_equal(x[:, 0], np.tile(SOS_ROW, (3, 1)))
    np.testing.assert_array_equal(x[0, 1:], stroke3_to_stroke5(a, 4))
    np.testing.assert_array_equal(x[2], x[0])  # stroke-5 input handled the same
    np.testing.assert_array_equal(x[1, 4], END_ROW)  # truncated: last row is the end
    assert x[1, 3, 3] == 1.0  # pen lifts on the last kept point
    mask = stroke5_mask(lengths, 4)
    assert mask.shape == (3, 4) and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(1), lengths)
    # every masked-in row of the targets up to the end row, nothing after it
    targets = x[:, 1:]
    for i in range(3):
        assert targets[i, lengths[i] - 1, 4] == 1.0
        assert not targets[i, : lengths[i] - 1, 4].any()


# ----------------------------------------------------------------- polylines
@SETTINGS
@given(stroke3())
def test_stroke3_polylines_round_trip(s3):
    polys = stroke3_to_polylines(s3)
    assert len(polys) == int(s3[:, 2].sum())
    assert sum(len(p) for p in polys) == len(s3)
    back = polylines_to_stroke3(polys)
    np.testing.assert_allclose(back[:, :2], s3[:, :2], atol=1e-3)
    np.testing.assert_array_equal(back[:, 2], s3[:, 2])


@SETTINGS
@given(st.lists(polyline(), min_size=0, max_size=6))
def test_polylines_stroke3_round_trip(polys):
    back = stroke3_to_polylines(polylines_to_stroke3(polys))
    assert len(back) == len(polys)
    for p, q in zip(polys, back):
        np.testing.assert_allclose(q, p, atol=1e-3)


def test_unterminated_last_stroke_is_kept():
    s3 = np.array([[0, 0, 1], [1, 0, 0], [1, 0, 0]], np.float32)
    polys = stroke3_to_polylines(s3)
    assert [len(p) for p in polys] == [1, 2]


# ----------------------------------------------------------------- rdp
@SETTINGS
@given(polyline(min_len=1, max_len=60), st.floats(0.0, 20.0))
def test_rdp_properties(pts, eps):
    out = rdp(pts, eps)
    assert 1 <= len(out) <= len(pts)
    np.testing.assert_array_equal(out[0], pts[0])
    np.testing.assert_array_equal(out[-1], pts[-1])
    # kept points are a subsequence of the input
    it = iter(map(tuple, pts))
    assert all(any(q == p for p in it) for q in map(tuple, out))
    # every input point within eps of the simplified polyline
    if len(out) >= 2:
        a, b = out[:-1], out[1:]
        ab = b - a
        ap = pts[:, None, :] - a[None]
        den = (ab * ab).sum(-1)
        t = np.clip(np.where(den > 0, (ap * ab).sum(-1) / np.maximum(den, 1e-300), 0), 0, 1)
        d = np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(1)
        assert d.max() <= eps + 1e-6


def test_rdp_straight_line_and_deep_input():
    line = np.stack([np.linspace(0, 1, 50_000), np.zeros(50_000)], 1)
    np.testing.assert_array_equal(rdp(line, 1e-6), line[[0, -1]])
    zigzag = np.stack([np.arange(3_000.0), (np.arange(3_000) % 2) * 5.0], 1)
    assert len(rdp(zigzag, 1.0)) == 3_000  # deeper than the default recursion limit


def test_simplify_stroke3_keeps_strokes():
    poly = [np.stack([np.linspace(0, 10, 30), np.zeros(30)], 1), np.array([[5.0, 5.0]])]
    out = simplify_stroke3(polylines_to_stroke3(poly), 0.5)
    assert [len(p) for p in stroke3_to_polylines(out)] == [2, 1]


# ----------------------------------------------------------------- normalise / std
@SETTINGS
@given(stroke3(min_len=2), st.floats(0.1, 300))
def test_normalise_keeps_aspect_and_fits_box(s3, target):
    pts = np.cumsum(s3[:, :2].astype(np.float64), 0)
    ext = pts.max(0) - pts.min(0)
    out = normalise_stroke3(s3, target)
    q = np.cumsum(out[:, :2].astype(np.float64), 0)
    ext2 = q.max(0) - q.min(0)
    np.testing.assert_array_equal(out[:, 2], s3[:, 2])
    if ext.max() < 1e-3:
        return
    assert ext2.max() == pytest.approx(target, rel=1e-4)
    k = target / ext.max()
    np.testing.assert_allclose(ext2, ext * k, rtol=1e-3, atol=1e-3 * target)


def test_normalise_zero_size_is_safe():
    s3 = np.array([[3, 4, 0], [0, 0, 1]], np.float32)
    np.testing.assert_array_equal(normalise_stroke3(s3, 2.0), s3)
    assert normalise_stroke3(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_offset_std():
    a = np.array([[1, -1, 0], [1, -1, 1]], np.float32)
    assert stroke3_offset_std([a, a]) == pytest.approx(1.0)
    assert stroke3_offset_std([]) == 1.0


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((3, 2)), "shape"),
        (np.zeros((0, 3)), "empty"),
        (np.array([[np.nan, 0, 1]]), "non-finite"),
        (np.array([[np.inf, 0, 1]]), "non-finite"),
        (np.array([[0, 0, 0.5]]), "pen"),
        ("abc", "numeric"),
    ],
)
def test_validate_stroke3_errors(bad, words):
    with pytest.raises(ValueError, match="shoe/17") as exc:
        validate_stroke3(bad, "shoe/17")
    assert words in str(exc.value)


def test_validate_stroke3_ok():
    out = validate_stroke3([[1, 2, 0], [3, 4, 1]], "x")
    assert out.dtype == np.float32 and out.shape == (2, 3)


# ----------------------------------------------------------------- rasteriser
@SETTINGS
@given(st.lists(stroke3(max_len=15), min_size=1, max_size=4), st.floats(0.5, 4.0))
def test_rasterise_range_and_batch_equals_items(sketches, lw):
    imgs = rasterise(sketches, size=24, line_width=lw)
    assert imgs.shape == (len(sketches), 24, 24) and imgs.dtype == np.float32
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0
    for i, s in enumerate(sketches):
        np.testing.assert_array_equal(rasterise([s], size=24, line_width=lw)[0], imgs[i])


@SETTINGS
@given(
    stroke3(min_len=2, max_len=20),
    st.floats(0.05, 20.0),
    st.floats(-1000, 1000),
    st.floats(-1000, 1000),
)
def test_rasterise_scale_translation_invariant(s3, k, tx, ty):
    pts = np.cumsum(s3[:, :2].astype(np.float64), 0)
    if np.max(pts.max(0) - pts.min(0)) < 1e-2:
        return
    moved = s3.copy()
    moved[:, :2] *= k
    moved[0, :2] += (tx, ty)
    a, b = rasterise([s3, moved], size=32, line_width=1.5)
    assert np.abs(a - b).max() < 0.02


def test_rasterise_keeps_aspect_ratio():
    line = np.array([[0, 0, 0], [100, 0, 1]], np.float32)  # wide horizontal line
    img = rasterise([line], size=32, line_width=1.0, padding=0.1)[0]
    rows = np.flatnonzero(img.sum(1) > 0)
    cols = np.flatnonzero(img.sum(0) > 0)
    assert len(rows) <= 2  # not stretched vertically
    assert cols.min() <= 4 and cols.max() >= 27  # spans the width minus padding
    assert rows.mean() == pytest.approx(15.5, abs=0.6)  # vertically centred
    tall = rasterise([line[:, [1, 0, 2]]], size=32)[0]
    np.testing.assert_allclose(tall, img.T, atol=1e-6)


def test_rasterise_square_coverage_exact():
    sq = polylines_to_stroke3([np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], float)])
    img = rasterise([sq], size=20, line_width=2.0, padding=0.25)[0]
    # box spans pixels 5..15 in continuous coords; centre pixels are empty
    assert img[10, 10] == 0.0
    # pixel centre (5.5, 10.5) is 0.5 from the left edge x=5: coverage 1+0.5-0.5 = 1
    assert img[10, 5] == pytest.approx(1.0)
    # pixel centre (7.5, 10.5) is 2.5 away: coverage 0
    assert img[10, 7] == 0.0
    # pixel centre (6.5, 10.5) is 1.5 away: coverage 0
    assert img[10, 6] == pytest.approx(0.0)


def test_rasterise_dot_empty_and_large():
    dot = np.array([[5, 5, 1]], np.float32)
    imgs = rasterise([dot, np.zeros((0, 3), np.float32)], size=16, line_width=2.0)
    # the dot sits at the canvas centre (8, 8), 0.707 from the 4 nearest pixel centres
    np.testing.assert_allclose(imgs[0, 7:9, 7:9], 1.5 - np.sqrt(0.5), rtol=1e-5)
    assert imgs[0].sum() < 10
    assert imgs[1].max() == 0.0
    rng = np.random.default_rng(0)
    big = np.concatenate([rng.normal(0, 3, (400, 2)), (rng.random((400, 1)) < 0.05)], 1)
    img = rasterise([big.astype(np.float32)], size=256, line_width=2.0)[0]
    assert img.shape == (256, 256) and 0 < img.mean() < 0.5
    assert rasterise([], size=8).shape == (0, 8, 8)


def test_render_to_uint8_rgb():
    ink = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    rgb = render_to_uint8_rgb(ink)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[255, 0], [128, 191]])
    assert render_to_uint8_rgb(np.zeros((3, 4, 5))).shape == (3, 4, 5, 3)
