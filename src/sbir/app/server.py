"""The web server of ``sbir app`` (FastAPI, served by uvicorn): one page and a small JSON API.

| route | what |
|---|---|
| ``GET /`` | the page: a drawing canvas (mouse, touch, pen), upload, model/gallery/k choice, results |
| ``GET /api/options`` | models and galleries offered (and those that could not be opened, with why), limits |
| ``POST /api/search/drawing`` | JSON ``{"model", "gallery", "k", "drawing": [[[x...], [y...]], ...]}`` |
| ``POST /api/search/upload?model=&gallery=&k=&filename=[&ndjson_line=]`` | the file's bytes as the body |

Bodies over ``max_upload_bytes`` are refused with 413 before they are read whole, a file type the
search cannot read with 415, a bad sketch with 400, an unknown model or gallery with 404; each as
``{"error": "..."}``, which the page shows. Uploads are parsed in memory: a request writes no file.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from sbir import search as S
from sbir.app.catalog import Catalog, CatalogError, GalleryReadError

UPLOAD_EXTS = (*S.RASTER_QUERY_EXTS, ".svg", *S.NDJSON_EXTS, ".npy")


@dataclass(frozen=True)
class Limits:
    """What one request may send."""

    max_upload_bytes: int = 2 * 1024 * 1024    # a sketch PNG/SVG/ndjson line is a few kB
    max_image_pixels: int = 4096 * 4096        # a raster is refused before decoding beyond this
    max_k: int = 50
    default_k: int = 8


class RequestError(Exception):
    """A request the server refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DrawingRequest(BaseModel):
    """The canvas's strokes, as a Quick Draw record holds them: one ``[[x...], [y...]]`` per stroke."""

    model: str
    gallery: str
    k: int = Field(8, ge=1)
    drawing: list[Any]


def page_html() -> str:
    """The one page (``static/index.html``, shipped with the package)."""
    return resources.files("sbir.app").joinpath("static", "index.html").read_text(encoding="utf-8")


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (by its
    Content-Length, else while it streams in), so a huge upload is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the upload is {int(declared):,} bytes; the limit is {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError | ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(S.SearchError)
    async def bad_query(request: Request, exc: S.SearchError) -> JSONResponse:
        status = 503 if isinstance(exc, GalleryReadError) else 404 if isinstance(exc, CatalogError) else 400
        return _error(status, str(exc))


def create_app(catalog: Catalog, limits: Limits = Limits()) -> FastAPI:
    """The app over an opened :class:`~sbir.app.catalog.Catalog` (no API docs pages: they load
    scripts from the internet)."""
    app = FastAPI(title="sbir app", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    page = page_html()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/options")
    def options() -> dict[str, Any]:
        return {**catalog.options(), "limits": asdict(limits), "upload_types": list(UPLOAD_EXTS)}

    @app.post("/api/search/drawing")
    async def search_drawing(request: Request) -> dict[str, Any]:
        body = await read_capped_body(request, limits.max_upload_bytes)
        try:
            req = DrawingRequest.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"bad request: the body is not JSON ({exc})") from exc
        except ValidationError as exc:
            raise RequestError(422, _validation_message(exc)) from exc
        check_k(req.k, limits)
        if all(isinstance(s, list) and s and isinstance(s[0], list) and not s[0] for s in req.drawing):
            raise RequestError(400, "the canvas is empty: draw a sketch (or upload one) first")
        return await _search(catalog, req.model, req.gallery, req.k,
                             lambda render: S.query_from_drawing(req.drawing, "canvas", render))

    @app.post("/api/search/upload")
    async def search_upload(request: Request, model: str, gallery: str, filename: str = Query(..., min_length=1),
                            k: int = 8, ndjson_line: int | None = Query(None, ge=1)) -> dict[str, Any]:
        check_k(k, limits)
        name = Path(filename).name  # only its extension matters; never used as a path
        if Path(name).suffix.lower() not in UPLOAD_EXTS:
            raise RequestError(415, f"{name}: unsupported file type; upload one of {', '.join(UPLOAD_EXTS)}")
        data = await read_capped_body(request, limits.max_upload_bytes)
        if not data:
            raise RequestError(400, f"{name}: the file is empty")
        return await _search(catalog, model, gallery, k, lambda render: S.query_from_bytes(
            data, name, render, ndjson_line, max_image_pixels=limits.max_image_pixels))

    return app


def check_k(k: int, limits: Limits) -> None:
    if not 1 <= k <= limits.max_k:
        raise RequestError(422, f"bad request: k must be between 1 and {limits.max_k}, got {k}")


async def _search(catalog: Catalog, model: str, gallery: str, k: int, make_query) -> dict[str, Any]:
    # the model runs in a worker thread: the event loop keeps answering (e.g. /api/options) meanwhile
    result = await run_in_threadpool(catalog.search, model, gallery, make_query, k)
    return result.to_dict()


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                        start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread (``port=0``: a free port); yields its base URL and
    stops the server when the block ends. For tests and benchmarks; ``sbir app`` runs uvicorn itself."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="sbir-app-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the app server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
