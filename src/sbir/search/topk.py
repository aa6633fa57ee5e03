"""Exact cosine top-k over a gallery given as a tensor or as a stream of chunks (running top-k)."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from sbir.search.errors import SearchError

DEFAULT_MAX_ELEMENTS = 1 << 20  # similarity entries per step (4 MB of float32)
DEFAULT_BLOCK_ROWS = 16384  # gallery rows per step at most (4 MB of float32 at dim 64)


def _chunks_of(gallery: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray]
               ) -> Iterator[torch.Tensor]:
    if isinstance(gallery, np.ndarray):
        gallery = torch.from_numpy(gallery)
    if isinstance(gallery, torch.Tensor):
        if gallery.ndim != 2:
            raise SearchError(f"gallery embeddings must be 2-D (N, D), got shape {tuple(gallery.shape)}")
        yield gallery
        return
    for chunk in gallery:
        yield torch.from_numpy(chunk) if isinstance(chunk, np.ndarray) else chunk


def _sorted_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``sims`` (Q, C), descending, equal scores in ascending column order.

    ``torch.topk`` picks arbitrarily among equal values at the k-th place, so rows where the k-th
    and (k+1)-th values tie fall back to a stable full sort (rare with real embeddings)."""
    c = sims.shape[1]
    kk = min(k + 1, c)
    vals, idx = sims.topk(kk, dim=1, largest=True, sorted=True)
    if kk > k:
        tied = vals[:, k - 1] == vals[:, k]
        if bool(tied.any()):
            rows = torch.nonzero(tied).flatten()
            sv, si = torch.sort(sims[rows], dim=1, descending=True, stable=True)
            vals[rows], idx[rows] = sv[:, :kk], si[:, :kk]
        vals, idx = vals[:, :k], idx[:, :k]
    # order equal scores by index: sort by index, then a stable sort by score
    order = idx.argsort(dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


# Why not faiss (installed, and used as the reference in tests and the benchmark): IndexFlatIP keeps
# its own copy of the whole gallery in RAM (+245 MB at 10^6 x 64, measured) and cannot stream it from
# a Parquet file; exact search over streamed blocks needs only torch.topk and a merge.
@torch.no_grad()
def topk_cosine(queries: torch.Tensor | np.ndarray,
                gallery: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
                k: int, *, max_elements: int = DEFAULT_MAX_ELEMENTS, block_rows: int = DEFAULT_BLOCK_ROWS,
                normalize: bool = True, gallery_is_unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k of every query over a gallery, streamed.

    ``gallery`` is an (N, D) tensor/array or an iterable of (n_i, D) chunks in gallery order (e.g.
    :meth:`EmbeddingCache.iter_chunks`). Each chunk is cut into blocks of at most
    ``min(block_rows, max_elements // Q)`` rows, the (Q, block) similarity block is reduced to its
    top-k and merged with the running top-k, so no Q x N matrix is ever formed and the working memory
    is a few blocks whatever N (the normalised copy of a block, its similarities, the top-k). Returns ``(scores, indices)``, both
    (Q, min(k, N)), scores descending; equal scores are ordered by gallery index (so the result is
    deterministic). ``normalize`` L2-normalises queries and gallery rows (cosine); pass False for
    plain inner products. ``gallery_is_unit`` skips normalising the gallery rows when they are known
    to be unit length (an :class:`EmbeddingCache`): at one query that normalisation (a pass over
    every gallery row) costs about 10x the similarity itself.
    """
    q = torch.as_tensor(queries).float()
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[0] == 0:
        raise SearchError(f"queries must be a non-empty (Q, D) array, got shape {tuple(q.shape)}")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    if normalize:
        q = F.normalize(q, dim=1)
    nq, dim = q.shape
    step = max(1, min(int(block_rows), int(max_elements) // nq))
    # work on the queries' device: a CUDA query tensor searches a CPU/streamed gallery block by block
    best_v = torch.empty((nq, 0), dtype=torch.float32, device=q.device)
    best_i = torch.empty((nq, 0), dtype=torch.long, device=q.device)
    offset = 0
    for chunk in _chunks_of(gallery):
        if chunk.ndim != 2 or chunk.shape[1] != dim:
            raise SearchError(f"gallery chunk of shape {tuple(chunk.shape)} does not match query dim {dim}")
        for s in range(0, chunk.shape[0], step):
            block = chunk[s : s + step].to(q.device).float()
            if normalize and not gallery_is_unit:
                block = F.normalize(block, dim=1)
            sims = q @ block.T
            v, i = _sorted_topk(sims, min(k, block.shape[0]))
            # running entries come from earlier rows: concatenating them first keeps index order
            # among equal scores through the stable sort
            cat_v = torch.cat([best_v, v], dim=1)
            cat_i = torch.cat([best_i, i + offset], dim=1)
            order = torch.sort(cat_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = cat_v.gather(1, order), cat_i.gather(1, order)
            offset += block.shape[0]
    if offset == 0:
        raise SearchError("the gallery is empty (no embeddings to search)")
    return best_v, best_i
