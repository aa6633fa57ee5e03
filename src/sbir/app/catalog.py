"""What ``sbir app`` serves: the models and galleries named at start, their embedding caches, and one
search of a drawn or uploaded sketch.

Requests name a model and a gallery by the id they were given at start (``crossx_dfl``, ``test``),
never by a path: the catalog is the only thing that maps ids to files. Everything that needs a file
(loading a checkpoint, opening a gallery, embedding it into the :mod:`sbir.search` cache) happens in
:meth:`Catalog.open`, before the server answers a request, so a search reads and writes nothing but
the photos of its results (read from the gallery, never written)."""
from __future__ import annotations

import base64
import io
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sbir import search as S

#: the models of the default pipeline (issue #17: CrossX-DFL students, the fine-grained model, classifier-only)
DEFAULT_MODELS = (
    "crossx_dfl=outputs/distill/students.pt",
    "fine_grained=outputs/fgsbir_joint/checkpoints@semi",
    "classifier_only=outputs/teacher_pretrain/teachers.pt",
)
DEFAULT_GALLERIES = ("test=data/prepared@test",)
THUMBNAIL_SIDE = 192  # photos larger than this are shrunk before they are sent to the page


class CatalogError(S.SearchError):
    """A request names a model or gallery this server does not offer, or one that could not be opened."""


class GalleryReadError(CatalogError):
    """The photos of a result could not be read (the gallery changed or went away after the start)."""


@dataclass(frozen=True)
class ModelSpec:
    """``ID=CHECKPOINT[@MODEL]``: a checkpoint file or folder and, for a folder of several, the model in it."""

    id: str
    checkpoint: Path
    model: str | None = None


@dataclass(frozen=True)
class GallerySpec:
    """``ID=PATH[@SPLIT,SPLIT]``: a prepared dataset (its splits; default test) or a folder of photos."""

    id: str
    path: Path
    splits: tuple[str, ...] = ("test",)


def _split_spec(text: str, what: str) -> tuple[str, str, str | None]:
    ident, sep, rest = text.partition("=")
    if not sep:  # no id given: name it after the file or folder
        ident, rest = "", text
    location, at, extra = rest.partition("@")
    if not location:
        raise CatalogError(f"{what} {text!r}: expected ID=PATH[@...], e.g. {DEFAULT_MODELS[0]!r}")
    ident = ident or Path(location).stem or Path(location).name
    if not ident.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise CatalogError(f"{what} {text!r}: the id {ident!r} may hold only letters, digits, '_', '-' and '.'")
    return ident, location, (extra if at else None)


def parse_model_spec(text: str) -> ModelSpec:
    """``"crossx_dfl=outputs/distill/students.pt"``, ``"fg=outputs/fgsbir_joint/checkpoints@supervised"``."""
    ident, location, model = _split_spec(text, "--model")
    return ModelSpec(ident, Path(location), model or None)


def parse_gallery_spec(text: str) -> GallerySpec:
    """``"test=data/prepared@test"``, ``"all=data/prepared@train,test"``, ``"mine=~/photos"``."""
    ident, location, splits = _split_spec(text, "--gallery")
    chosen = tuple(s for s in (splits or "test").split(",") if s)
    return GallerySpec(ident, Path(location).expanduser(), chosen or ("test",))


@dataclass
class QueryResult:
    """One search as the page shows it: the query as the model saw it, the top-k and the timings."""

    model: str
    gallery: str
    query_kind: str
    query_image: str                 # data: URI of the rasterised query (what the encoder was given)
    hits: list[dict[str, Any]]
    search_ms: float                 # rasterise + embed the sketch + top-k over the cached gallery
    total_ms: float = 0.0            # the above plus reading and encoding the result photos

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "gallery": self.gallery, "query": {"kind": self.query_kind,
                                                                         "image": self.query_image},
                "hits": self.hits, "k": len(self.hits),
                "latency_ms": {"search": round(self.search_ms, 2), "server": round(self.total_ms, 2)}}


def png_data_uri(image: np.ndarray) -> str:
    """uint8 HxW or HxWx3 -> ``data:image/png;base64,...`` (shrunk to :data:`THUMBNAIL_SIDE` when larger)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image))
    if max(img.size) > THUMBNAIL_SIDE:
        img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Catalog:
    """The models and galleries a server was started with, opened, and their gallery embeddings."""

    encoders: dict[str, S.SearchEncoder] = field(default_factory=dict)
    galleries: dict[str, S.Gallery] = field(default_factory=dict)
    unavailable: dict[str, dict[str, str]] = field(default_factory=lambda: {"models": {}, "galleries": {}})
    caches: dict[tuple[str, str], S.EmbeddingCache] = field(default_factory=dict)
    renders: dict[tuple[str, str], S.RenderSpec] = field(default_factory=dict)
    # one search at a time: a local demo server, and torch already uses the cores for one query
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, models: Sequence[ModelSpec], galleries: Sequence[GallerySpec], cache: str | os.PathLike | None = None,
             render_like: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> "Catalog":
        """Load every model, open every gallery and embed each gallery with each model (cached in
        ``cache``, see :func:`sbir.search.embed_gallery`). A model or gallery that cannot be opened
        (a missing checkpoint or folder, a bad file) is kept out with its reason, which the page
        shows; :class:`CatalogError` when no model or no gallery is left."""
        cat = cls()
        for spec in models:
            cat._add_model(spec, log)
        for spec in galleries:
            cat._add_gallery(spec, log)
        if not cat.encoders or not cat.galleries:
            reasons = [f"{'model' if group == 'models' else 'gallery'} {i}: {why}"
                       for group, d in cat.unavailable.items() for i, why in d.items()]
            raise CatalogError("nothing to serve: " + ("; ".join(reasons) or "no model or no gallery given") +
                               " (run `make repro` for the default outputs, or pass --model / --gallery)")
        for mid, enc in cat.encoders.items():
            for gid, gallery in cat.galleries.items():
                like = render_like or (gallery.path if gallery.kind == "dataset" else None)
                cat.renders[mid, gid] = S.render_spec_for(like, enc.image_size)
                cat.caches[mid, gid] = S.embed_gallery(enc, gallery, cache, progress=False, log=log)
        return cat

    def _add_model(self, spec: ModelSpec, log: Callable[[str], None]) -> None:
        if spec.id in self.encoders or spec.id in self.unavailable["models"]:
            raise CatalogError(f"--model: the id {spec.id!r} is given twice")
        try:
            self.encoders[spec.id] = S.load_encoder(spec.checkpoint, spec.model)
        except S.SearchError as exc:
            self.unavailable["models"][spec.id] = str(exc)
            log(f"model {spec.id}: not available ({exc})")

    def _add_gallery(self, spec: GallerySpec, log: Callable[[str], None]) -> None:
        if spec.id in self.galleries or spec.id in self.unavailable["galleries"]:
            raise CatalogError(f"--gallery: the id {spec.id!r} is given twice")
        from sbir.data.format import DatasetFormatError

        try:
            self.galleries[spec.id] = S.open_gallery(spec.path, spec.splits)
        except (S.SearchError, DatasetFormatError, OSError) as exc:
            self.unavailable["galleries"][spec.id] = str(exc)
            log(f"gallery {spec.id}: not available ({exc})")

    def options(self) -> dict[str, Any]:
        """What the page offers: models and galleries (with sizes), and those that could not be opened."""
        models = [{"id": i, "name": e.name, "kind": e.kind, "checkpoint": str(e.checkpoint),
                   "image_size": e.image_size} for i, e in self.encoders.items()]
        galleries = [{"id": i, "path": str(g.path), "kind": g.kind, "photos": len(g),
                      "splits": list(getattr(g, "splits", []))} for i, g in self.galleries.items()]
        return {"models": models, "galleries": galleries, "unavailable": self.unavailable}

    def _pair(self, model: str, gallery: str) -> tuple[S.SearchEncoder, S.Gallery]:
        for kind, group, ident, offered in (("model", "models", model, self.encoders),
                                            ("gallery", "galleries", gallery, self.galleries)):
            if ident in offered:
                continue
            why = self.unavailable[group].get(ident)
            if why:
                raise CatalogError(f"{kind} {ident!r} is not available: {why}")
            raise CatalogError(f"no {kind} {ident!r}; this server offers: {', '.join(offered) or 'none'}")
        return self.encoders[model], self.galleries[gallery]

    def search(self, model: str, gallery: str, make_query: Callable[[S.RenderSpec], S.Query],
               k: int) -> QueryResult:
        """Top-k photos of the query ``make_query`` builds with this pair's rendering (a drawing, an upload)."""
        encoder, photos = self._pair(model, gallery)
        with self.lock:
            t0 = time.perf_counter()
            query = make_query(self.renders[model, gallery])
            hits = S.search(encoder, [query], self.caches[model, gallery], k)[0]
            search_ms = (time.perf_counter() - t0) * 1000
            rows = self._result_rows(gallery, photos, hits)
            result = QueryResult(model, gallery, query.kind, png_data_uri(query.image[0].numpy()), rows, search_ms)
            result.total_ms = (time.perf_counter() - t0) * 1000
        return result

    @staticmethod
    def _result_rows(gallery_id: str, photos: S.Gallery, hits: Sequence[S.Hit]) -> list[dict[str, Any]]:
        from sbir.data.format import DatasetFormatError

        try:
            images = photos.fetch([h.id for h in hits])
            return [{"rank": h.rank, "score": round(h.score, 4), "id": h.id, "class_name": h.class_name,
                     "image": png_data_uri(images[h.id])} for h in hits]
        except (OSError, ValueError, KeyError, DatasetFormatError) as exc:
            raise GalleryReadError(f"gallery {gallery_id!r} ({photos.path}): cannot read the result photos "
                                   f"({type(exc).__name__}: {exc}); it changed or moved after the server "
                                   f"started") from exc
