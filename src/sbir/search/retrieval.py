"""Gallery embeddings (cached) and the top-k search of sketch queries over them."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sbir.search.cache import CACHE_ROW_GROUP, CacheWriter, EmbeddingCache, cache_filename, cache_key, default_cache_dir
from sbir.search.encoders import SearchEncoder
from sbir.search.errors import CacheMismatchError, SearchError
from sbir.search.galleries import Gallery, to_batch_tensor
from sbir.search.queries import Query, embed_queries
from sbir.search.topk import DEFAULT_MAX_ELEMENTS, topk_cosine


def embed_gallery(encoder: SearchEncoder, gallery: Gallery, cache: str | os.PathLike | None = None, *,
                  batch_size: int = 256, rebuild: bool = False, progress: bool = True,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> EmbeddingCache:
    """Gallery embeddings from the cache, computed (and cached) when missing.

    ``cache``: None -> :func:`default_cache_dir`; a folder -> a file named after the key inside it; a
    ``.parquet`` path -> exactly that file. A file found under its key-derived name is reused when
    its key matches (a mismatch there means a damaged file: it is recomputed, with a message). An
    explicitly named file made by another checkpoint, model, image size or gallery raises
    :class:`CacheMismatchError` instead: silently replacing a file the user pointed at could discard
    a costly embedding run, and using it would give wrong results. ``rebuild`` recomputes always.
    Unreadable photos are skipped, counted and listed in the cache metadata (``skipped``)."""
    key = cache_key(encoder, gallery.identity())
    explicit = cache is not None and str(cache).endswith(".parquet")
    if explicit:
        path = Path(cache)
    else:
        path = Path(cache or default_cache_dir()) / cache_filename(key, gallery.path)
    if path.exists() and not rebuild:
        found = EmbeddingCache(path)
        if found.key() == key:
            log(f"gallery embeddings: cache hit {path} ({len(found)} photos, {found.meta.get('skipped', 0)} skipped)")
            return found
        diff = {k: (found.key().get(k), v) for k, v in key.items() if found.key().get(k) != v}
        made_by = f"{found.meta.get('checkpoint', '?')} (sha256 {str(found.meta.get('checkpoint_sha256'))[:12]}), " \
                  f"model {found.meta.get('model')!r}"
        if explicit:
            raise CacheMismatchError(
                f"{path}: this cache was embedded by {made_by} for gallery {found.meta.get('gallery_path')!r}; "
                f"it does not match this search (differs in {', '.join(diff)}). Pass --rebuild-cache to "
                f"overwrite it, or another --cache path")
        log(f"gallery embeddings: {path} does not match its key (differs in {', '.join(diff)}); recomputing")
    meta = {**key, "checkpoint": str(encoder.checkpoint), "gallery_path": str(gallery.path),
            "gallery_kind": gallery.kind, "embed_dim": encoder.embed_dim}
    writer = CacheWriter(path, encoder.embed_dim, meta)
    from tqdm import tqdm

    t0 = time.perf_counter()
    gallery.skipped = []
    try:
        with tqdm(total=len(gallery), desc=f"embedding gallery ({encoder.name})", unit="photo",
                  disable=not progress, file=sys.stderr) as bar:
            seen_skips = 0
            for b in gallery.batches(batch_size):
                if b.images:
                    emb = _embed_float(encoder, to_batch_tensor(b.images, encoder.image_size))
                    writer.add(b.ids, b.labels, b.class_names, emb)
                bar.update(len(b.images) + len(gallery.skipped) - seen_skips)
                seen_skips = len(gallery.skipped)
        writer.meta.update(skipped=len(gallery.skipped), skipped_examples=gallery.skipped[:20],
                           seconds=round(time.perf_counter() - t0, 3))
        if writer.count == 0:
            raise SearchError(f"gallery {gallery.path}: no photo could be read ({len(gallery.skipped)} unreadable; "
                              f"first: {gallery.skipped[:1]})")
        out = writer.close()
    except BaseException:
        writer.abort()
        raise
    if gallery.skipped:
        log(f"gallery embeddings: skipped {len(gallery.skipped)} unreadable photo(s), e.g. {gallery.skipped[0]}")
    log(f"gallery embeddings: wrote {path} ({len(out)} photos in {writer.meta['seconds']:.1f} s)")
    return out


@torch.no_grad()
def _embed_float(encoder: SearchEncoder, x: torch.Tensor) -> torch.Tensor:
    """Photo embeddings of float images already at the model's size."""
    return F.normalize(encoder.photo_fn(x).float(), dim=1)


# ============================================================================ search
@dataclass
class Hit:
    rank: int
    score: float
    row: int
    id: str
    label: int | None
    class_name: str | None


def search(encoder: SearchEncoder, queries: Sequence[Query], cache: EmbeddingCache, k: int = 10,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[list[Hit]]:
    """Top-k gallery photos of every query (cosine), streamed from the cache."""
    q = embed_queries(encoder, queries)
    rows_per_chunk = max(1, min(CACHE_ROW_GROUP, max_elements // len(queries)))
    # the cache holds unit vectors (embed_gallery normalises them before writing)
    scores, idx = topk_cosine(q, cache.iter_chunks(rows_per_chunk), k, max_elements=max_elements,
                              gallery_is_unit=True)
    info = cache.rows(idx.flatten().tolist())
    out, n = [], idx.shape[1]
    for qi in range(len(queries)):
        hits = []
        for r in range(n):
            meta = info[qi * n + r]
            hits.append(Hit(r + 1, float(scores[qi, r]), int(idx[qi, r]), meta["id"], meta.get("label"),
                            meta.get("class_name")))
        out.append(hits)
    return out
