"""``sbir app``: the draw-and-search page on a local web server (``make app``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sbir.app.catalog import DEFAULT_GALLERIES, DEFAULT_MODELS

_DEFAULT_MODELS_TEXT = "\n".join(" " * 32 + m for m in DEFAULT_MODELS)
APP_HELP = f"""\
Serve a web page where you draw a sketch (mouse, touch or pen; undo, clear) or upload one (.png/.jpg,
.svg, a Quick Draw .ndjson line, a stroke-3 .npy), pick a model and a gallery, and see the top-k photos
with their scores and the query's latency.

The drawn strokes go to the model exactly as a dataset sketch does: sent as a Quick Draw drawing,
parsed by the Quick Draw ingest, rasterised by the project's rasteriser at the gallery dataset's sketch
size, line width and padding, then resized like the evaluate stages' inputs.

MODEL (--model, repeatable)   ID=CHECKPOINT[@MODEL]: a checkpoint `sbir search --checkpoint` takes (a
                              students.pt, teachers.pt for classifier_only, an F checkpoint or the folder
                              of them, @MODEL picking one). Default:
{_DEFAULT_MODELS_TEXT}
GALLERY (--gallery, repeatable) ID=PATH[@SPLIT,SPLIT]: a prepared dataset (its splits, default test) or a
                              folder of photos. Default: {DEFAULT_GALLERIES[0]}

Only these models and galleries are served; a request names them by ID, never by a path. Every gallery
is embedded with every model before the server starts (the `sbir search` cache, --cache), so a query
costs one sketch embedding and a top-k. A model or gallery that cannot be opened is listed on the page
with the reason; the server refuses to start only when no model or no gallery is left.

The server listens on 127.0.0.1 (this machine only) unless --host says otherwise. Uploads over
--max-upload-kb are refused (413); a request writes no file.

examples:
  make app                                         # the default outputs, http://127.0.0.1:8000
  sbir app --port 8080
  sbir app --model semi=outputs/fgsbir_joint/checkpoints@semi --gallery photos=~/my-photos
  sbir app --gallery all=data/prepared@train,test
"""


def add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="draw a sketch in the browser and search photos (local web server)",
                       description=APP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, metavar="ID=CHECKPOINT[@MODEL]",
                   help="a model to offer, repeatable (default: the three of the default pipeline)")
    p.add_argument("--gallery", action="append", default=None, metavar="ID=PATH[@SPLITS]",
                   help=f"a gallery to offer, repeatable (default: {DEFAULT_GALLERIES[0]})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="embedding cache folder (default: $SBIR_SEARCH_CACHE or ~/.cache/sbir/search)")
    p.add_argument("--render-like", default=None, metavar="DATASET",
                   help="rasterise drawings like this prepared dataset's sketches (default: the gallery's own)")
    p.add_argument("--max-upload-kb", type=int, default=2048, help="largest upload accepted (default: %(default)s)")
    p.add_argument("--max-k", type=int, default=50, help="largest k a request may ask for (default: %(default)s)")
    p.add_argument("-k", "--top-k", type=int, default=8, help="the page's initial k (default: %(default)s)")
    p.set_defaults(func=run_app)


def build_app(args: argparse.Namespace):
    """The FastAPI app ``sbir app`` serves, from its parsed arguments (models loaded, galleries embedded)."""
    from sbir.app.catalog import Catalog, CatalogError, parse_gallery_spec, parse_model_spec
    from sbir.app.server import Limits, create_app

    if args.cache is not None and str(args.cache).endswith(".parquet"):
        raise CatalogError("--cache must be a folder: each model and gallery pair gets its own cache file")
    for name, low in (("--max-upload-kb", 1), ("--max-k", 1), ("--top-k", 1)):
        if getattr(args, name.lstrip("-").replace("-", "_")) < low:
            raise CatalogError(f"{name} must be >= {low}")
    if args.top_k > args.max_k:
        raise CatalogError(f"-k {args.top_k} is larger than --max-k {args.max_k}")
    catalog = Catalog.open([parse_model_spec(m) for m in args.model or DEFAULT_MODELS],
                           [parse_gallery_spec(g) for g in args.gallery or DEFAULT_GALLERIES],
                           cache=args.cache, render_like=args.render_like,
                           log=lambda m: print(m, file=sys.stderr))
    limits = Limits(max_upload_bytes=args.max_upload_kb * 1024, max_k=args.max_k, default_k=args.top_k)
    return create_app(catalog, limits)


def run_app(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sbir app: listening on {args.host}: other machines can reach this page", file=sys.stderr)
    print(f"sbir app: open http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/ "
          f"(Ctrl+C stops it); serving from {Path.cwd()}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
