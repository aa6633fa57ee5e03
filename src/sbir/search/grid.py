"""The result grid: each query sketch and its top-k photos with rank, score and class."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from sbir.search.galleries import Gallery
from sbir.search.queries import Query
from sbir.search.retrieval import Hit


def save_grid(queries: Sequence[Query], results: Sequence[Sequence[Hit]], gallery: Gallery,
              path: str | os.PathLike, title: str | None = None) -> Path:
    """One row per query: the query sketch, then its top-k photos captioned with rank, score and class.

    Drawn here rather than with ``sbir.plots.image_grid`` because every cell needs its own caption."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = gallery.fetch(sorted({h.id for hits in results for h in hits}))
    ncols = 1 + max((len(h) for h in results), default=0)
    fig = Figure(figsize=(1.6 * ncols, 1.9 * len(queries) + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(queries), ncols, squeeze=False)
    for qi, (q, hits) in enumerate(zip(queries, results)):
        for j in range(ncols):
            ax = axes[qi][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.imshow(q.image[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(f"query\n{Path(q.name).name[:18]}", fontsize=7)
            elif j - 1 < len(hits):
                h = hits[j - 1]
                ax.imshow(images[h.id], interpolation="nearest")
                ax.set_title(f"#{h.rank} {h.score:.3f}\n{(h.class_name or Path(h.id).name)[:18]}", fontsize=7)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.1, hspace=0.45)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return out
