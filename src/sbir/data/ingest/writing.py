"""Writing an ingested dataset: the class map, the :class:`Sink` around :class:`DatasetWriter` (labels,
duplicate ids, batched rendering, vectorising rasters), per-class photo folders, the adapter wrapper."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from sbir.data.format import MANIFEST_FILE, DatasetWriter, PhotoRow, SketchRow, encode_png
from sbir.data.ingest.common import (
    DUPLICATE_ID,
    PHOTO_EXTS,
    UNEXPECTED_FILE,
    VECTORISE_EMPTY,
    IngestError,
    IngestOptions,
    IngestReport,
    hash_split,
    is_hidden,
    load_photo,
    natural_key,
    pick_labelled,
    relative_name,
    square_png,
)


# =========================================================================== class mapping
class ClassMapper:
    """Applies the optional class map; remembers unmapped source classes."""

    def __init__(self, class_map: dict[str, str | None] | None, report: IngestReport) -> None:
        self.map = class_map
        self.report = report
        self.unmapped: set[str] = set()

    def __call__(self, source: str) -> str | None:
        if self.map is None:
            return source
        if source in self.map and self.map[source] is not None:
            return self.map[source]
        self.unmapped.add(source)
        self.report.info["unmapped_classes"] = sorted(self.unmapped)
        return None

    def class_names(self, sources: Iterable[str]) -> list[str]:
        """Without a map: the sorted source classes. With a map: the sorted set of all map targets,
        so that datasets ingested with the same map share one label space."""
        if self.map is None:
            return sorted(set(sources))
        for s in sorted(set(sources)):
            self(s)
        return sorted({v for v in self.map.values() if v is not None})

    def drop(self, source: str, n: int) -> None:
        self.report.drop("unmapped_class", n)


# =========================================================================== writing
@dataclass
class _PendingSketch:
    id: str
    class_name: str
    split: str
    strokes: np.ndarray
    photo_id: str | None
    source: str


class Sink:
    """Wraps a DatasetWriter: labels, duplicate-id checks, batched rendering of stroke sketches."""

    def __init__(self, writer: DatasetWriter, opts: IngestOptions, report: IngestReport,
                 simplify_eps: float) -> None:
        self.w = writer
        self.opts = opts
        self.report = report
        self.labels = {c: i for i, c in enumerate(writer.class_names)}
        self.pending: list[_PendingSketch] = []
        self.simplify_eps = simplify_eps
        self.photo_ids: set[str] = set()
        self.sketch_ids: set[str] = set()
        # labelled share bookkeeping (what the manifest and report say about it)
        self.eligible = 0
        self.labelled_ids: set[str] = set()
        self.train_pairs = {True: 0, False: 0}
        self.vstats = None
        if opts.vectorise:
            from sbir.data.vectorise import VectoriseParams, VectoriseStats

            try:
                vp = VectoriseParams(**(opts.vectorise_params or {}))
            except (TypeError, ValueError) as exc:
                raise IngestError(f"vectorise_params: {exc}") from exc
            self.vparams = vp
            self.vstats = VectoriseStats(vp)
        # The summaries are final only when the writer closes (after the last row), so they are put
        # into the manifest's ``ingest`` block from a wrapper of DatasetWriter.close.
        close = writer.close

        def close_with_summaries() -> dict[str, Any]:
            summ = self.summaries()
            writer.extra.setdefault("ingest", {}).update(summ)
            report.info.update(summ)
            return close()

        writer.close = close_with_summaries  # type: ignore[method-assign]

    def pick_labelled(self, keys: Iterable[str]) -> set[str]:
        """The labelled subset of these eligible train photo ids (see :func:`pick_labelled`)."""
        keys = list(keys)
        self.eligible += len(set(keys))
        return pick_labelled(keys, self.opts)

    def summaries(self) -> dict[str, Any]:
        out: dict[str, Any] = {"labelled": {
            "share": self.opts.labelled_share,
            "seed": self.opts.labelled_seed if self.opts.labelled_seed is not None else self.opts.split_seed,
            "eligible_train_photos": self.eligible, "labelled_photos": len(self.labelled_ids),
            "labelled_train_pairs": self.train_pairs[True], "unlabelled_train_pairs": self.train_pairs[False]}}
        if self.vstats is not None:
            out["vectorise"] = self.vstats.summary()
        return out

    def _count_pair(self, split: str, photo_id: str | None) -> None:
        if split == "train" and photo_id is not None:
            self.train_pairs[photo_id in self.labelled_ids] += 1

    # ------------------------------------------------------------------ photos
    def photo(self, pid: str, class_name: str, split: str, labelled: bool, image: bytes, h: int, w: int,
              source: str, file: str | os.PathLike) -> bool:
        if pid in self.photo_ids:
            self.report.add(file, DUPLICATE_ID, f"photo id {pid!r} already written")
            return False
        self.photo_ids.add(pid)
        if labelled:
            self.labelled_ids.add(pid)
        n = self.opts.photo_size
        if n is not None and (h, w) != (n, n):
            image, h, w = square_png(image, n, "RGB"), n, n
        self.w.add_photo(PhotoRow(id=pid, class_name=class_name, label=self.labels[class_name], split=split,
                                  image=image, height=h, width=w, source=source, labelled=bool(labelled)))
        return True

    # ------------------------------------------------------------------ sketches
    def _claim(self, sid: str, file: str | os.PathLike) -> bool:
        if sid in self.sketch_ids:
            self.report.add(file, DUPLICATE_ID, f"sketch id {sid!r} already written")
            return False
        self.sketch_ids.add(sid)
        return True

    def sketch_raster(self, sid: str, class_name: str, split: str, png: bytes, h: int, w: int,
                      photo_id: str | None, source: str, file: str | os.PathLike) -> bool:
        if self.vstats is not None:
            from sbir.data.format import decode_image
            from sbir.data.vectorise import vectorise_raster

            res = vectorise_raster(decode_image(png, mode="L", source=str(file)), self.vparams)
            self.vstats.add(sid, res)
            if not res.empty:
                return self.sketch_strokes(sid, class_name, split, res.strokes, photo_id, f"{source}#vectorised",
                                           file)
            self.report.add(file, VECTORISE_EMPTY, f"sketch {sid!r}: no ink above the threshold "
                                                   f"({self.vparams.ink_threshold}); raster kept without strokes")
        if not self._claim(sid, file):
            return False
        self.flush()  # keep the call order in the table
        self._count_pair(split, photo_id)
        n = self.opts.image_size  # every sketch image has the same size, rendered or raster
        if (h, w) != (n, n):
            png, h, w = square_png(png, n, "L"), n, n
        self.w.add_sketch(SketchRow(id=sid, class_name=class_name, label=self.labels[class_name], split=split,
                                    image=png, height=h, width=w, strokes=None, photo_id=photo_id, source=source))
        return True

    def sketch_strokes(self, sid: str, class_name: str, split: str, s3: np.ndarray, photo_id: str | None,
                       source: str, file: str | os.PathLike) -> bool:
        """``s3`` must already be validated (see :func:`checked_stroke3`)."""
        if not self._claim(sid, file):
            return False
        self._count_pair(split, photo_id)
        self.pending.append(_PendingSketch(sid, class_name, split, s3, photo_id, source))
        if len(self.pending) >= self.opts.render_batch:
            self.flush()
        return True

    def flush(self) -> None:
        if not self.pending:
            return
        from sbir.strokes import rasterise, render_to_uint8_rgb

        size = self.opts.image_size
        ink = rasterise([p.strokes for p in self.pending], size=size, line_width=self.opts.line_width,
                        padding=self.opts.padding)
        grey = render_to_uint8_rgb(ink)[..., 0]
        for p, g in zip(self.pending, grey):
            self.w.add_sketch(SketchRow(id=p.id, class_name=p.class_name, label=self.labels[p.class_name],
                                        split=p.split, image=encode_png(np.ascontiguousarray(g)), height=size,
                                        width=size, strokes=p.strokes, photo_id=p.photo_id, source=p.source))
        self.pending = []


def new_writer(out: Path, class_names: list[str], name: str, opts: IngestOptions, fmt: str,
               extra: dict[str, Any] | None = None) -> DatasetWriter:
    ingest_extra = {"format": fmt, "options": opts.to_manifest()}
    ingest_extra.update(extra or {})
    return DatasetWriter(out, class_names, name=name, row_group_size=opts.row_group_size,
                         extra={"ingest": ingest_extra})


def scan_class_dirs(base: Path, exts: Sequence[str], report: IngestReport, root: Path,
                    exclude: Sequence[str] = ()) -> dict[str, list[Path]]:
    """``base/<class>/*<ext>`` -> {class: sorted files}. Other files in class folders are reported as
    issues; hidden files and files beside the class folders are counted/listed in ``info``."""
    out: dict[str, list[Path]] = {}
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        if is_hidden(d) or d.name in exclude:
            continue
        if not d.is_dir():
            report.info.setdefault("ignored_top_level_files", []).append(relative_name(d, root))
            continue
        files = []
        for f in sorted(d.iterdir(), key=lambda p: natural_key(p.name)):
            if is_hidden(f):
                report.info["ignored_hidden_files"] = report.info.get("ignored_hidden_files", 0) + 1
                continue
            suf = f.suffix.lower()
            if f.is_file() and suf in exts:
                files.append(f)
            else:
                report.add(f, UNEXPECTED_FILE, f"expected {'/'.join(exts)} files in {d.name}/")
        out[d.name] = files
    return out


def open_photo_folder(path: str | os.PathLike | None, what: str, report: IngestReport,
                      default: Path | None = None) -> tuple[Path | None, dict[str, list[Path]]]:
    """An optional per-class photo folder (``<class>/*.jpg``; ``path``, else ``default`` when it is a
    folder) -> (folder or None, {class: photo files}); a given ``path`` that is not a folder is an error."""
    folder = None
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise IngestError(f"{what} photo folder {folder} does not exist (expected <class>/*.jpg)")
    elif default is not None and default.is_dir():
        folder = default
    if folder is None:
        return None, {}
    return folder, scan_class_dirs(folder, PHOTO_EXTS, report, folder)


def write_photo_folder(sink: Sink, files: dict[str, list[Path]], mapper: ClassMapper, opts: IngestOptions,
                       report: IngestReport, root: Path, prefix: str = "",
                       skip: Callable[[str, str], bool] | None = None, can_be_labelled: bool = True) -> int:
    """Unpaired per-class photos (extended sets): hash split; labelled share among train photos when
    ``can_be_labelled`` (class-level datasets), never in instance-paired datasets (no sketch pairs)."""
    n = 0
    for src_class in sorted(files):
        target = mapper(src_class)
        if target is None:
            mapper.drop(src_class, len(files[src_class]))
            continue
        todo = [f for f in files[src_class] if skip is None or not skip(src_class, f.stem)]
        lab = sink.pick_labelled(f"{prefix}{src_class}/{f.stem}" for f in todo
                                 if hash_split(f"{prefix}{src_class}/{f.stem}", opts) == "train") \
            if can_be_labelled else set()
        for f in todo:
            pid = f"{prefix}{src_class}/{f.stem}"
            loaded = load_photo(f, report)
            if loaded is None:
                continue
            img, h, w = loaded
            split = hash_split(pid, opts)
            labelled = pid in lab
            n += sink.photo(pid, target, split, labelled, img, h, w, relative_name(f, root), f)
    return n


def adapter(fn: Callable[..., IngestReport]) -> Callable[..., IngestReport]:
    """Run an adapter with ``options.torch_threads`` torch threads (restored afterwards)."""
    import functools

    @functools.wraps(fn)
    def wrapper(root: str | os.PathLike, out: str | os.PathLike,
                options: IngestOptions | None = None) -> IngestReport:
        opts = options or IngestOptions()
        if opts.torch_threads is None:
            return fn(root, out, opts)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(1, int(opts.torch_threads)))
        try:
            return fn(root, out, opts)
        finally:
            torch.set_num_threads(before)

    return wrapper


def finish_report(out: Path, report: IngestReport) -> IngestReport:
    """After the writer closed: attach the manifest it wrote."""
    report.manifest = json.loads((out / MANIFEST_FILE).read_text())
    return report
