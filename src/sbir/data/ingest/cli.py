"""``sbir ingest``: ingest a published sketch/photo dataset into the project's Parquet format.

    sbir ingest --format sketchy --root PATH --out PATH [options] [--strict] [--report PATH]

A thin command line over :mod:`sbir.data.ingest`; see that package for the layouts in detail.
Exit status: 0 done (issues, if any, are in the report), 1 --strict and an issue was found,
2 the input cannot be ingested (missing root, unrecognised layout, bad option).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sbir.data.ingest import (
    FORMATS,
    IngestError,
    IngestOptions,
    StrictIngestError,
    default_report_path,
    ingest,
    load_class_map,
)

FORMAT_HELP = """\
formats (--format) and the layouts they read under --root:
  sketchy    Sketchy: rendered_256x256/256x256/{photo,sketch}/tx_000000000000/<class>/ (photos
             n<synset>_<id>.jpg, sketches <photo stem>-<k>.png) with info/testset.txt (test split) and
             info/invalid-*.txt (see --drop-invalid); or a flat photo/<class>/ + sketch/<class>/ folder
             (auto-detected; without testset.txt photos are split by hash, --test-share). Sketch
             <stem>-<k> is paired with photo <stem>. --extended-photos adds Sketchy-Extended photos.
  tuberlin   TU-Berlin: <class>/<n>.svg and/or <class>/<n>.png (or svg/<class>/, png/<class>/). SVG paths
             become strokes (group transforms applied, Beziers flattened, one stroke per path); PNG-only
             sketches keep their raster. --photos (default: <root>/images/ if present) adds the
             extended photo set (<class>/*.jpg).
  quickdraw  Quick, Draw!: <word>.ndjson files (simplified [[x..],[y..]] or raw [[x..],[y..],[t..]] strokes,
             optionally .gz), streamed line by line, and sketch-rnn <word>.npz (train/valid/test stroke-3).
             --root may be one file. --photos adds a per-class photo folder (Quick Draw-Extended).
  qmul       QMUL-Shoe/Chair: V2 pickled coordinate dict ('/train/<photo>_<k>' -> (N,3) absolute x,y,pen)
             + photo/<photo>.png; or trainA/ trainB/ testA/ testB/ (A sketches, B photos, paired by file
             name); or QMUL-V1 <x>_sketch_db_{train,test}.mat + <x>_edge_db_{train,test}.mat (row i pairs
             with row i; the edge map stands in for the photo); or <photo>/{photo_gt.png,sketch_gt.svg}
             pair folders. One class ("shoe", from the file names, or --class-name).

Strokes are stored as stroke-3 in the source's units; sketch images are rendered with the project's
rasteriser. Bad input (corrupt images, unparsable SVG or malformed path data, invalid ndjson lines,
empty or degenerate drawings, sketches without photo, ...) is counted in the report, never dropped
silently; --strict fails on the first one.
"""


# =========================================================================== parser
def add_ingest(sub: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` subcommand (options, help, epilog) to ``sbir``'s subparsers."""
    p = sub.add_parser(
        "ingest",
        help="turn a published sketch/photo dataset into the project's Parquet format",
        description="Turn a published sketch/photo dataset into the project's Parquet format "
                    "(photos.parquet, sketches.parquet, manifest.json).",
        epilog=FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = IngestOptions()
    _add_required(p.add_argument_group("required"))
    general = p.add_argument_group("general")
    _add_general(general, d)
    _add_rendering(general, d)
    _add_vectorise(p.add_argument_group("raster sketches -> strokes (sbir.data.vectorise)"))
    _add_sketchy(p.add_argument_group("sketchy"), d)
    _add_tuberlin_quickdraw(p.add_argument_group("tuberlin / quickdraw"), d)
    _add_qmul(p.add_argument_group("qmul"), d)
    p.set_defaults(func=run_ingest)


def _add_required(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--format", required=True, choices=sorted(FORMATS), help="source dataset layout (see below)")
    g.add_argument("--root", required=True, type=Path, help="folder (or, for quickdraw/qmul, file) to read")
    g.add_argument("--out", required=True, type=Path,
                   help="output dataset folder (written atomically; replaced if it exists)")


def _add_general(g: argparse._ArgumentGroup, d: IngestOptions) -> None:
    """Naming, reporting, class map, splits and the labelled share."""
    g.add_argument("--name", default=None, help="dataset name in the manifest and report (default: --out folder name)")
    g.add_argument("--report", type=Path, default=None,
                   help="where to write the JSON ingest report (default: <out>/../<name>_ingest_report.json)")
    g.add_argument("--strict", action="store_true",
                   help="fail (exit 1, nothing written) at the first bad input, naming the file and reason")
    g.add_argument("--class-map", type=Path, default=None,
                   help="YAML or JSON {source_name: target_name}; unmapped classes (or null targets) are dropped "
                        "and counted; the class list becomes the sorted map targets")
    g.add_argument("--test-share", type=float, default=d.test_share,
                   help="share of ids put in the test split when the source has no split of its own "
                        "(deterministic hash of the id; default %(default)s)")
    g.add_argument("--labelled-share", type=float, default=d.labelled_share,
                   help="share of train photos flagged labelled: exactly round(share x n) of the n eligible train "
                        "photos of each class, chosen by a salted hash (in paired datasets only photos with a "
                        "sketch are eligible); counts in the report under info.labelled (default %(default)s)")
    g.add_argument("--split-seed", default=d.split_seed, help="salt of the split/labelled hashes (default %(default)s)")
    g.add_argument("--labelled-seed", default=None,
                   help="salt of the labelled choice only (default: --split-seed); changes which train pairs are "
                        "labelled without changing the split")


def _add_rendering(g: argparse._ArgumentGroup, d: IngestOptions) -> None:
    """Image sizes, rasteriser, stroke simplification, Parquet row groups, progress."""
    g.add_argument("--photo-size", type=int, default=None,
                   help="resize photos to N x N pixels (PNG) at ingest, for small CPU pipelines (default: keep the "
                        "original bytes)")
    g.add_argument("--image-size", type=int, default=d.image_size,
                   help="side in pixels of every sketch image: rendered from strokes, or a raster sketch resized "
                        "(default %(default)s)")
    g.add_argument("--line-width", type=float, default=d.line_width,
                   help="rasteriser line width in output pixels (default %(default)s)")
    g.add_argument("--padding", type=float, default=d.padding,
                   help="rasteriser margin as a share of the side (default %(default)s)")
    g.add_argument("--simplify-eps", type=float, default=None,
                   help="RDP simplification of strokes, in source units (default: 0.5 for SVG sources, "
                        "off for Quick Draw / QMUL coordinates which are already simplified)")
    g.add_argument("--flatten-step", type=float, default=d.flatten_step,
                   help="SVG curves: one sample per this many source units of control polygon (default %(default)s)")
    g.add_argument("--row-group-size", type=int, default=d.row_group_size,
                   help="Parquet rows per row group (bounds memory while streaming; default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_vectorise(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--vectorise", action="store_true",
                   help="trace raster sketches (PNG, QMUL-V1 .mat) into stroke-3 (skeleton + tracing + RDP, in "
                        "source pixels) and re-render them with the project's rasteriser; statistics (strokes per "
                        "sketch, IoU/coverage vs the raster, sketches with no strokes) go to the report and manifest")
    g.add_argument("--vectorise-ink-threshold", type=float, default=None,
                   help="ink share (1 - grey/255) above which a pixel is ink (default 0.25)")
    g.add_argument("--vectorise-rdp-eps", type=float, default=None,
                   help="RDP tolerance of the traced strokes in source pixels (default 1.0)")
    g.add_argument("--vectorise-order", choices=("length", "position"), default=None,
                   help="stroke order: longest first (default) or top-left first")
    g.add_argument("--vectorise-min-component", type=int, default=None,
                   help="ink components smaller than this many pixels are specks, dropped and counted (default 4)")


def _add_sketchy(g: argparse._ArgumentGroup, d: IngestOptions) -> None:
    g.add_argument("--drop-invalid", action="store_true",
                   help="drop sketches listed in info/invalid-*.txt (counted per list in the report)")
    g.add_argument("--extended-photos", type=Path, default=None,
                   help="Sketchy-Extended photo folder (<class>/*.jpg): extra unpaired photos")
    g.add_argument("--sketchy-variant", default=d.sketchy_variant,
                   help="augmentation folder of the published layout (default %(default)s)")
    g.add_argument("--info-dir", type=Path, default=None,
                   help="Sketchy info/ folder (default: info/ found next to the data)")


def _add_tuberlin_quickdraw(g: argparse._ArgumentGroup, d: IngestOptions) -> None:
    g.add_argument("--photos", type=Path, default=None,
                   help="per-class photo folder (<class>/*.jpg): TU-Berlin Extended or Quick Draw-Extended photos")
    g.add_argument("--tuberlin-source", choices=("auto", "svg", "png"), default=d.tuberlin_source,
                   help="TU-Berlin: read SVG strokes when present (auto), only SVG, or only PNG rasters")
    g.add_argument("--canvas-tolerance", type=float, default=d.canvas_tolerance,
                   help="SVG strokes may exceed the canvas by this share before being reported (default %(default)s)")
    g.add_argument("--recognized-only", action="store_true",
                   help="Quick Draw: drop drawings with recognized == false (counted)")
    g.add_argument("--max-per-class", type=int, default=None,
                   help="Quick Draw: keep the first N valid drawings per class (per split for .npz)")
    g.add_argument("--npz-valid-split", choices=("test", "val", "train", "drop"), default=d.npz_valid_split,
                   help="sketch-rnn .npz: split that the 'valid' array goes to (default %(default)s)")


def _add_qmul(g: argparse._ArgumentGroup, d: IngestOptions) -> None:
    g.add_argument("--class-name", default=None,
                   help="QMUL class name (default: guessed from file names - shoe/chair/handbag - else 'shoe')")
    g.add_argument("--qmul-layout", choices=("auto", "coordinates", "ab", "v1", "pairs"), default=d.qmul_layout,
                   help="force one QMUL layout when several are present (default: first found in this order)")
    g.add_argument("--qmul-sketch-side", choices=("A", "B"), default=d.qmul_sketch_side,
                   help="trainA/trainB layout: the letter whose folders hold sketches (default %(default)s)")
    g.add_argument("--qmul-v1-photos", choices=("auto", "image", "edge"), default=d.qmul_v1_photos,
                   help="QMUL-V1: photo table from <x>_image_db (real photos) or <x>_edge_db (edge maps); "
                        "auto uses image_db when present")


# =========================================================================== run
def options_from_args(args: argparse.Namespace) -> IngestOptions:
    class_map = load_class_map(args.class_map) if args.class_map is not None else None
    return IngestOptions(
        name=args.name, image_size=args.image_size, line_width=args.line_width, padding=args.padding,
        test_share=args.test_share, labelled_share=args.labelled_share, split_seed=args.split_seed,
        strict=args.strict, class_map=class_map, progress=not args.no_progress,
        row_group_size=args.row_group_size, flatten_step=args.flatten_step, simplify_eps=args.simplify_eps,
        drop_invalid=args.drop_invalid,
        extended_photos=str(args.extended_photos) if args.extended_photos else None,
        sketchy_variant=args.sketchy_variant, info_dir=str(args.info_dir) if args.info_dir else None,
        photos=str(args.photos) if args.photos else None, tuberlin_source=args.tuberlin_source,
        canvas_tolerance=args.canvas_tolerance, recognized_only=args.recognized_only,
        max_per_class=args.max_per_class, npz_valid_split=args.npz_valid_split,
        class_name=args.class_name, qmul_layout=args.qmul_layout, qmul_sketch_side=args.qmul_sketch_side,
        qmul_v1_photos=args.qmul_v1_photos, labelled_seed=args.labelled_seed, photo_size=args.photo_size,
        vectorise=args.vectorise, vectorise_params=_vectorise_params(args),
    )


def _vectorise_params(args: argparse.Namespace) -> dict | None:
    given = {k: v for k, v in (("ink_threshold", args.vectorise_ink_threshold), ("rdp_epsilon", args.vectorise_rdp_eps),
                               ("order", args.vectorise_order), ("min_component_px", args.vectorise_min_component))
             if v is not None}
    if given and not args.vectorise:
        raise IngestError(f"--vectorise-* options given without --vectorise: {sorted(given)}")
    return given or None


def _bad_option(args: argparse.Namespace) -> str | None:
    """The first out-of-range option, as an error message, or None."""
    if args.photo_size is not None and args.photo_size < 8:
        return f"--photo-size must be >= 8, got {args.photo_size}"
    for name in ("test_share", "labelled_share"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            return f"--{name.replace('_', '-')} must be in [0, 1], got {v}"
    return None


def run_ingest(args: argparse.Namespace) -> int:
    """Run ``sbir ingest``: 0 done, 1 ``--strict`` found an issue, 2 the input cannot be ingested."""
    bad = _bad_option(args)
    if bad is not None:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        opts = options_from_args(args)
        report_path = args.report or default_report_path(args.out, opts.name)
        report = ingest(args.format, args.root, args.out, opts, report_path=report_path)
    except StrictIngestError as exc:
        print(exc.report.summary(), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        print(f"report: {report_path}", file=sys.stderr)
        return 1
    except IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"report: {report_path}")
    return 0
