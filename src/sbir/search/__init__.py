"""Sketch -> photo search with the trained encoders (``sbir search``; also ``python -m sbir.search``).

Pieces (each importable on its own):

* :func:`load_encoder` opens a checkpoint the pipeline wrote: the category-level students
  (``outputs/distill/students.pt``, ``outputs/upper_bound/students.pt``), the teachers
  (``outputs/teacher_pretrain/teachers.pt``, model ``classifier_only``: each teacher's class
  probabilities, the evaluate stage's baseline) or the fine-grained F models
  (``outputs/fgsbir_joint/checkpoints/<variant>.pt``, or the folder plus ``model=<variant>``).
  Loading goes through the library loaders of :mod:`sbir.models.checkpoints` (``load_students``,
  ``load_teachers``, ``load_retrieval_checkpoint``) and images are resized to the model's image size
  with the same ``to_float`` + ``resize`` as the evaluate stages.
* :func:`load_query` reads one sketch: a raster (PNG/JPEG), an SVG, one Quick Draw ndjson line or a
  stroke-3 ``.npy`` (:func:`query_from_bytes` the same from an upload's bytes, :func:`query_from_drawing`
  from Quick Draw strokes such as those drawn on ``sbir app``'s canvas). Vector inputs are converted and rasterised with the project's own code
  (:mod:`sbir.data.svg`, the Quick Draw parser of :mod:`sbir.data.ingest`, :func:`sbir.strokes.rasterise`)
  at the gallery dataset's sketch size, line width and padding (:func:`render_spec_for`), so a
  query looks like the training sketches.
* :func:`open_gallery`: a folder of photos (recursive, jpg/png) or a prepared dataset's split.
* :func:`embed_gallery` embeds a gallery once into a Parquet cache keyed by the checkpoint's content
  hash, the model name, the image size and the gallery's identity (:class:`EmbeddingCache`).
* :func:`topk_cosine`: exact cosine top-k over a gallery given as a tensor or as a stream of chunks
  (a cache file is read one batch of rows at a time), keeping a running top-k, so memory stays
  bounded by a few blocks (``max_elements``, ``block_rows``) whatever the gallery size.
* :func:`search` ties them together; :func:`save_grid` draws the query and its top-k with scores.

Modules: :mod:`~sbir.search.topk`, :mod:`~sbir.search.encoders`, :mod:`~sbir.search.queries`,
:mod:`~sbir.search.galleries`, :mod:`~sbir.search.cache`, :mod:`~sbir.search.retrieval`
(:func:`embed_gallery`, :func:`search`), :mod:`~sbir.search.grid`; every public name is re-exported here.
"""
from __future__ import annotations

from sbir.search.cache import (
    CACHE_META_KEY,
    CACHE_ROW_GROUP,
    CACHE_VERSION,
    CacheWriter,
    EmbeddingCache,
    cache_filename,
    cache_key,
    default_cache_dir,
)
from sbir.search.encoders import SearchEncoder, file_sha256, list_models, load_encoder
from sbir.search.errors import CacheMismatchError, SearchError
from sbir.search.galleries import (
    PHOTO_EXTS,
    DatasetGallery,
    FolderGallery,
    Gallery,
    GalleryBatch,
    open_gallery,
    to_batch_tensor,
)
from sbir.search.grid import save_grid
from sbir.search.queries import (
    NDJSON_EXTS,
    RASTER_QUERY_EXTS,
    Query,
    RenderSpec,
    embed_queries,
    load_query,
    query_from_bytes,
    query_from_drawing,
    render_spec_for,
)
from sbir.search.retrieval import Hit, embed_gallery, search
from sbir.search.topk import DEFAULT_BLOCK_ROWS, DEFAULT_MAX_ELEMENTS, topk_cosine

__all__ = [
    "CACHE_META_KEY", "CACHE_ROW_GROUP", "CACHE_VERSION", "DEFAULT_BLOCK_ROWS", "DEFAULT_MAX_ELEMENTS", "NDJSON_EXTS",
    "PHOTO_EXTS", "RASTER_QUERY_EXTS",
    "CacheMismatchError", "CacheWriter", "DatasetGallery", "EmbeddingCache", "FolderGallery", "Gallery", "GalleryBatch",
    "Hit", "Query", "RenderSpec", "SearchEncoder", "SearchError",
    "cache_filename", "cache_key", "default_cache_dir", "embed_gallery", "embed_queries", "file_sha256", "list_models",
    "load_encoder", "load_query", "open_gallery", "query_from_bytes", "query_from_drawing", "render_spec_for",
    "save_grid", "search", "to_batch_tensor", "topk_cosine",
]
