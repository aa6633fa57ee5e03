"""Sketchy (published ``rendered_256x256`` layout with ``info/``, or flat ``photo/`` + ``sketch/``) and
Sketchy-Extended photos -> the project's Parquet format; see :mod:`sbir.data.ingest`."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sbir.data.ingest.common import (
    CORRUPT_IMAGE,
    DUPLICATE_ID,
    PHOTO_EXTS,
    RASTER_SKETCH_EXTS,
    SKETCH_WITHOUT_PHOTO,
    IngestError,
    IngestOptions,
    IngestReport,
    check_root,
    hash_split,
    load_photo,
    load_sketch_raster,
    new_report,
    probe_photo,
    progress_bar,
    read_bytes,
    relative_name,
)
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

_SKETCH_NAME = re.compile(r"^(?P<stem>.+)-(?P<k>\d+)$")


@dataclass
class _SketchyLayout:
    kind: str          # "published" or "flat"
    photo_dir: Path
    sketch_dir: Path
    info_dir: Path | None


def _find_info_dir(root: Path, base: Path, opts: IngestOptions) -> Path | None:
    if opts.info_dir is not None:
        info = Path(opts.info_dir)
        if not info.is_dir():
            raise IngestError(f"Sketchy info folder {info} does not exist")
        return info
    for cand in (root / "info", base / "info", base.parent / "info", base.parent.parent / "info"):
        if cand.is_dir():
            return cand
    return None


def _find_sketchy_layout(root: Path, opts: IngestOptions) -> _SketchyLayout:
    variant = opts.sketchy_variant
    candidates = [root / "rendered_256x256" / "256x256", root / "256x256", root]
    for base in candidates:
        pdir, sdir = base / "photo", base / "sketch"
        if pdir.is_dir() and sdir.is_dir():
            tx = sorted(p.name for p in pdir.iterdir() if p.is_dir() and p.name.startswith("tx_"))
            if tx:
                if not (pdir / variant).is_dir() or not (sdir / variant).is_dir():
                    raise IngestError(f"Sketchy layout under {base}: no photo/{variant}/ and sketch/{variant}/ "
                                      f"(available variants: {', '.join(tx)}); choose one with --sketchy-variant")
                kind, photo_dir, sketch_dir = "published", pdir / variant, sdir / variant
            else:
                kind, photo_dir, sketch_dir = "flat", pdir, sdir
            return _SketchyLayout(kind, photo_dir, sketch_dir, _find_info_dir(root, base, opts))
    raise IngestError(
        f"no Sketchy layout under {root}: expected rendered_256x256/256x256/{{photo,sketch}}/{variant}/<class>/ "
        f"(published, with info/testset.txt) or photo/<class>/*.jpg + sketch/<class>/*.png (flat)")


def _read_list(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


@dataclass
class _SketchyInfo:
    """The official test list and invalid lists of ``info/`` (when there is one)."""

    testset: set[tuple[str, str]] | None = None        # (class or "", photo stem) of the test photos
    invalid: dict[str, str] = field(default_factory=dict)  # sketch stem -> the invalid-*.txt list naming it
    test_classless: set[str] = field(default_factory=set)  # every test stem, when some lines have no class

    def photo_split(self, src_class: str, stem: str, opts: IngestOptions) -> str:
        if self.testset is None:
            return hash_split(f"{src_class}/{stem}", opts)
        return "test" if (src_class, stem) in self.testset or stem in self.test_classless else "train"


def _read_info(info_dir: Path | None, report: IngestReport) -> _SketchyInfo:
    info = _SketchyInfo()
    if info_dir is None:
        return info
    ts = info_dir / "testset.txt"
    if ts.is_file():
        info.testset = set()
        for ln in _read_list(ts):
            p = Path(ln)
            info.testset.add((p.parent.as_posix() if p.parent.as_posix() != "." else "", p.stem))
        report.info["testset"] = f"{ts.name} ({len(info.testset)} photos)"
        if any(c == "" for c, _ in info.testset):
            info.test_classless = {stem for _, stem in info.testset}
    for lst in sorted(info_dir.glob("invalid-*.txt")):
        for ln in _read_list(lst):
            info.invalid.setdefault(Path(ln).stem if Path(ln).suffix.lower() in RASTER_SKETCH_EXTS else Path(ln).name,
                                    lst.stem)
    report.info["invalid_lists"] = sorted(p.name for p in info_dir.glob("invalid-*.txt"))
    return info


@dataclass
class _DecodedSketch:
    photo_stem: str          # the photo stem its name points to
    paired_stem: str | None  # that stem when the photo is usable, else None
    png: bytes
    h: int
    w: int
    file: Path


class _SketchyClasses:
    """Writes one Sketchy class after another into a sink: photos first, then their sketches."""

    def __init__(self, sink: Sink, opts: IngestOptions, report: IngestReport, root: Path, info: _SketchyInfo):
        self.sink, self.opts, self.report, self.root, self.info = sink, opts, report, root, info
        self.on_invalid_list = 0  # sketches named in an invalid list and kept

    def write(self, src_class: str, target: str, photos: list[Path], sketches: list[Path]) -> None:
        good_photos = self._usable_photos(src_class, photos)          # 1) validate photos
        decoded = self._decode_sketches(src_class, sketches, good_photos)  # 2) decode sketches
        paired = {d.paired_stem for d in decoded if d.paired_stem is not None}
        splits = {stem: self.info.photo_split(src_class, stem, self.opts) for stem in good_photos}
        written = self._write_photos(src_class, target, good_photos, splits, paired)  # 3) photos
        for d in decoded:                                              # 4) sketches
            self._write_sketch(src_class, target, d, splits, written)

    def _usable_photos(self, src_class: str, photos: list[Path]) -> dict[str, Path]:
        """Photos that decode, by stem (bytes are re-read when written)."""
        good: dict[str, Path] = {}
        for f in photos:
            data = read_bytes(f, self.report)
            if data is None:
                continue
            try:
                probe_photo(data)
            except Exception as exc:
                self.report.add(f, CORRUPT_IMAGE, str(exc))
                continue
            if f.stem in good:
                self.report.add(f, DUPLICATE_ID, f"another photo with stem {f.stem!r} in {src_class}/")
                continue
            good[f.stem] = f
        return good

    def _decode_sketches(self, src_class: str, sketches: list[Path],
                         good_photos: dict[str, Path]) -> list[_DecodedSketch]:
        decoded = []
        for f in sketches:
            m = _SKETCH_NAME.match(f.stem)
            photo_stem = m.group("stem") if m else f.stem
            if f.stem in self.info.invalid:
                if self.opts.drop_invalid:
                    self.report.drop(f"invalid_list:{self.info.invalid[f.stem]}")
                    continue
                self.on_invalid_list += 1
            raster = load_sketch_raster(f, self.report)
            if raster is None:
                continue
            paired_stem = photo_stem
            if not m:
                self.report.add(f, SKETCH_WITHOUT_PHOTO, "file name is not <photo stem>-<k>")
                paired_stem = None
            elif photo_stem not in good_photos:
                self.report.add(f, SKETCH_WITHOUT_PHOTO, f"no usable photo {src_class}/{photo_stem}.*")
                paired_stem = None
            decoded.append(_DecodedSketch(photo_stem, paired_stem, *raster, f))
        return decoded

    def _write_photos(self, src_class: str, target: str, good_photos: dict[str, Path], splits: dict[str, str],
                      paired: set[str]) -> set[str]:
        """Write the usable photos (labelled: train photos with a sketch); returns the stems written."""
        lab = self.sink.pick_labelled(f"{src_class}/{stem}" for stem in good_photos
                                      if splits[stem] == "train" and stem in paired)
        written: set[str] = set()
        for stem, f in good_photos.items():
            pid = f"{src_class}/{stem}"
            loaded = load_photo(f, self.report)
            if loaded is None:
                continue
            img, h, w = loaded
            if self.sink.photo(pid, target, splits[stem], pid in lab, img, h, w, relative_name(f, self.root), f):
                written.add(stem)
        return written

    def _write_sketch(self, src_class: str, target: str, d: _DecodedSketch, splits: dict[str, str],
                      written: set[str]) -> None:
        pstem = d.paired_stem
        if pstem is not None and pstem not in written:
            self.report.add(d.file, SKETCH_WITHOUT_PHOTO, f"photo {src_class}/{pstem} could not be written")
            pstem = None
        if pstem is not None:
            split, photo_id = splits[pstem], f"{src_class}/{pstem}"
        else:
            split, photo_id = self.info.photo_split(src_class, d.photo_stem, self.opts), None
        self.sink.sketch_raster(f"{src_class}/{d.file.stem}", target, split, d.png, d.h, d.w, photo_id,
                                relative_name(d.file, self.root), d.file)


def _write_extended_photos(sink: Sink, ext_root: Path, ext_files: dict[str, list[Path]],
                           photo_files: dict[str, list[Path]], mapper: ClassMapper, opts: IngestOptions,
                           report: IngestReport) -> None:
    """Sketchy-Extended photos, unpaired and never labelled; those already in Sketchy are dropped."""
    known = {(c, f.stem) for c, fs in photo_files.items() for f in fs}

    def dup(c: str, stem: str) -> bool:
        if (c, stem) in known:
            report.drop("extended_photo_already_in_sketchy")
            return True
        return False

    report.info["extended_photos_written"] = write_photo_folder(
        sink, ext_files, mapper, opts, report, ext_root, prefix="ext/", skip=dup, can_be_labelled=False)


@adapter
def ingest_sketchy(root: str | os.PathLike, out: str | os.PathLike,
                   options: IngestOptions | None = None) -> IngestReport:
    """Sketchy (published or flat layout) + optional Sketchy-Extended photos; see the module doc."""
    opts = options or IngestOptions()
    root = check_root(root, "Sketchy")
    out = Path(out)
    layout = _find_sketchy_layout(root, opts)
    report = new_report("sketchy", root, out, opts)
    report.info["layout"] = layout.kind

    photo_files = scan_class_dirs(layout.photo_dir, PHOTO_EXTS, report, root)
    sketch_files = scan_class_dirs(layout.sketch_dir, RASTER_SKETCH_EXTS, report, root)
    ext_root, ext_files = open_photo_folder(opts.extended_photos, "Sketchy-Extended", report)
    if not photo_files and not sketch_files:
        raise IngestError(f"Sketchy: no class folders in {layout.photo_dir} or {layout.sketch_dir}")
    info = _read_info(layout.info_dir, report)

    mapper = ClassMapper(opts.class_map, report)
    classes = mapper.class_names(set(photo_files) | set(sketch_files) | set(ext_files))
    extra = {"layout": layout.kind, "split_source": "testset.txt" if info.testset is not None else "hash",
             "sketchy_variant": opts.sketchy_variant if layout.kind == "published" else None}
    with new_writer(out, classes, report.name, opts, "sketchy", extra) as writer:
        sink = Sink(writer, opts, report, opts.simplify_eps or 0.0)
        per_class = _SketchyClasses(sink, opts, report, root, info)
        for src_class in progress_bar(sorted(set(photo_files) | set(sketch_files)), desc="sketchy classes",
                                      unit="class", disable=not opts.progress):
            target = mapper(src_class)
            photos, sketches = photo_files.get(src_class, []), sketch_files.get(src_class, [])
            if target is None:
                mapper.drop(src_class, len(photos) + len(sketches))
                continue
            per_class.write(src_class, target, photos, sketches)
        if info.invalid and not opts.drop_invalid:
            report.info["sketches_on_invalid_lists_kept"] = per_class.on_invalid_list
        if ext_files:
            _write_extended_photos(sink, ext_root, ext_files, photo_files, mapper, opts, report)
        sink.flush()
    return finish_report(out, report)
