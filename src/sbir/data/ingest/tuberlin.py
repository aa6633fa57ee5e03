"""TU-Berlin SVG / PNG sketches per class folder (+ the extended per-class photos) -> the project's
Parquet format; see :mod:`sbir.data.ingest`."""
from __future__ import annotations

import os
from pathlib import Path

from sbir.data.ingest.common import (
    IngestError,
    IngestOptions,
    IngestReport,
    check_root,
    hash_split,
    load_sketch_raster,
    natural_key,
    new_report,
    relative_name,
)
from sbir.data.ingest.sketch_files import svg_simplify_eps, svg_stroke3
from sbir.data.ingest.writing import (
    ClassMapper,
    Sink,
    adapter,
    finish_report,
    new_writer,
    open_photo_folder,
    scan_class_dirs,
    write_photo_folder,
)

Files = dict[str, list[Path]]


def _scan_sketches(root: Path, opts: IngestOptions, report: IngestReport) -> tuple[Files, Files]:
    """{class: SVG files}, {class: PNG files} of either layout, restricted by ``tuberlin_source``."""
    if (root / "svg").is_dir() or (root / "png").is_dir():
        svg_files = scan_class_dirs(root / "svg", (".svg",), report, root)
        png_files = scan_class_dirs(root / "png", (".png",), report, root)
        report.info["layout"] = "svg/<class>, png/<class>"
    else:
        both = scan_class_dirs(root, (".svg", ".png"), report, root, exclude=("images",))
        svg_files = {c: [f for f in fs if f.suffix.lower() == ".svg"] for c, fs in both.items()}
        png_files = {c: [f for f in fs if f.suffix.lower() == ".png"] for c, fs in both.items()}
        report.info["layout"] = "<class>/*.svg|png"
    if opts.tuberlin_source == "png":
        svg_files = {c: [] for c in svg_files}
    elif opts.tuberlin_source == "svg":
        png_files = {c: [] for c in png_files}
    return svg_files, png_files


class _TuBerlinSketches:
    """Writes the sketches of one class: from the SVG when it parses, else from its PNG twin."""

    def __init__(self, sink: Sink, opts: IngestOptions, report: IngestReport, root: Path) -> None:
        self.sink, self.opts, self.report, self.root = sink, opts, report, root
        self.eps = svg_simplify_eps(opts)
        self.n_svg = self.n_png = 0

    def write(self, src_class: str, target: str, svgs: dict[str, Path], pngs: dict[str, Path]) -> None:
        for stem in sorted(set(svgs) | set(pngs), key=natural_key):
            sid = f"{src_class}/{stem}"
            split = hash_split(sid, self.opts)
            if stem in svgs and self._write_svg(sid, target, split, svgs[stem], stem in pngs):
                continue
            if stem in pngs:
                self._write_png(sid, target, split, pngs[stem])

    def _write_svg(self, sid: str, target: str, split: str, f: Path, has_png: bool) -> bool:
        """True when the SVG gave strokes (whether or not the sink wrote them)."""
        s3, failure = svg_stroke3(f, self.opts, self.report, self.eps)
        if s3 is not None:
            self.n_svg += self.sink.sketch_strokes(sid, target, split, s3, None, relative_name(f, self.root), f)
            return True
        if failure is not None:
            reason, detail = failure
            self.report.add(f, reason, detail + (" (using the PNG instead)" if has_png else ""))
        return False

    def _write_png(self, sid: str, target: str, split: str, f: Path) -> None:
        raster = load_sketch_raster(f, self.report)
        if raster is not None:
            png, h, w = raster
            self.n_png += self.sink.sketch_raster(sid, target, split, png, h, w, None, relative_name(f, self.root), f)


@adapter
def ingest_tuberlin(root: str | os.PathLike, out: str | os.PathLike,
                    options: IngestOptions | None = None) -> IngestReport:
    """TU-Berlin SVG/PNG sketches per class folder (+ optional per-class photos); see the module doc."""
    opts = options or IngestOptions()
    if opts.tuberlin_source not in ("auto", "svg", "png"):
        raise IngestError(f"tuberlin_source must be auto, svg or png, got {opts.tuberlin_source!r}")
    root = check_root(root, "TU-Berlin")
    out = Path(out)
    report = new_report("tuberlin", root, out, opts)
    svg_files, png_files = _scan_sketches(root, opts, report)
    sketch_classes = {c for c, fs in svg_files.items() if fs} | {c for c, fs in png_files.items() if fs}
    if not sketch_classes:
        raise IngestError(f"no TU-Berlin sketches under {root}: expected <class>/<n>.svg or <class>/<n>.png "
                          f"(or svg/<class>/, png/<class>/)")
    # the TU-Berlin Extended photos: --photos, else images/ beside the sketches
    photo_root, photo_files = open_photo_folder(opts.photos, "TU-Berlin", report, default=root / "images")
    if photo_root is not None:
        report.info["photo_folder"] = str(photo_root)

    mapper = ClassMapper(opts.class_map, report)
    classes = mapper.class_names(sketch_classes | set(photo_files))
    extra = {"split_source": "hash", "simplify_eps": svg_simplify_eps(opts), "flatten_step": opts.flatten_step}
    with new_writer(out, classes, report.name, opts, "tuberlin", extra) as writer:
        sink = Sink(writer, opts, report, svg_simplify_eps(opts))
        sketches = _TuBerlinSketches(sink, opts, report, root)
        for src_class in sorted(sketch_classes):
            svgs = {f.stem: f for f in svg_files.get(src_class, [])}
            pngs = {f.stem: f for f in png_files.get(src_class, [])}
            target = mapper(src_class)
            if target is None:
                mapper.drop(src_class, len(set(svgs) | set(pngs)))
                continue
            sketches.write(src_class, target, svgs, pngs)
        report.info["sketches_from_svg"] = sketches.n_svg
        report.info["sketches_from_png"] = sketches.n_png
        if photo_files:
            report.info["photos_written"] = write_photo_folder(sink, photo_files, mapper, opts, report, photo_root)
        sink.flush()
    return finish_report(out, report)
