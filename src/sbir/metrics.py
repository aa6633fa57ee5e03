"""Retrieval metrics for category-level and fine-grained SBIR.

These metrics are written by hand on purpose. The SBIR numbers have to follow
exact conventions that no library implements together: average precision over
the *whole* ranked gallery, a fixed rule for tied scores, and a fixed rule for
queries with no relevant gallery item. Library versions (``sklearn``,
``torchmetrics`` and so on) truncate, break ties in other ways, or drop such
queries. The public reference code had its own bugs: its "mAP" stopped after
10 relevant hits, and its "precision" was that truncated AP. Neither is
repeated here (see ``METHOD.md``).

Conventions (the same in every function of this module)
--------------------------------------------------------
* **Similarity**: cosine similarity. Both sides are L2-normalised, and an
  all-zero vector has similarity 0 to everything.
* **Ranking**: the gallery is sorted by descending similarity.
* **Ties are broken pessimistically and deterministically**. Among gallery
  items with exactly equal similarity (float equality), the *irrelevant* ones
  rank first. The order among equal relevant items does not change any metric.
  So constant or collapsed embeddings get the lowest score that their ranking
  allows, never an inflated one. For fine-grained ranks, ties count against
  the query in the same way.
* **AP@all** = mean of precision@i over the ranks i of *all* relevant items in
  the gallery, with no truncation.
* **AP@k** = (sum of precision@i over the relevant items ranked in the top k)
  / min(k, number of relevant items in the gallery). The score is 1 if the top
  k is as good as it can be. This is the common SBIR convention (e.g.
  Doodle2Search / ZS-SBIR code).
* **P@k** = (number of relevant items in the top k) / k. If the gallery has
  fewer than k items, the "top k" is the whole gallery, and the count is
  still divided by k.
* **Queries with no relevant gallery item** keep AP = 0 and P@k = 0 and are
  counted in the means. They are never dropped. Their number is reported
  separately as ``num_queries_without_relevant``.
* Queries are processed in batches, so the memory used is O(batch x gallery).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray | Sequence

__all__ = [
    "cosine_similarity_matrix",
    "category_retrieval_metrics",
    "precision_recall_curve",
    "true_match_ranks",
    "accuracy_at_k",
    "chance_category_metrics",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _as_float_tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {tuple(t.shape)}")
    return t.to(device) if device is not None else t


def _labels_to_int(query_labels: ArrayLike, gallery_labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return the two label arrays as int64 codes. Any hashable label type
    (ints, strings) works, and equal labels get equal codes."""

    def to_np(x: ArrayLike) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy().reshape(-1)
        return np.asarray(x).reshape(-1)

    q, g = to_np(query_labels), to_np(gallery_labels)
    if q.dtype.kind in "iub" and g.dtype.kind in "iub":
        return q.astype(np.int64), g.astype(np.int64)
    _, codes = np.unique(np.concatenate([q.astype(object).astype(str), g.astype(object).astype(str)]),
                         return_inverse=True)
    return codes[: len(q)].astype(np.int64), codes[len(q):].astype(np.int64)


def cosine_similarity_matrix(queries: ArrayLike, gallery: ArrayLike) -> torch.Tensor:
    """Cosine similarity of every query to every gallery item, shape (Q, N).

    Both inputs are L2-normalised first. Zero vectors get similarity 0. The
    result is on the queries' device, in float64 if either input is float64
    and in float32 otherwise.
    """
    q = _as_float_tensor(queries)
    g = _as_float_tensor(gallery, device=q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"embedding dims differ: {q.shape[1]} vs {g.shape[1]}")
    dtype = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    q = F.normalize(q.to(dtype), dim=1)
    g = F.normalize(g.to(dtype), dim=1)
    return q @ g.T


def _pessimistic_ranked_relevance(sims: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Sort each row by descending similarity, with irrelevant items first
    among exact ties, and return the relevance (0/1 float64) in ranked order.

    This takes two stable sorts. The first puts the irrelevant items before the
    relevant ones. The second, by similarity, keeps that order among equal
    scores.
    """
    perm = torch.sort(rel.to(torch.int8), dim=1, stable=True).indices
    sims_p = torch.gather(sims, 1, perm)
    rel_p = torch.gather(rel, 1, perm)
    order = torch.sort(sims_p, dim=1, descending=True, stable=True).indices
    return torch.gather(rel_p, 1, order).to(torch.float64)


def _metrics_from_ranked(rel_sorted: torch.Tensor, ks_map: Sequence[int],
                         ks_precision: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-query metrics, each of shape (B,), from the ranked relevance
    matrix (B, N) of 0/1 values. The gallery must contain every relevant item."""
    n = rel_sorted.shape[1]
    hits = torch.cumsum(rel_sorted, dim=1)  # relevant items in the top i
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=rel_sorted.device)
    prec_at_rel = hits / ranks * rel_sorted  # precision@i at relevant ranks, else 0
    n_rel = hits[:, -1]
    out: dict[str, torch.Tensor] = {}
    out["mAP@all"] = torch.where(n_rel > 0, prec_at_rel.sum(1) / n_rel.clamp(min=1), torch.zeros_like(n_rel))
    for k in ks_map:
        kk = min(int(k), n)
        denom = torch.minimum(n_rel, torch.tensor(float(k), dtype=torch.float64, device=n_rel.device))
        num = prec_at_rel[:, :kk].sum(1)
        out[f"mAP@{k}"] = torch.where(n_rel > 0, num / denom.clamp(min=1), torch.zeros_like(n_rel))
    for k in ks_precision:
        kk = min(int(k), n)
        out[f"P@{k}"] = hits[:, kk - 1] / float(k)
    return out


def _check_ks(ks: Sequence[int]) -> None:
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")


# --------------------------------------------------------------------------
# category-level retrieval
# --------------------------------------------------------------------------
def category_retrieval_metrics(
    query_emb: ArrayLike,
    query_labels: ArrayLike,
    gallery_emb: ArrayLike,
    gallery_labels: ArrayLike,
    ks_map: Sequence[int] = (200,),
    ks_precision: Sequence[int] = (100, 200),
    batch_size: int = 1024,
) -> dict[str, float]:
    """Category-level SBIR metrics, averaged over all queries.

    A gallery item is relevant to a query when their labels are equal. The
    keys returned are ``mAP@all``, ``mAP@{k}`` for k in ``ks_map``, ``P@{k}``
    for k in ``ks_precision``, and ``num_queries_without_relevant``. The
    module docstring gives the exact conventions: pessimistic ties, AP@k
    divided by min(k, #relevant), and queries with no relevant item counted
    with AP = 0.

    The work runs on the device of ``query_emb``, ``batch_size`` queries at a
    time.
    """
    _check_ks(ks_map)
    _check_ks(ks_precision)
    q = _as_float_tensor(query_emb)
    device = q.device
    g = _as_float_tensor(gallery_emb, device=device)
    ql_np, gl_np = _labels_to_int(query_labels, gallery_labels)
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError("need at least one query and one gallery item")
    if len(ql_np) != q.shape[0] or len(gl_np) != g.shape[0]:
        raise ValueError("labels and embeddings differ in length")
    ql = torch.as_tensor(ql_np, device=device)
    gl = torch.as_tensor(gl_np, device=device)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")

    sums: dict[str, float] = {}
    no_rel = 0
    for start in range(0, q.shape[0], batch_size):
        sims = cosine_similarity_matrix(q[start:start + batch_size], g)
        rel = ql[start:start + batch_size, None] == gl[None, :]
        no_rel += int((~rel.any(dim=1)).sum().item())
        per_q = _metrics_from_ranked(_pessimistic_ranked_relevance(sims, rel), ks_map, ks_precision)
        for key, v in per_q.items():
            sums[key] = sums.get(key, 0.0) + float(v.sum().item())
    nq = q.shape[0]
    result = {key: s / nq for key, s in sums.items()}
    result["num_queries_without_relevant"] = no_rel
    return result


def precision_recall_curve(
    query_emb: ArrayLike,
    query_labels: ArrayLike,
    gallery_emb: ArrayLike,
    gallery_labels: ArrayLike,
    num_points: int = 101,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision-recall curve, averaged over queries.

    The recall levels are ``r = linspace(0, 1, num_points)``. For each query,
    the interpolated precision at r is the highest precision@i over the ranks
    i whose recall is >= r (the usual interpolation). The ranking uses the
    same pessimistic tie rule as :func:`category_retrieval_metrics`. Queries
    with no relevant gallery item have no defined recall, so they are left
    out of this curve (they still count, with AP = 0, in the mAP). If no query
    has a relevant item, the precision is all zeros.

    Returns ``(recall, precision)``, two float64 arrays of length ``num_points``.
    """
    if num_points < 2:
        raise ValueError("num_points must be >= 2")
    q = _as_float_tensor(query_emb)
    device = q.device
    g = _as_float_tensor(gallery_emb, device=device)
    ql_np, gl_np = _labels_to_int(query_labels, gallery_labels)
    if len(ql_np) != q.shape[0] or len(gl_np) != g.shape[0]:
        raise ValueError("labels and embeddings differ in length")
    ql = torch.as_tensor(ql_np, device=device)
    gl = torch.as_tensor(gl_np, device=device)
    levels = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64, device=device)
    n = g.shape[0]
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=device)

    total = torch.zeros(num_points, dtype=torch.float64, device=device)
    counted = 0
    for start in range(0, q.shape[0], batch_size):
        sims = cosine_similarity_matrix(q[start:start + batch_size], g)
        rel = ql[start:start + batch_size, None] == gl[None, :]
        keep = rel.any(dim=1)
        if not bool(keep.any()):
            continue
        rel_sorted = _pessimistic_ranked_relevance(sims[keep], rel[keep])
        hits = torch.cumsum(rel_sorted, dim=1)
        precision = hits / ranks
        recall = hits / hits[:, -1:]
        # max precision at any rank >= i: a reversed cumulative max
        interp = torch.flip(torch.cummax(torch.flip(precision, [1]), dim=1).values, [1])
        # first rank whose recall reaches the level (a small tolerance for float error)
        tgt = (levels - 1e-9).expand(recall.shape[0], -1).contiguous()
        idx = torch.searchsorted(recall.contiguous(), tgt).clamp(max=n - 1)
        total += torch.gather(interp, 1, idx).sum(0)
        counted += int(keep.sum().item())
    precision_curve = (total / counted) if counted else total
    return levels.cpu().numpy(), precision_curve.cpu().numpy()


# --------------------------------------------------------------------------
# fine-grained retrieval
# --------------------------------------------------------------------------
def true_match_ranks(
    query_emb: ArrayLike,
    gallery_emb: ArrayLike,
    true_index: ArrayLike,
    batch_size: int = 1024,
) -> np.ndarray:
    """The 1-based rank of each query's true gallery item (photo), shape (Q,), int64.

    rank = 1 + the number of *other* gallery items whose similarity is >= the
    true item's. Ties count against the query: a gallery of identical
    embeddings gives rank N.
    """
    q = _as_float_tensor(query_emb)
    device = q.device
    g = _as_float_tensor(gallery_emb, device=device)
    if isinstance(true_index, torch.Tensor):
        ti_np = true_index.detach().cpu().numpy().reshape(-1)
    else:
        ti_np = np.asarray(true_index).reshape(-1)
    ti_np = ti_np.astype(np.int64)
    if len(ti_np) != q.shape[0]:
        raise ValueError("true_index and query embeddings differ in length")
    if len(ti_np) and (ti_np.min() < 0 or ti_np.max() >= g.shape[0]):
        raise ValueError("true_index out of range of the gallery")
    ti = torch.as_tensor(ti_np, device=device)
    out = []
    for start in range(0, q.shape[0], batch_size):
        sims = cosine_similarity_matrix(q[start:start + batch_size], g)
        idx = ti[start:start + batch_size, None]
        s_true = torch.gather(sims, 1, idx)
        # the count includes the true item itself (s_true >= s_true), which
        # supplies the "1 +"
        out.append((sims >= s_true).sum(dim=1))
    if not out:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(out).cpu().numpy().astype(np.int64)


def accuracy_at_k(ranks: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Acc@K = share of queries whose true item has rank <= K. Keys are ``acc@{K}``."""
    _check_ks(ks)
    r = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    r = r.reshape(-1)
    if r.size == 0:
        raise ValueError("no ranks given")
    return {f"acc@{k}": float(np.mean(r <= k)) for k in ks}


# --------------------------------------------------------------------------
# chance level
# --------------------------------------------------------------------------
def _expected_random_metrics(n: int, r: int, ks_map: Sequence[int],
                             ks_precision: Sequence[int]) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking of n items, r of
    them relevant.

    With rel_i the relevance at rank i and C_i = sum_{j<=i} rel_j:
        E[rel_i * C_i] = r/n + (i-1) * r(r-1) / (n(n-1))
    so E[sum over the top K of rel_i * C_i / i]
        = sum_{i<=K} (1/i) [r/n + (i-1) r(r-1)/(n(n-1))].
    AP@all divides that (K = n) by r, AP@k (K = min(k, n)) by min(k, r), and
    E[P@k] = min(k, n) * r / n / k.
    """
    keys = ["mAP@all"] + [f"mAP@{k}" for k in ks_map] + [f"P@{k}" for k in ks_precision]
    if r == 0:
        return {key: 0.0 for key in keys}
    i = np.arange(1, n + 1, dtype=np.float64)
    pair = (r * (r - 1)) / (n * (n - 1)) if n > 1 else 0.0
    terms = (r / n + (i - 1) * pair) / i
    csum = np.cumsum(terms)
    out = {"mAP@all": float(csum[-1] / r)}
    for k in ks_map:
        out[f"mAP@{k}"] = float(csum[min(k, n) - 1] / min(k, r))
    for k in ks_precision:
        out[f"P@{k}"] = float(min(k, n) * r / n / k)
    return out


def chance_category_metrics(
    query_labels: ArrayLike,
    gallery_labels: ArrayLike,
    ks_map: Sequence[int] = (200,),
    ks_precision: Sequence[int] = (100, 200),
) -> dict[str, float]:
    """Expected category-level metrics of a uniformly random ranking (the
    "chance" row of the results table).

    The values are computed **analytically**, as exact expectations (see
    :func:`_expected_random_metrics`), not by sampling. A random ranking has
    no ties, so the tie rule does not apply. Queries with no relevant gallery
    item count with 0, as in :func:`category_retrieval_metrics`. The keys are
    the same as there.
    """
    _check_ks(ks_map)
    _check_ks(ks_precision)
    ql, gl = _labels_to_int(query_labels, gallery_labels)
    n = len(gl)
    if len(ql) == 0 or n == 0:
        raise ValueError("need at least one query and one gallery item")
    g_vals, g_counts = np.unique(gl, return_counts=True)
    count_of = dict(zip(g_vals.tolist(), g_counts.tolist()))
    q_vals, q_counts = np.unique(ql, return_counts=True)
    sums: dict[str, float] = {}
    no_rel = 0
    for lab, nq in zip(q_vals.tolist(), q_counts.tolist()):
        r = count_of.get(lab, 0)
        if r == 0:
            no_rel += nq
        for key, v in _expected_random_metrics(n, r, ks_map, ks_precision).items():
            sums[key] = sums.get(key, 0.0) + nq * v
    result = {key: s / len(ql) for key, s in sums.items()}
    result["num_queries_without_relevant"] = no_rel
    return result
