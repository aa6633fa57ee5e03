"""Tests for the embedded procedural dataset (sbir.data.synthetic)."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sbir.data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    SyntheticDataset,
    _canonical_loop,
    draw_sketch,
    generate,
    instance_geometry,
    preview_grid,
)
from sbir.strokes import rasterise, validate_stroke3

TINY = dict(train_instances_per_class=5, test_instances_per_class=2)


@pytest.fixture(scope="module")
def tiny() -> SyntheticDataset:
    return generate(SyntheticConfig(seed=3, num_classes=len(CLASS_NAMES), **TINY))


def _fingerprint(ds: SyntheticDataset) -> list:
    out = []
    for p in ds.photos:
        out.append((p.id, p.class_name, p.label, p.split, p.labelled, p.image.tobytes()))
    for s in ds.sketches:
        out.append((s.id, s.photo_id, s.class_name, s.label, s.split, s.strokes.tobytes(), s.image.tobytes()))
    return out


def test_at_least_twelve_classes():
    assert len(CLASS_NAMES) >= 12
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert SyntheticConfig().num_classes >= 12


def test_same_seed_is_byte_identical(tiny):
    again = generate(SyntheticConfig(seed=3, num_classes=len(CLASS_NAMES), **TINY))
    assert _fingerprint(again) == _fingerprint(tiny)
    other = generate(SyntheticConfig(seed=4, num_classes=2, **TINY))
    assert _fingerprint(other) != _fingerprint(tiny)[: len(_fingerprint(other))]


def test_classes_rendered_in_parallel_processes_are_byte_identical(tiny):
    """prepare renders the classes in worker processes: same records, same order, same bytes."""
    parallel = generate(SyntheticConfig(seed=3, num_classes=len(CLASS_NAMES), **TINY), workers=2)
    assert _fingerprint(parallel) == _fingerprint(tiny)
    assert [p.id for p in parallel.photos] == [p.id for p in tiny.photos]
    assert [s.id for s in parallel.sketches] == [s.id for s in tiny.sketches]


def test_changing_counts_keeps_other_instances():
    base = generate(SyntheticConfig(seed=1, num_classes=3, train_instances_per_class=3, test_instances_per_class=1))
    more = generate(SyntheticConfig(seed=1, num_classes=4, train_instances_per_class=3, test_instances_per_class=2))
    by_id = {p.id: p for p in more.photos}
    for p in base.photos:  # same classes and instances, whatever the other counts
        np.testing.assert_array_equal(by_id[p.id].image, p.image)
    sk = {s.id: s for s in more.sketches}
    for s in base.sketches:
        np.testing.assert_array_equal(sk[s.id].strokes, s.strokes)
    extra = generate(SyntheticConfig(seed=1, num_classes=3, train_instances_per_class=3, test_instances_per_class=1, sketches_per_photo=2))
    assert {p.id: p.image.tobytes() for p in extra.photos} == {p.id: p.image.tobytes() for p in base.photos}


def test_counts_splits_and_labelled_share():
    cfg = SyntheticConfig(seed=0, num_classes=3, train_instances_per_class=10, test_instances_per_class=4, sketches_per_photo=2, labelled_share=0.3)
    ds = generate(cfg)
    assert ds.class_names == list(CLASS_NAMES[:3])
    assert len(ds.photos) == 3 * 14
    per = Counter((p.class_name, p.split) for p in ds.photos)
    assert all(per[(c, "train")] == 10 and per[(c, "test")] == 4 for c in ds.class_names)
    lab = Counter(p.class_name for p in ds.photos if p.split == "train" and p.labelled)
    assert all(lab[c] == 3 for c in ds.class_names)
    assert not any(p.labelled for p in ds.photos if p.split == "test")
    # every photo has sketches_per_photo sketches, each paired with its photo
    assert len(ds.sketches) == 2 * len(ds.photos)
    photos = {p.id: p for p in ds.photos}
    paired = Counter(s.photo_id for s in ds.sketches)
    assert set(paired) == set(photos)
    assert set(paired.values()) == {2}
    for s in ds.sketches:
        owner = photos[s.id.rsplit("_s", 1)[0]]
        assert s.photo_id == owner.id
        assert (s.class_name, s.label, s.split) == (owner.class_name, owner.label, owner.split)
    ids = [p.id for p in ds.photos] + [s.id for s in ds.sketches]
    assert len(set(ids)) == len(ids)

    no_unl = generate(SyntheticConfig(seed=0, num_classes=3, train_instances_per_class=10, test_instances_per_class=4, labelled_share=0.3, unlabelled_sketches=False))
    assert all(s.photo_id is not None for s in no_unl.sketches)
    assert len(no_unl.sketches) == 3 * (3 + 4)


def test_every_class_present_and_records_well_formed(tiny):
    for split in ("train", "test"):
        assert {p.class_name for p in tiny.photos if p.split == split} == set(CLASS_NAMES)
        assert {s.class_name for s in tiny.sketches if s.split == split} == set(CLASS_NAMES)
    for p in tiny.photos:
        assert p.image.shape == (32, 32, 3) and p.image.dtype == np.uint8
        assert p.label == CLASS_NAMES.index(p.class_name)
    for s in tiny.sketches:
        validate_stroke3(s.strokes, s.id)
        assert s.strokes.dtype == np.float32
        assert s.image.shape == (32, 32) and s.image.dtype == np.uint8


def test_sketch_images_come_from_the_rasteriser(tiny):
    sk = tiny.sketches[:7]
    ink = rasterise([s.strokes for s in sk], size=32, line_width=1.0)
    expect = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
    np.testing.assert_array_equal(np.stack([s.image for s in sk]), expect)


def test_photos_do_not_look_like_sketches(tiny):
    photos = np.stack([p.image for p in tiny.photos]).astype(np.float32)
    sketches = np.stack([s.image for s in tiny.sketches]).astype(np.float32)
    # colour: spread across channels per pixel
    photo_chroma = (photos.max(-1) - photos.min(-1)).mean()
    assert photo_chroma > 30.0
    # sketches are mostly white paper, photos almost never are
    assert (sketches > 240).mean() > 0.6
    assert (photos.min(-1) > 240).mean() < 0.05
    # photos have far more intensity variation in the background (clutter / texture)
    border = np.concatenate([photos[:, :3].reshape(len(photos), -1), photos[:, -3:].reshape(len(photos), -1)], 1)
    assert border.std(1).mean() > 8.0


def test_instances_of_a_class_differ(tiny):
    for c in CLASS_NAMES:
        imgs = [p.image for p in tiny.photos if p.class_name == c]
        strokes = [s.strokes for s in tiny.sketches if s.class_name == c]
        assert len({i.tobytes() for i in imgs}) == len(imgs)
        assert len({s.tobytes() for s in strokes}) == len(strokes)
        # the underlying shapes differ (continuous parameters), not only the rendering
        g1 = instance_geometry(c, np.random.default_rng(0))
        g2 = instance_geometry(c, np.random.default_rng(1))
        same = len(g1) == len(g2) and all(
            a.points.shape == b.points.shape and np.allclose(a.points, b.points) for a, b in zip(g1, g2)
        )
        assert not same, c
        # two sketches of the same instance differ too (the drawing is random)
        s1 = draw_sketch(g1, np.random.default_rng(5))
        s2 = draw_sketch(g1, np.random.default_rng(6))
        assert s1.tobytes() != s2.tobytes()


def test_geometry_fits_unit_frame():
    rng = np.random.default_rng(0)
    for c in CLASS_NAMES:
        for _ in range(5):
            parts = instance_geometry(c, rng)
            pts = np.concatenate([p.points for p in parts])
            assert np.isfinite(pts).all()
            assert np.abs(pts).max() <= 1.0 + 1e-9
            assert np.max(pts.max(0) - pts.min(0)) == pytest.approx(2.0)


def test_generation_is_fast():
    t = time.perf_counter()
    ds = generate(SyntheticConfig(seed=0, num_classes=12, train_instances_per_class=4, test_instances_per_class=1))
    assert len(ds.photos) == 60
    assert time.perf_counter() - t < 10.0  # ~0.3 s on one core; generous for a loaded CI box


def test_sizes_and_line_width():
    ds = generate(SyntheticConfig(num_classes=2, train_instances_per_class=2, test_instances_per_class=1, photo_size=48, sketch_size=24, line_width=2.0, clutter=0.0))
    assert ds.photos[0].image.shape == (48, 48, 3)
    assert ds.sketches[0].image.shape == (24, 24)


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", -1),
        ("seed", 1.5),
        ("num_classes", 0),
        ("num_classes", len(CLASS_NAMES) + 1),
        ("train_instances_per_class", 0),
        ("test_instances_per_class", -1),
        ("photo_size", 4),
        ("sketch_size", "32"),
        ("sketches_per_photo", 0),
        ("labelled_share", 1.5),
        ("labelled_share", True),
        ("line_width", 0.0),
        ("clutter", -0.1),
        ("unlabelled_sketches", 1),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_preview_grid(tmp_path, tiny):
    out = preview_grid(tiny, tmp_path / "sub" / "preview.png", per_class=2)
    img = Image.open(out)
    assert img.mode == "RGB"
    assert img.size[1] >= len(tiny.class_names) * 96


def test_canonical_loop_is_clockwise_from_top_left():
    # a square in the y-up frame, listed counter-clockwise from the bottom-left corner
    square = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    loop = _canonical_loop(square)
    assert loop[0].tolist() == [-1.0, 1.0]          # top-left first
    assert loop[1].tolist() == [1.0, 1.0]           # then right along the top: clockwise on the page
    assert _canonical_loop(loop[::-1])[:2].tolist() == loop[:2].tolist()


def test_canonical_stroke_order_makes_drawings_of_one_instance_start_alike():
    """Canonical order: two drawings of one instance start at nearly the same point in the same
    direction; random order spreads the first stroke over the object (the generator cannot predict it)."""
    def first_moves(canonical: bool) -> float:
        spread = []
        for c in CLASS_NAMES[:6]:
            parts = instance_geometry(c, np.random.default_rng(3))
            starts = np.array([np.cumsum(draw_sketch(parts, np.random.default_rng(k), canonical)[:3, :2], axis=0)[[0, 2]].ravel()
                               for k in range(12)])
            spread.append(starts.std(axis=0).mean())
        return float(np.mean(spread))

    assert first_moves(True) < 0.5 * first_moves(False)


def test_stroke_order_is_validated():
    with pytest.raises(ValueError, match="stroke_order"):
        SyntheticConfig(stroke_order="zigzag")
