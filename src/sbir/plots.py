"""Figures for the reports: retrieval examples, PR curves, rank histograms,
loss curves and generic image grids.

Each function writes a PNG file. Parent folders are created as needed. The
figures are drawn on the Agg backend, through ``matplotlib.figure.Figure``
with a ``FigureCanvasAgg``. The module does not touch pyplot's global state,
so it is safe to import anywhere, and it works headless.

Images are HxW (grey) or HxWx3 / HxWx4 arrays. They may be uint8 in
[0, 255] or float in [0, 1]. Floats outside [0, 1] are clipped. A 1x or
3xHxW (CHW) array is accepted too when its last axis can't be channels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "plot_retrievals",
    "plot_pr_curves",
    "plot_rank_histogram",
    "plot_loss_curves",
    "image_grid",
]

GREEN = (0, 170, 0)
RED = (220, 0, 0)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Turn an HxW, HxWx1, HxWx3 or HxWx4 image (uint8 or float in [0, 1]) into HxWx3 uint8."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # CHW -> HWC
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(a, 0, 255).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64))
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _with_border(img: np.ndarray, color: tuple[int, int, int], frac: float = 0.06) -> np.ndarray:
    a = _to_rgb_uint8(img)
    w = max(2, int(round(frac * max(a.shape[:2]))))
    out = np.empty((a.shape[0] + 2 * w, a.shape[1] + 2 * w, 3), dtype=np.uint8)
    out[:] = np.asarray(color, dtype=np.uint8)
    out[w:-w, w:-w] = a
    return out


def _clear_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


# --------------------------------------------------------------------------
# image figures
# --------------------------------------------------------------------------
def image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_size: float = 1.4,
) -> Path:
    """A grid of images, one list per row. Rows may differ in length, and a
    ``None`` entry leaves its cell blank. Row labels go to the left of each
    row, column labels above the first row. Returns the path written."""
    n_rows = len(rows)
    if n_rows == 0:
        raise ValueError("image_grid needs at least one row")
    n_cols = max(1, max(len(r) for r in rows))
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError("row_labels must have one entry per row")
    if col_labels is not None and len(col_labels) > n_cols:
        raise ValueError("more col_labels than columns")
    height = cell_size * n_rows + (0.4 if col_labels else 0.0) + (0.4 if title else 0.0)
    fig = _new_figure(cell_size * n_cols + (1.0 if row_labels else 0.0), height)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            _clear_axis(ax)
            img = rows[i][j] if j < len(rows[i]) else None
            if img is not None:
                ax.imshow(_to_rgb_uint8(img), interpolation="nearest")
            else:
                ax.set_facecolor("white")
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(str(col_labels[j]), fontsize=8)
    # Matplotlib's default top margin is a fraction of the figure (12%), which leaves a large blank band
    # above tall grids: reserve a fixed height in inches for the title and column labels instead.
    top_inches = (0.45 if title else 0.05) + (0.3 if col_labels else 0.0)
    if title:
        fig.suptitle(title, y=1.0 - 0.08 / height)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, top=max(0.5, 1.0 - top_inches / height), bottom=0.02)
    return _save(fig, path)


def plot_retrievals(
    query_images: Sequence[np.ndarray],
    gallery_images: Sequence[np.ndarray],
    topk_indices: np.ndarray,
    correct: np.ndarray,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One row per query: the query, then its top-K gallery images in rank
    order. A correct retrieval gets a green border, a wrong one a red border.

    ``topk_indices`` (Q, K) holds indices into ``gallery_images``. ``correct``
    (Q, K) is boolean. Returns the path written.
    """
    topk = np.asarray(topk_indices)
    ok = np.asarray(correct, dtype=bool)
    if topk.ndim != 2 or topk.shape != ok.shape:
        raise ValueError(f"topk_indices {topk.shape} and correct {ok.shape} must both be (Q, K)")
    if topk.shape[0] != len(query_images):
        raise ValueError("one row of topk_indices per query image is needed")
    rows: list[list[np.ndarray]] = []
    for qi, q_img in enumerate(query_images):
        # a thin white frame keeps the query the same size as the bordered results
        row = [_with_border(q_img, (255, 255, 255))]
        for j, gi in enumerate(topk[qi]):
            row.append(_with_border(gallery_images[int(gi)], GREEN if ok[qi, j] else RED))
        rows.append(row)
    col_labels = ["query"] + [f"#{k + 1}" for k in range(topk.shape[1])]
    return image_grid(rows, path, col_labels=col_labels, title=title)


# --------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------
def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str | None = "Precision-recall",
) -> Path:
    """Precision-recall curves, one line per method: ``{name: (recall, precision)}``."""
    fig = _new_figure(5.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, (recall, precision) in curves.items():
        ax.plot(np.asarray(recall), np.asarray(precision), label=str(name), linewidth=1.5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_rank_histogram(
    ranks_by_model: Mapping[str, np.ndarray],
    path: str | Path,
    max_rank: int | None = None,
    title: str | None = "Rank of the true match",
) -> Path:
    """The distribution of the true match's rank (1-based), per model.

    Left panel: a histogram with one integer bin per rank. Ranks above
    ``max_rank`` are gathered in the last bin, whose tick reads ``>max_rank``.
    Right panel: the cumulative Acc@K curve (share of queries with rank <= K)
    for K = 1..max_rank. If ``max_rank`` is None, it is the largest rank seen.
    """
    all_r = [np.asarray(r).reshape(-1) for r in ranks_by_model.values()]
    seen_max = int(max((r.max() for r in all_r if r.size), default=1))
    mr = int(max_rank) if max_rank is not None else seen_max
    mr = max(mr, 1)
    overflow = seen_max > mr
    n_bins = mr + (1 if overflow else 0)
    edges = np.arange(0.5, n_bins + 1.5, 1.0)

    fig = _new_figure(10.0, 4.0)
    ax_h, ax_c = fig.subplots(1, 2)
    ks = np.arange(1, mr + 1)
    for name, r in zip(ranks_by_model.keys(), all_r):
        clipped = np.minimum(r, mr + 1) if overflow else r
        ax_h.hist(clipped, bins=edges, histtype="step", linewidth=1.5, label=str(name))
        if r.size:
            acc = (r[None, :] <= ks[:, None]).mean(axis=1)
            ax_c.plot(ks, acc, label=str(name), linewidth=1.5)
    ax_h.set_xlabel("rank")
    ax_h.set_ylabel("queries")
    if overflow:
        ticks = ax_h.get_xticks()
        ticks = [t for t in ticks if 1 <= t <= mr] + [mr + 1]
        ax_h.set_xticks(ticks)
        ax_h.set_xticklabels([f"{int(t)}" for t in ticks[:-1]] + [f">{mr}"])
    ax_h.set_xlim(0.5, n_bins + 0.5)
    ax_c.set_xlabel("K")
    ax_c.set_ylabel("Acc@K")
    ax_c.set_ylim(0.0, 1.02)
    ax_c.set_xlim(1, max(mr, 2))
    for ax in (ax_h, ax_c):
        ax.grid(True, alpha=0.3)
        if ranks_by_model:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_loss_curves(
    history: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str | None = None,
    xlabel: str = "step",
) -> Path:
    """Training curves, one small panel per loss term (each term has its own
    scale). ``history`` maps a term's name to its values per step or epoch.
    Non-finite values are left as gaps."""
    names = list(history.keys())
    n = max(1, len(names))
    n_cols = min(3, n)
    n_rows = math.ceil(n / n_cols)
    fig = _new_figure(4.0 * n_cols, 2.8 * n_rows + (0.4 if title else 0.0))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for idx in range(n_rows * n_cols):
        ax = axes[idx // n_cols][idx % n_cols]
        if idx >= len(names):
            ax.set_visible(False)
            continue
        name = names[idx]
        y = np.asarray(history[name], dtype=np.float64).reshape(-1)
        y = np.where(np.isfinite(y), y, np.nan)
        ax.plot(np.arange(1, len(y) + 1), y, linewidth=1.2, marker="." if len(y) < 30 else None)
        ax.set_title(str(name), fontsize=9)
        ax.set_xlim(0.5, max(len(y), 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def write_plot_table(path: str | Path, x_name: str, x_values: Sequence[float],
                     series: Mapping[str, Sequence[float]]) -> Path:
    """A data file for ``dvc plots``: a JSON list of rows ``{x_name: x, <series name>: y, ...}``.

    DVC draws one line per (file, field), so a wide table gives one line per method or model; a long
    table (one ``method`` column) cannot be split by DVC's templates. Non-finite values become null.
    """
    rows = []
    for i, x in enumerate(x_values):
        row: dict[str, float | None] = {x_name: float(x)}
        for name, ys in series.items():
            y = float(ys[i])
            row[str(name)] = y if np.isfinite(y) else None
        rows.append(row)
    path = Path(path)
    path.write_text(json.dumps(rows))
    return path


def rank_histogram_rows(ranks_by_model: Mapping[str, np.ndarray], max_rank: int) -> tuple[list[int], dict[str, list[int]]]:
    """(rank bins 1..max_rank+1, queries per bin per model); the last bin gathers ranks above ``max_rank``."""
    bins = list(range(1, int(max_rank) + 2))
    counts = {}
    for name, r in ranks_by_model.items():
        r = np.minimum(np.asarray(r).reshape(-1).astype(np.int64), max_rank + 1)
        counts[str(name)] = np.bincount(r, minlength=max_rank + 2)[1:].tolist()
    return bins, counts
