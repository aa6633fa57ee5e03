"""The ``sbir`` command (also ``python -m sbir``). Subcommands live in ``SUBCOMMANDS`` (one
``add_<name>(subparsers)`` each): ``run`` (one pipeline stage, what dvc.yaml calls), ``stages`` (the
registry), ``search``, ``ingest``, ``compose`` (a cross-dataset dataset from two ingested ones), ``app``
(the draw-and-search page)."""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import threading
from typing import Callable, Sequence

from sbir.app.cli import add_app
from sbir.data.compose import add_compose
from sbir.data.ingest.cli import add_ingest

SEARCH_HELP = """\
Search a gallery of photos with hand-drawn sketches, using the pipeline's trained encoders, and print
the top-k photos by cosine similarity (rank, score, class when known, photo id or path).

QUERY files, by extension:
  .png .jpg .jpeg      a raster sketch (black on white; transparency is composited onto white)
  .svg                 a vector sketch (paths/polylines/lines; Beziers flattened, TU-Berlin style)
  .ndjson .jsonl .json one Quick Draw record ({"drawing": [[[x...],[y...]], ...], ...}): a file of one
                       line, or any line of a bigger file with --ndjson-line N
  .npy                 a stroke-3 array of shape (N, 3): rows (dx, dy, pen_lifted)
Vector sketches are rasterised with the project's rasteriser at the gallery dataset's sketch size,
line width and padding (read from its manifest), as the training sketches were.

GALLERY: a prepared dataset folder (with manifest.json; its --split photos) or any folder of
.jpg/.png photos (searched recursively; a photo's class is its first sub-folder).

Gallery embeddings are computed once per (checkpoint content, model, image size, gallery) and cached
as Parquet in --cache (default $SBIR_SEARCH_CACHE or ~/.cache/sbir/search). A --cache FILE.parquet
made by another checkpoint is an error (use --rebuild-cache to overwrite it).

examples:
  sbir search sketch.svg                                  # distilled students on data/prepared's test photos
  sbir search a.png b.npy -k 5 --grid top5.png
  sbir search cat.ndjson --ndjson-line 12 --gallery ~/photos
  sbir search s.svg --checkpoint outputs/fgsbir_joint/checkpoints --model supervised
  python -m sbir.search sketch.svg --json
"""


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="sketch -> photo retrieval with trained encoders",
                       description=SEARCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", nargs="+", metavar="QUERY", help="sketch file(s): .png/.jpg, .svg, .ndjson, .npy")
    p.add_argument("--gallery", default="data/prepared",
                   help="prepared dataset folder or folder of photos (default: %(default)s)")
    p.add_argument("--split", action="append", default=None,
                   help="dataset split(s) to search, repeatable (default: test)")
    p.add_argument("--checkpoint", default="outputs/distill/students.pt",
                   help="students.pt, teachers.pt (model classifier_only), an F checkpoint, or a folder of them "
                        "(default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="model inside --checkpoint when it holds several (e.g. semi, supervised, full); "
                        "default: the only one, or 'semi' for the fgsbir_joint folder")
    p.add_argument("-k", "--top-k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--grid", default=None, metavar="PNG", help="also save a PNG grid: query + top-k with scores")
    p.add_argument("--cache", default=None, metavar="DIR|FILE.parquet",
                   help="embedding cache folder, or one cache file (must match the checkpoint and gallery)")
    p.add_argument("--rebuild-cache", action="store_true", help="recompute the gallery embeddings")
    p.add_argument("--ndjson-line", type=int, default=None, metavar="N",
                   help="1-based line of the .ndjson query file(s) to use")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size; needed only for a students.pt without its pipeline's teachers.pt")
    p.add_argument("--render-size", type=int, default=None,
                   help="canvas side for vector queries (default: the dataset's sketch size, else the model size)")
    p.add_argument("--line-width", type=float, default=None, help="rasteriser line width in pixels for vector queries")
    p.add_argument("--padding", type=float, default=None, help="rasteriser padding (share of the side) for vector queries")
    p.add_argument("--render-like", default=None, metavar="DATASET",
                   help="take the vector rendering from this prepared dataset (default: the gallery when it is one)")
    p.add_argument("--batch-size", type=int, default=256, help="photos embedded per batch (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    from sbir import search as S

    log = (lambda m: None) if args.json and args.no_progress else (lambda m: print(m, file=sys.stderr))
    if args.top_k < 1:
        raise S.SearchError(f"-k must be >= 1, got {args.top_k}")
    encoder = S.load_encoder(args.checkpoint, args.model, args.image_size)
    gallery = S.open_gallery(args.gallery, args.split or ["test"])
    like = args.render_like or (args.gallery if gallery.kind == "dataset" else None)
    render = S.render_spec_for(like, encoder.image_size)
    for name in ("render_size", "line_width", "padding"):
        value = getattr(args, name)
        if value is not None:
            setattr(render, "size" if name == "render_size" else name, value)
    queries = [S.load_query(q, render, args.ndjson_line) for q in args.queries]
    cache = S.embed_gallery(encoder, gallery, args.cache, batch_size=args.batch_size, rebuild=args.rebuild_cache,
                            progress=not args.no_progress, log=log)
    results = S.search(encoder, queries, cache, args.top_k)
    if args.json:
        print(json.dumps({"checkpoint": str(encoder.checkpoint), "model": encoder.name, "gallery": str(gallery.path),
                          "gallery_size": len(cache), "cache": str(cache.path),
                          "results": [{"query": q.name, "kind": q.kind,
                                       "hits": [vars(h) for h in hits]} for q, hits in zip(queries, results)]},
                         indent=2))
    else:
        print(f"model {encoder.name} ({encoder.kind}) from {encoder.checkpoint}; gallery {gallery.path} "
              f"({len(cache)} photos)")
        for q, hits in zip(queries, results):
            print(f"\nquery {q.name} ({q.kind})")
            print(f"{'rank':>4}  {'score':>7}  {'class':<16}  id")
            for h in hits:
                print(f"{h.rank:>4}  {h.score:>7.4f}  {str(h.class_name or '-'):<16}  {h.id}")
    if args.grid:
        out = S.save_grid(queries, results, gallery, args.grid,
                          title=f"{encoder.name}: top-{args.top_k} of {len(cache)} photos")
        log(f"grid written to {out}")
    return 0


RUN_HELP = """\
Run one pipeline stage (this is what dvc.yaml calls; `dvc repro` runs them in order).
Each stage reads params.yaml, logs an MLflow run, trains on Ray where it trains, and writes
outputs/<stage>/ atomically. `sbir run <stage> --help` says what a stage does and which params it reads.
"""


def add_run(sub: argparse._SubParsersAction) -> None:
    from sbir.registry import STAGES
    from sbir.stage import stage_parser

    p = sub.add_parser("run", help="run one pipeline stage (what dvc.yaml calls)", description=RUN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for spec in STAGES.values():
        sp = stages.add_parser(spec.name, help=spec.summary.split(". ")[0].rstrip(".") + ".")
        stage_parser(spec, sp)
        sp.set_defaults(func=run_stage_command)


def run_stage_command(args: argparse.Namespace) -> int:
    from sbir.stage import stage_main

    return stage_main(args.stage, args)


def add_stages(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="list the pipeline's stages (the registry)")
    p.add_argument("--markdown", action="store_true", help="print the table of stages/README.md")
    p.set_defaults(func=list_stages)


def list_stages(args: argparse.Namespace) -> int:
    from sbir.registry import STAGES, stages_markdown

    if args.markdown:
        print(stages_markdown(), end="")
        return 0
    for spec in STAGES.values():
        print(f"{spec.name:<18} params: {', '.join(spec.params) or '-':<60} {'(Ray Train)' if spec.trains else ''}")
    return 0


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "run": add_run, "stages": add_stages, "search": add_search, "ingest": add_ingest,
    "compose": add_compose, "app": add_app}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbir", description="sbir command-line tools (see `sbir <command> --help`)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sbir.data.format import DatasetFormatError
    from sbir.search import SearchError

    try:
        return int(args.func(args) or 0)
    except (SearchError, DatasetFormatError, FileNotFoundError) as exc:
        print(f"sbir {args.command}: error: {exc}", file=sys.stderr)
        return 2


def quick_exit(code: int) -> None:
    """End the process without the interpreter's teardown: a stage process that imported torch and MLflow
    spends 1.5-1.7 s freeing modules and objects nobody will use again (10 stages: about 16 s of a
    `dvc repro`). What a normal exit must still do is done first: the atexit handlers (MLflow's, Ray's),
    logging's flush and the standard streams' flush. It exits normally with another non-daemon thread
    alive (whose end a normal exit waits for) and under a profiler or tracer (``python -m cProfile``,
    coverage), which write their results after the program returns."""
    others_running = any(t.is_alive() and not t.daemon for t in threading.enumerate()
                         if t is not threading.main_thread())
    if others_running or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # (private but stable since Python 3.0; there is no public way to run them early)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)


def entry() -> None:
    """The ``sbir`` / ``python -m sbir`` process: :func:`main`, then :func:`quick_exit` with its status."""
    quick_exit(main())


if __name__ == "__main__":
    entry()
