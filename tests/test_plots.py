"""Tests of sbir.plots: each function writes a valid, non-empty PNG from tiny inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sbir.plots import (
    _to_rgb_uint8,
    image_grid,
    plot_loss_curves,
    plot_pr_curves,
    plot_rank_histogram,
    plot_retrievals,
)


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.size[0] > 10 and im.size[1] > 10


def tiny_images(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    imgs = []
    for i in range(n):
        if i % 2:
            imgs.append(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))  # colour photo
        else:
            a = np.full((16, 16), 255, np.uint8)  # grey sketch: white with a black stroke
            a[4 + i % 8, 2:14] = 0
            imgs.append(a)
    return imgs


def test_plot_retrievals(tmp_path):
    rng = np.random.default_rng(0)
    queries = tiny_images(2, rng)
    gallery = tiny_images(6, rng)
    topk = np.array([[0, 3, 5], [1, 2, 4]])
    correct = np.array([[True, False, True], [False, False, True]])
    out = plot_retrievals(queries, gallery, topk, correct, tmp_path / "sub" / "dir" / "ret.png",
                          title="examples")
    assert_png(out)


def test_plot_retrievals_shape_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        plot_retrievals(tiny_images(2, rng), tiny_images(3, rng), np.zeros((2, 2), int),
                        np.zeros((2, 3), bool), tmp_path / "x.png")


def test_plot_pr_curves(tmp_path):
    r = np.linspace(0, 1, 11)
    out = plot_pr_curves({"model": (r, 1 - 0.5 * r), "chance": (r, np.full_like(r, 0.1))},
                         tmp_path / "pr.png")
    assert_png(out)


def test_plot_rank_histogram(tmp_path):
    rng = np.random.default_rng(0)
    ranks = {"sup": rng.integers(1, 40, 50), "semi": rng.integers(1, 20, 50)}
    assert_png(plot_rank_histogram(ranks, tmp_path / "ranks.png", max_rank=10))
    assert_png(plot_rank_histogram(ranks, tmp_path / "ranks_all.png"))


def test_plot_loss_curves(tmp_path):
    hist = {"total": [3.0, 2.0, 1.5, 1.2], "triplet": [0.2, 0.15, 0.1, float("nan")],
            "kl": [0.01, 0.02, 0.02, 0.03], "recon": [5.0, 4.0, 3.0, 2.5]}
    assert_png(plot_loss_curves(hist, tmp_path / "loss.png", "training"))


def test_image_grid(tmp_path):
    rng = np.random.default_rng(0)
    rows = [tiny_images(3, rng), [rng.random((16, 16)), None], [rng.random((3, 16, 16))]]
    out = image_grid(rows, tmp_path / "grid.png", row_labels=["a", "b", "c"],
                     col_labels=["x", "y", "z"])
    assert_png(out)


def test_to_rgb_uint8_conversions():
    assert _to_rgb_uint8(np.zeros((4, 5))).shape == (4, 5, 3)
    assert _to_rgb_uint8(np.ones((4, 5, 1))).max() == 255
    assert _to_rgb_uint8(np.zeros((3, 4, 5))).shape == (4, 5, 3)  # CHW
    assert _to_rgb_uint8(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        _to_rgb_uint8(np.zeros((2, 2, 2, 2)))
