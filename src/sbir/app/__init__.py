"""``sbir app`` (``make app``): draw a sketch in the browser and see the photos a trained model retrieves.

* :mod:`~sbir.app.catalog`: the models and galleries named at start (ids -> checkpoints and folders),
  their embedding caches (:mod:`sbir.search`), one search of a drawn or uploaded sketch;
* :mod:`~sbir.app.server`: the FastAPI app (one page, a JSON API, upload limits) and a helper that
  serves it in a background thread for tests and benchmarks;
* :mod:`~sbir.app.cli`: the ``sbir app`` command line.

The canvas's strokes are sent as a Quick Draw ``drawing`` and go through the same parser, rasteriser
(at the gallery dataset's sketch size, line width and padding) and model-side resize as an ndjson
query of ``sbir search`` and the dataset's own sketches. See docs/app.md.
"""
from __future__ import annotations

from sbir.app.catalog import (
    DEFAULT_GALLERIES,
    DEFAULT_MODELS,
    Catalog,
    CatalogError,
    GalleryReadError,
    GallerySpec,
    ModelSpec,
    QueryResult,
    parse_gallery_spec,
    parse_model_spec,
)

__all__ = ["DEFAULT_GALLERIES", "DEFAULT_MODELS", "Catalog", "CatalogError", "GalleryReadError", "GallerySpec",
           "ModelSpec", "QueryResult", "parse_gallery_spec", "parse_model_spec"]
