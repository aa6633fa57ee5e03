"""Quick, Draw! ndjson (simplified or raw, optionally .gz; streamed line by line) and sketch-rnn ``.npz``
(+ an optional per-class photo folder) -> the project's Parquet format; see :mod:`sbir.data.ingest`."""
from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sbir.data.ingest.common import (
    EMPTY_DRAWING,
    INVALID_DRAWING,
    INVALID_JSON,
    UNREADABLE_FILE,
    WORD_MISMATCH,
    IngestError,
    IngestOptions,
    IngestReport,
    absolute_to_stroke3,
    check_root,
    checked_stroke3,
    hash_split,
    is_hidden,
    new_report,
    progress_bar,
    relative_name,
)
from sbir.data.ingest.writing import (
    ClassMapper,
    Sink,
    adapter,
    finish_report,
    new_writer,
    open_photo_folder,
    write_photo_folder,
)

SPLITS_NPZ = ("train", "valid", "test")
_QD_PREFIXES = ("full_simplified_", "full_raw_", "full-simplified-", "full-raw-", "sketchrnn_", "sketchrnn-")


def _qd_class(path: Path) -> str:
    name = path.name
    for suf in (".ndjson.gz", ".ndjson", ".npz"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    for pre in _QD_PREFIXES:
        if name.startswith(pre):
            name = name[len(pre):]
            break
    return name


def _qd_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.is_file() and not is_hidden(p)
             and (p.name.lower().endswith((".ndjson", ".ndjson.gz", ".npz")))]
    return sorted(files, key=lambda p: (_qd_class(p), p.as_posix()))


def quickdraw_drawing_to_stroke3(drawing: Any) -> np.ndarray:
    """Quick Draw ``drawing`` (simplified ``[[x…],[y…]]`` or raw ``[[x…],[y…],[t…]]`` per stroke)
    -> stroke-3 in the source's coordinates (time dropped). Raises ValueError("empty"/reason)."""
    if not isinstance(drawing, list):
        raise ValueError(f"'drawing' is a {type(drawing).__name__}, expected a list of strokes")
    polylines = []
    for i, stroke in enumerate(drawing):
        if not isinstance(stroke, list) or len(stroke) not in (2, 3):
            raise ValueError(f"stroke {i} is not [[x...],[y...]] or [[x...],[y...],[t...]]")
        xs, ys = stroke[0], stroke[1]
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
            raise ValueError(f"stroke {i}: x and y lists differ in length or are not lists")
        if not xs:
            continue
        try:
            pts = np.array([xs, ys], dtype=np.float64).T
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stroke {i}: non-numeric coordinates ({exc})") from exc
        if not np.isfinite(pts).all():
            raise ValueError(f"stroke {i}: non-finite coordinates")
        polylines.append(pts)
    if not polylines:
        raise ValueError("empty")
    pts = np.concatenate(polylines, axis=0)
    pen = np.zeros(pts.shape[0], dtype=np.float32)
    pen[np.cumsum([len(p) for p in polylines]) - 1] = 1.0
    return absolute_to_stroke3(pts, pen)


def _iter_lines(path: Path, progress: bool, desc: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) with a byte-based progress bar; gz read transparently."""
    size = path.stat().st_size
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    bar = progress_bar(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) \
        if not path.name.lower().endswith(".gz") else \
        progress_bar(unit=" lines", desc=desc, disable=not progress, leave=False)
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                bar.update(len(raw) if bar.total else 1)
                yield lineno, raw
    finally:
        bar.close()


@adapter
def ingest_quickdraw(root: str | os.PathLike, out: str | os.PathLike,
                     options: IngestOptions | None = None) -> IngestReport:
    """Quick, Draw! ndjson (simplified or raw) and sketch-rnn .npz, one file per class; streamed."""
    opts = options or IngestOptions()
    if opts.npz_valid_split not in ("test", "val", "train", "drop"):
        raise IngestError(f"npz_valid_split must be test, val, train or drop, got {opts.npz_valid_split!r}")
    root = check_root(root, "Quick Draw")
    out = Path(out)
    report = new_report("quickdraw", root, out, opts)
    eps = opts.simplify_eps or 0.0
    files = _qd_files(root)
    if not files:
        raise IngestError(f"no Quick Draw files under {root}: expected <word>.ndjson (simplified or raw, "
                          f"optionally .gz) or sketch-rnn <word>.npz")
    photo_root, photo_files = open_photo_folder(opts.photos, "Quick Draw", report)
    base = root if root.is_dir() else root.parent
    mapper = ClassMapper(opts.class_map, report)
    classes = mapper.class_names({_qd_class(f) for f in files} | set(photo_files))
    kinds = sorted({"npz" if f.name.lower().endswith(".npz") else "ndjson" for f in files})
    extra = {"files": kinds, "split_source": "npz splits / hash" if "npz" in kinds else "hash"}
    with new_writer(out, classes, report.name, opts, "quickdraw", extra) as writer:
        sink = Sink(writer, opts, report, eps)
        kept: dict[str, int] = defaultdict(int)
        truncated: list[str] = []
        bar = progress_bar(files, desc="quickdraw files", unit="file", disable=not opts.progress or len(files) < 2)
        for f in bar:
            src_class = _qd_class(f)
            target = mapper(src_class)
            if target is None:
                report.drop("unmapped_class_files")
                continue
            if f.name.lower().endswith(".npz"):
                _qd_npz(f, src_class, target, sink, opts, report, base, eps, truncated)
            else:
                _qd_ndjson(f, src_class, target, sink, opts, report, base, eps, kept, truncated)
        if truncated:
            report.info["max_per_class_reached"] = truncated
        if photo_files:
            report.info["photos_written"] = write_photo_folder(sink, photo_files, mapper, opts, report, photo_root)
        sink.flush()
    return finish_report(out, report)


def _qd_ndjson(f: Path, src_class: str, target: str, sink: Sink, opts: IngestOptions, report: IngestReport,
               base: Path, eps: float, kept: dict[str, int], truncated: list[str]) -> None:
    rel = relative_name(f, base)
    blank = 0
    for lineno, raw in _iter_lines(f, opts.progress, src_class):
        if opts.max_per_class is not None and kept[src_class] >= opts.max_per_class:
            truncated.append(f"{src_class} ({f.name}, stopped before line {lineno})")
            break
        if not raw.strip():
            blank += 1
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            report.add(f, INVALID_JSON, f"{type(exc).__name__}: {exc}"[:200], line=lineno)
            continue
        if not isinstance(rec, dict) or "drawing" not in rec:
            report.add(f, INVALID_DRAWING, "record without a 'drawing' field", line=lineno)
            continue
        word = rec.get("word")
        if word is not None and str(word) != src_class:
            report.add(f, WORD_MISMATCH, f"word {word!r} in the file of class {src_class!r}", line=lineno)
            continue
        if opts.recognized_only and rec.get("recognized") is False:
            report.drop("not_recognized")
            continue
        try:
            s3 = quickdraw_drawing_to_stroke3(rec["drawing"])
        except ValueError as exc:
            if str(exc) == "empty":
                report.add(f, EMPTY_DRAWING, "drawing has no points", line=lineno)
            else:
                report.add(f, INVALID_DRAWING, str(exc), line=lineno)
            continue
        s3 = checked_stroke3(s3, f, report, eps, line=lineno)
        if s3 is None:
            continue
        key = rec.get("key_id")
        sid = f"{src_class}/{key}" if key is not None else f"{src_class}/line{lineno}"
        split = hash_split(sid, opts)
        if sink.sketch_strokes(sid, target, split, s3, None, f"{rel}:{lineno}", f"{f}:{lineno}"):
            kept[src_class] += 1
    if blank:
        report.info.setdefault("blank_lines", {})[f.name] = blank


def _qd_npz(f: Path, src_class: str, target: str, sink: Sink, opts: IngestOptions, report: IngestReport,
            base: Path, eps: float, truncated: list[str]) -> None:
    rel = relative_name(f, base)
    try:
        npz = np.load(f, encoding="latin1", allow_pickle=True)
        keys = list(npz.files)
    except Exception as exc:
        report.add(f, UNREADABLE_FILE, f"not a readable .npz ({exc})")
        return
    other = [k for k in keys if k not in SPLITS_NPZ]
    if other:
        report.info.setdefault("npz_ignored_keys", {})[f.name] = other
    for key in SPLITS_NPZ:
        if key not in keys:
            continue
        split = {"train": "train", "test": "test", "valid": opts.npz_valid_split}[key]
        try:
            arr = npz[key]
        except Exception as exc:
            report.add(f, UNREADABLE_FILE, f"array {key!r} cannot be read ({exc})")
            continue
        if split == "drop":
            report.drop("npz_valid_dropped", len(arr))
            continue
        n_kept = 0
        items = progress_bar(range(len(arr)), desc=f"{src_class}:{key}", disable=not opts.progress, leave=False)
        for i in items:
            if opts.max_per_class is not None and n_kept >= opts.max_per_class:
                truncated.append(f"{src_class} ({f.name}:{key}, {len(arr) - i} not read)")
                break
            where = f"{f}:{key}[{i}]"
            s3 = checked_stroke3(np.asarray(arr[i]), where, report, eps)
            if s3 is None:
                continue
            sid = f"{src_class}/{key}/{i:06d}"
            n_kept += sink.sketch_strokes(sid, target, split, s3, None, f"{rel}:{key}[{i}]", where)


