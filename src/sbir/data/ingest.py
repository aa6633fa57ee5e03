"""Ingest adapters: published sketch/photo datasets -> the project's Parquet format.

One function per source layout, each ``ingest_<format>(root, out, options) -> IngestReport``:

``sketchy``
    Sketchy as published, ``rendered_256x256/256x256/{photo,sketch}/tx_000000000000/<class>/``
    (photos ``n<synset>_<id>.jpg``, sketches ``<photo stem>-<k>.png``) with ``info/testset.txt``
    (held-out photos, ``<class>/<stem>.jpg``) and ``info/invalid-*.txt`` (sketch stems; dropped
    with ``drop_invalid``), or the flat ``photo/<class>/`` + ``sketch/<class>/`` layout (auto-detected).
    Sketchy-Extended photos (``extended_photos``: ``<class>/*.jpg``) are added unpaired.
``tuberlin``
    TU-Berlin ``<class>/<n>.svg`` and/or ``<class>/<n>.png`` (also under ``svg/`` and ``png/``);
    SVG strokes are parsed (:mod:`sbir.data.svg`), PNGs kept as rasters; ``photos`` (default:
    ``<root>/images/`` when present) adds the extended per-class photo folder (unpaired).
``quickdraw``
    Quick, Draw! simplified or raw ``<word>.ndjson`` (optionally ``.gz``), streamed line by line,
    and sketch-rnn ``<word>.npz`` (``train``/``valid``/``test`` stroke-3); ``photos`` adds a
    per-class photo folder (Quick Draw-Extended).
``qmul``
    QMUL-Shoe-V2/Chair-V2 pickled coordinate dict + ``photo/<photo>.png``; the
    ``trainA/trainB/testA/testB`` layout (A = sketches, B = photos, paired by file name); the
    QMUL-V1 ``<x>_sketch_db_{train,test}.mat`` + ``<x>_edge_db_{train,test}.mat`` databases (the
    edge map stands in for the missing photo unless ``<x>_image_db_*.mat`` is there); and folders
    of ``<photo>/{photo_gt.png, sketch_gt.svg|png}`` pairs.

Conventions shared by all adapters

* Row ids are ``<source class>/<file stem>`` (or the dataset's own key); a sketch's ``photo_id`` is
  the id of the photo it was drawn from (instance-level pair) or null.
* Splits: the dataset's own split where it has one (Sketchy ``testset.txt``, Quick Draw ``.npz``,
  QMUL), else a deterministic hash of the id (``test_share``, ``split_seed``); sketches follow
  their photo. ``labelled`` photos: exactly ``round(labelled_share * n)`` of the ``n`` eligible *train*
  photos of each class (or QMUL split), those with the smallest hash of the id salted with
  ``labelled_seed`` (default ``split_seed``): deterministic, stratified, reported under
  ``info.labelled`` and in the manifest (``ingest.labelled``: eligible photos, labelled photos,
  labelled and unlabelled train pairs);
  in instance-paired datasets (Sketchy, QMUL) only photos with at least one written sketch can be
  labelled (a labelled photo is one whose sketch pairs training may use; Sketchy-Extended photos
  are never labelled); in class-level datasets (TU-Berlin, Quick Draw photo folders) any train
  photo can be.
* Strokes are stored as stroke-3 in the source's units (Quick Draw 0..255, TU-Berlin 800 x 800
  canvas, QMUL 256 canvas), never rescaled; the sketch ``image`` is rendered with the project's
  rasteriser (:func:`sbir.strokes.rasterise`, greyscale PNG, black on white, ``image_size``).
  Sketches that exist only as rasters keep their raster (as greyscale) with ``strokes = None``,
  unless ``vectorise`` is on: then each raster is traced into stroke-3 (:mod:`sbir.data.vectorise`,
  in the raster's pixel units), the stored image is re-rendered from the strokes by the project's
  rasteriser, ``source`` ends in ``#vectorised``, and the trace statistics (strokes per sketch,
  IoU / coverage against the raster) go to ``info.vectorise`` and the manifest (``ingest.vectorise``).
  A raster that yields no strokes keeps its raster, is counted (``no_strokes``) and reported as an
  issue (``vectorise_no_strokes``).
* ``photo_size``: photos are resized to ``photo_size`` x ``photo_size`` (PNG) at ingest, for small
  pipelines on CPU; by default photos keep their bytes.
  Photos keep their original JPEG/PNG bytes (other formats are re-encoded as PNG).
* Bad input is never dropped silently: every corrupt image, unparsable SVG, invalid ndjson line,
  empty drawing, sketch without photo, unreadable file... is an *issue* in the
  :class:`IngestReport` (count per reason + ``{file, reason, detail}``); deliberate exclusions
  (class map, ``drop_invalid``, ``recognized_only``, ``max_per_class``) are counted under
  ``dropped``. With ``strict=True`` the first issue raises :class:`StrictIngestError`.
* Deterministic: file lists are sorted, splits are hashes, no time stamps, so the same input gives
  the same manifest checksum.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from sbir.data.format import MANIFEST_FILE, DatasetWriter, PhotoRow, SketchRow, encode_png
from sbir.data.svg import SvgError, svg_to_polylines

__all__ = [
    "FORMATS",
    "IngestError",
    "IngestOptions",
    "IngestReport",
    "StrictIngestError",
    "default_report_path",
    "ingest",
    "ingest_qmul",
    "ingest_quickdraw",
    "ingest_sketchy",
    "ingest_tuberlin",
    "load_class_map",
]

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RASTER_SKETCH_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
SPLITS_NPZ = ("train", "valid", "test")

# issue reasons (bad input)
CORRUPT_IMAGE = "corrupt_image"
UNREADABLE_FILE = "unreadable_file"
UNPARSABLE_SVG = "unparsable_svg"
INVALID_JSON = "invalid_ndjson_line"
INVALID_DRAWING = "invalid_drawing"
EMPTY_DRAWING = "empty_drawing"
SKETCH_WITHOUT_PHOTO = "sketch_without_photo"
OUTSIDE_CANVAS = "outside_canvas"
DUPLICATE_ID = "duplicate_id"
WORD_MISMATCH = "word_mismatch"
UNEXPECTED_FILE = "unexpected_file"
ROW_COUNT_MISMATCH = "row_count_mismatch"
SPLIT_CONFLICT = "split_conflict"
VECTORISE_EMPTY = "vectorise_no_strokes"
BAD_KEY = "bad_key"


class IngestError(RuntimeError):
    """The input cannot be ingested at all (missing root, unrecognised layout, bad option)."""


class StrictIngestError(IngestError):
    """Raised in strict mode at the first issue; ``.report`` holds the report so far."""

    def __init__(self, message: str, report: "IngestReport") -> None:
        super().__init__(message)
        self.report = report


# =========================================================================== options / report
@dataclass
class IngestOptions:
    """Options of every adapter (each reads the ones that concern it; see ``stages/ingest.py --help``)."""

    name: str | None = None              # dataset name in the manifest (default: output folder name)
    image_size: int = 256                # side of sketch images rendered from strokes
    line_width: float = 2.0              # rasteriser line width in output pixels
    padding: float = 0.05                # rasteriser padding (share of the side on every edge)
    test_share: float = 0.2              # hash split: share of ids sent to "test" (no official split)
    labelled_share: float = 1.0          # share of eligible train photos flagged labelled (exact per class)
    split_seed: str = "sbir"             # salt of the split / labelled hashes
    labelled_seed: str | None = None     # salt of the labelled choice (None: split_seed)
    photo_size: int | None = None        # resize photos to this square size (None: keep the bytes)
    vectorise: bool = False              # trace raster sketches into strokes (sbir.data.vectorise)
    vectorise_params: dict[str, Any] | None = None  # VectoriseParams overrides
    strict: bool = False                 # first issue -> StrictIngestError
    class_map: dict[str, str | None] | None = None  # source class -> target class (None: drop)
    progress: bool = True                # tqdm progress bars
    row_group_size: int = 1024           # Parquet rows per row group
    render_batch: int = 64               # sketches rasterised per call
    torch_threads: int | None = 1        # torch intra-op threads while rasterising (None: leave as is);
                                         # 1 is several times faster than 2+ on a busy, small CPU
    flatten_step: float = 2.0            # SVG: one Bézier sample per this many source units
    simplify_eps: float | None = None    # RDP epsilon (source units); None: 0.5 for SVG, 0 otherwise
    # sketchy
    drop_invalid: bool = False           # drop sketches listed in info/invalid-*.txt
    extended_photos: str | None = None   # Sketchy-Extended photo folder (<class>/*.jpg)
    sketchy_variant: str = "tx_000000000000"  # which augmentation folder of the published layout
    info_dir: str | None = None          # Sketchy info/ folder (default: found next to the data)
    # tuberlin / quickdraw
    photos: str | None = None            # per-class photo folder (TU-Berlin / Quick Draw extended)
    tuberlin_source: str = "auto"        # auto (SVG when present, else PNG) | svg | png
    canvas_tolerance: float = 0.02       # SVG points may exceed the canvas by this share
    recognized_only: bool = False        # Quick Draw: drop drawings with recognized == false
    max_per_class: int | None = None     # Quick Draw: keep the first N drawings per class (per npz split)
    npz_valid_split: str = "test"        # sketch-rnn .npz "valid" goes to this split (test|val|train|drop)
    # qmul
    class_name: str | None = None        # QMUL class name (default: from the file names, else "shoe")
    qmul_layout: str = "auto"            # auto | coordinates | ab | v1 | pairs
    qmul_sketch_side: str = "A"          # trainA/trainB layout: which letter holds the sketches
    qmul_v1_photos: str = "auto"         # auto (image_db if present, else edge_db) | image | edge

    def to_manifest(self) -> dict[str, Any]:
        """Options as recorded in the manifest (paths reduced to their last component)."""
        d = asdict(self)
        for k in ("extended_photos", "info_dir", "photos"):
            if d[k] is not None:
                d[k] = Path(d[k]).name
        d.pop("progress")
        d.pop("strict")
        d.pop("torch_threads")
        d.pop("render_batch")
        return d

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "IngestOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise IngestError(f"unknown ingest option(s): {sorted(unknown)}")
        return cls(**kwargs)


@dataclass
class IngestReport:
    """What an ingest read, wrote and could not use."""

    format: str
    root: str
    out: str
    name: str
    strict: bool = False
    issue_counts: dict[str, int] = field(default_factory=dict)
    issues: list[dict[str, Any]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    max_listed: int = 100_000

    def add(self, file: str | os.PathLike, reason: str, detail: str = "", line: int | None = None) -> None:
        """Record one bad input; in strict mode raise at once."""
        self.issue_counts[reason] = self.issue_counts.get(reason, 0) + 1
        entry: dict[str, Any] = {"file": str(file), "reason": reason}
        if line is not None:
            entry["line"] = line
        if detail:
            entry["detail"] = detail
        if len(self.issues) < self.max_listed:
            self.issues.append(entry)
        if self.strict:
            where = f"{file}" + (f":{line}" if line is not None else "")
            raise StrictIngestError(f"strict ingest failed: {where}: {reason}" + (f" ({detail})" if detail else ""),
                                    self)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count items excluded on purpose (by an option), not bad input."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def n_issues(self) -> int:
        return sum(self.issue_counts.values())

    @property
    def ok(self) -> bool:
        return self.n_issues == 0

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": self.format,
            "root": self.root,
            "out": self.out,
            "name": self.name,
            "strict": self.strict,
            "n_issues": self.n_issues,
            "issue_counts": dict(sorted(self.issue_counts.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "info": self.info,
            "issues": self.issues,
            "issues_listed": len(self.issues),
        }
        if self.manifest is not None:
            d["manifest"] = {k: self.manifest.get(k) for k in
                             ("name", "totals", "counts", "labelled_photos", "paired_sketches", "checksum")}
        return d

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        os.replace(tmp, path)
        return path

    def summary(self) -> str:
        lines = [f"ingest {self.format}: {self.root} -> {self.out}"]
        if self.manifest is not None:
            t = self.manifest.get("totals", {})
            lines.append(f"  written: {t.get('photos', 0)} photos, {t.get('sketches', 0)} sketches "
                         f"({self.manifest.get('paired_sketches', 0)} paired), "
                         f"{len(self.manifest.get('class_names', []))} classes, "
                         f"{self.manifest.get('labelled_photos', 0)} labelled photos")
            for table, per_split in self.manifest.get("counts", {}).items():
                parts = ", ".join(f"{s}={sum(c.values())}" for s, c in per_split.items())
                lines.append(f"    {table}: {parts or 'none'}")
            lines.append(f"  checksum: {self.manifest.get('checksum')}")
        else:
            lines.append("  nothing written")
        if self.issue_counts:
            lines.append(f"  issues ({self.n_issues}): " +
                         ", ".join(f"{k}={v}" for k, v in sorted(self.issue_counts.items())))
            for e in self.issues[:5]:
                lines.append(f"    {e['file']}{':' + str(e['line']) if 'line' in e else ''}: {e['reason']}"
                             + (f" ({e['detail']})" if e.get("detail") else ""))
            if self.n_issues > 5:
                lines.append(f"    ... {self.n_issues - 5} more in the report")
        else:
            lines.append("  issues: none")
        if self.dropped:
            lines.append("  dropped on purpose: " + ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())))
        return "\n".join(lines)


def default_report_path(out: str | os.PathLike, name: str | None = None) -> Path:
    """``<out>/../<name>_ingest_report.json`` (beside the output folder, not inside it)."""
    out = Path(out)
    return out.parent / f"{name or out.name}_ingest_report.json"


def load_class_map(path: str | os.PathLike) -> dict[str, str | None]:
    """Read a ``{source_name: target_name}`` mapping from JSON or YAML (null target: drop the class)."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"class map {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise IngestError(f"class map {path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise IngestError(f"class map {path}: expected a mapping {{source_name: target_name}}, got {type(data).__name__}")
    out: dict[str, str | None] = {}
    for k, v in data.items():
        if v is not None and not isinstance(v, (str, int)):
            raise IngestError(f"class map {path}: target of {k!r} must be a name or null, got {v!r}")
        out[str(k)] = None if v is None else str(v)
    return out


# =========================================================================== small helpers
def _unit(key: str, salt: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from a key."""
    h = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _hash_split(key: str, opts: IngestOptions) -> str:
    return "test" if _unit(key, opts.split_seed + ":split") < opts.test_share else "train"


def _pick_labelled(keys: Iterable[str], opts: IngestOptions) -> set[str]:
    """Exactly ``round(labelled_share * n)`` of the ``n`` eligible keys: those with the smallest
    salted hash (deterministic, independent of order; a larger share keeps the smaller one's picks)."""
    keys = sorted(set(keys))
    n = int(math.floor(opts.labelled_share * len(keys) + 0.5))
    salt = (opts.labelled_seed if opts.labelled_seed is not None else opts.split_seed) + ":labelled"
    return set(sorted(keys, key=lambda k: _unit(k, salt))[:n])


def _natkey(s: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t != "")


def _check_root(root: str | os.PathLike, what: str) -> Path:
    p = Path(root)
    if not p.exists():
        raise IngestError(f"{what} root {p} does not exist")
    return p


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name in ("Thumbs.db", "desktop.ini")


def _read_bytes(path: Path, report: IngestReport) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        report.add(path, UNREADABLE_FILE, str(exc))
        return None


def _probe_photo(data: bytes) -> tuple[int, int, str]:
    """Fully decode image bytes (raises on corrupt data); returns (height, width, PIL format)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.height, img.width, img.format or ""


def _photo_bytes(data: bytes) -> tuple[bytes, int, int]:
    """Validate photo bytes; keep JPEG/PNG as they are, re-encode anything else as RGB PNG."""
    h, w, fmt = _probe_photo(data)
    if fmt in ("JPEG", "PNG"):
        return data, h, w
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return encode_png(arr), h, w


def _to_grey(img: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 greyscale, transparent areas composited onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("L"))


def _sketch_raster_bytes(data: bytes) -> tuple[bytes, int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        grey = _to_grey(img)
    return encode_png(np.ascontiguousarray(grey)), grey.shape[0], grey.shape[1]


def _abs_to_stroke3(points: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """Absolute (N,2) points + pen-lift flags (N,) -> stroke-3 (first row = offset from origin)."""
    out = np.zeros((points.shape[0], 3), dtype=np.float32)
    pts = points.astype(np.float64)
    out[0, :2] = pts[0]
    out[1:, :2] = np.diff(pts, axis=0)
    out[:, 2] = (pen > 0.5).astype(np.float32)
    out[-1, 2] = 1.0
    return out


def _tqdm(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, **kw)


# =========================================================================== class mapping
class _ClassMapper:
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


class _Sink:
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
        """The labelled subset of these eligible train photo ids (see :func:`_pick_labelled`)."""
        keys = list(keys)
        self.eligible += len(set(keys))
        return _pick_labelled(keys, self.opts)

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
        if self.opts.photo_size is not None and (h != self.opts.photo_size or w != self.opts.photo_size):
            n = self.opts.photo_size
            with Image.open(io.BytesIO(image)) as im:
                arr = np.asarray(im.convert("RGB").resize((n, n), Image.Resampling.LANCZOS))
            image, h, w = encode_png(np.ascontiguousarray(arr)), n, n
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
        self.w.add_sketch(SketchRow(id=sid, class_name=class_name, label=self.labels[class_name], split=split,
                                    image=png, height=h, width=w, strokes=None, photo_id=photo_id, source=source))
        return True

    def sketch_strokes(self, sid: str, class_name: str, split: str, s3: np.ndarray, photo_id: str | None,
                       source: str, file: str | os.PathLike) -> bool:
        """``s3`` must already be validated (see :func:`_checked_stroke3`)."""
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


def _checked_stroke3(s3: np.ndarray, file: str | os.PathLike, report: IngestReport, simplify_eps: float,
                     line: int | None = None) -> np.ndarray | None:
    """Validate (and optionally simplify) a stroke-3 sketch; report and return None if unusable."""
    from sbir.strokes import simplify_stroke3, validate_stroke3

    arr = np.asarray(s3)
    if arr.size == 0:
        report.add(file, EMPTY_DRAWING, "no points", line=line)
        return None
    try:
        arr = validate_stroke3(arr, str(file))
    except ValueError as exc:
        report.add(file, INVALID_DRAWING, str(exc).replace(f"{file}: ", ""), line=line)
        return None
    if simplify_eps > 0:
        arr = np.asarray(simplify_stroke3(arr, simplify_eps), dtype=np.float32)
    return arr


def _writer(out: Path, class_names: list[str], name: str, opts: IngestOptions, fmt: str,
            extra: dict[str, Any] | None = None) -> DatasetWriter:
    ingest_extra = {"format": fmt, "options": opts.to_manifest()}
    ingest_extra.update(extra or {})
    return DatasetWriter(out, class_names, name=name, row_group_size=opts.row_group_size,
                         extra={"ingest": ingest_extra})


def _scan_class_dirs(base: Path, exts: Sequence[str], report: IngestReport, root: Path,
                     exclude: Sequence[str] = ()) -> dict[str, list[Path]]:
    """``base/<class>/*<ext>`` -> {class: sorted files}. Other files in class folders are reported as
    issues; hidden files and files beside the class folders are counted/listed in ``info``."""
    out: dict[str, list[Path]] = {}
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        if _is_hidden(d) or d.name in exclude:
            continue
        if not d.is_dir():
            report.info.setdefault("ignored_top_level_files", []).append(_rel(d, root))
            continue
        files = []
        for f in sorted(d.iterdir(), key=lambda p: _natkey(p.name)):
            if _is_hidden(f):
                report.info["ignored_hidden_files"] = report.info.get("ignored_hidden_files", 0) + 1
                continue
            suf = f.suffix.lower()
            if f.is_file() and suf in exts:
                files.append(f)
            else:
                report.add(f, UNEXPECTED_FILE, f"expected {'/'.join(exts)} files in {d.name}/")
        out[d.name] = files
    return out


def _write_photo_folder(sink: _Sink, files: dict[str, list[Path]], mapper: _ClassMapper, opts: IngestOptions,
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
                                 if _hash_split(f"{prefix}{src_class}/{f.stem}", opts) == "train") \
            if can_be_labelled else set()
        for f in todo:
            pid = f"{prefix}{src_class}/{f.stem}"
            data = _read_bytes(f, report)
            if data is None:
                continue
            try:
                img, h, w = _photo_bytes(data)
            except Exception as exc:
                report.add(f, CORRUPT_IMAGE, str(exc))
                continue
            split = _hash_split(pid, opts)
            labelled = pid in lab
            n += sink.photo(pid, target, split, labelled, img, h, w, _rel(f, root), f)
    return n


def _adapter(fn: Callable[..., IngestReport]) -> Callable[..., IngestReport]:
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


def _done(out: Path, report: IngestReport) -> IngestReport:
    """After the writer closed: attach the manifest it wrote."""
    report.manifest = json.loads((out / MANIFEST_FILE).read_text())
    return report


def _new_report(fmt: str, root: Path, out: Path, opts: IngestOptions) -> IngestReport:
    return IngestReport(format=fmt, root=str(root), out=str(out), name=opts.name or out.name, strict=opts.strict)


# =========================================================================== Sketchy
_SKETCH_NAME = re.compile(r"^(?P<stem>.+)-(?P<k>\d+)$")


@dataclass
class _SketchyLayout:
    kind: str          # "published" or "flat"
    photo_dir: Path
    sketch_dir: Path
    info_dir: Path | None


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
            info = None
            if opts.info_dir is not None:
                info = Path(opts.info_dir)
                if not info.is_dir():
                    raise IngestError(f"Sketchy info folder {info} does not exist")
            else:
                for cand in (root / "info", base / "info", base.parent / "info", base.parent.parent / "info"):
                    if cand.is_dir():
                        info = cand
                        break
            return _SketchyLayout(kind, photo_dir, sketch_dir, info)
    raise IngestError(
        f"no Sketchy layout under {root}: expected rendered_256x256/256x256/{{photo,sketch}}/{variant}/<class>/ "
        f"(published, with info/testset.txt) or photo/<class>/*.jpg + sketch/<class>/*.png (flat)")


def _read_list(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


@_adapter
def ingest_sketchy(root: str | os.PathLike, out: str | os.PathLike,
                   options: IngestOptions | None = None) -> IngestReport:
    """Sketchy (published or flat layout) + optional Sketchy-Extended photos; see the module doc."""
    opts = options or IngestOptions()
    root = _check_root(root, "Sketchy")
    out = Path(out)
    layout = _find_sketchy_layout(root, opts)
    report = _new_report("sketchy", root, out, opts)
    report.info["layout"] = layout.kind
    eps = opts.simplify_eps or 0.0

    photo_files = _scan_class_dirs(layout.photo_dir, PHOTO_EXTS, report, root)
    sketch_files = _scan_class_dirs(layout.sketch_dir, RASTER_SKETCH_EXTS, report, root)
    ext_files: dict[str, list[Path]] = {}
    ext_root = None
    if opts.extended_photos is not None:
        ext_root = Path(opts.extended_photos)
        if not ext_root.is_dir():
            raise IngestError(f"Sketchy-Extended photo folder {ext_root} does not exist (expected <class>/*.jpg)")
        ext_files = _scan_class_dirs(ext_root, PHOTO_EXTS, report, ext_root)
    if not photo_files and not sketch_files:
        raise IngestError(f"Sketchy: no class folders in {layout.photo_dir} or {layout.sketch_dir}")

    # official test list and invalid lists
    testset: set[tuple[str, str]] | None = None
    invalid: dict[str, str] = {}
    if layout.info_dir is not None:
        ts = layout.info_dir / "testset.txt"
        if ts.is_file():
            testset = set()
            for ln in _read_list(ts):
                p = Path(ln)
                testset.add((p.parent.as_posix() if p.parent.as_posix() != "." else "", p.stem))
            report.info["testset"] = f"{ts.name} ({len(testset)} photos)"
        for lst in sorted(layout.info_dir.glob("invalid-*.txt")):
            for ln in _read_list(lst):
                invalid.setdefault(Path(ln).stem if Path(ln).suffix.lower() in RASTER_SKETCH_EXTS else Path(ln).name,
                                   lst.stem)
        report.info["invalid_lists"] = sorted(p.name for p in layout.info_dir.glob("invalid-*.txt"))
    test_classless = {stem for c, stem in testset} if testset is not None and any(c == "" for c, _ in testset) else set()

    def photo_split(src_class: str, stem: str, pid: str) -> str:
        if testset is None:
            return _hash_split(pid, opts)
        return "test" if (src_class, stem) in testset or stem in test_classless else "train"

    mapper = _ClassMapper(opts.class_map, report)
    classes = mapper.class_names(set(photo_files) | set(sketch_files) | set(ext_files))
    extra = {"layout": layout.kind, "split_source": "testset.txt" if testset is not None else "hash",
             "sketchy_variant": opts.sketchy_variant if layout.kind == "published" else None}
    writer = _writer(out, classes, report.name, opts, "sketchy", extra)

    with writer:
        sink = _Sink(writer, opts, report, eps)
        on_invalid_list = 0
        for src_class in _tqdm(sorted(set(photo_files) | set(sketch_files)), desc="sketchy classes", unit="class",
                               disable=not opts.progress):
            target = mapper(src_class)
            photos = photo_files.get(src_class, [])
            sketches = sketch_files.get(src_class, [])
            if target is None:
                mapper.drop(src_class, len(photos) + len(sketches))
                continue
            # 1) validate photos (bytes are re-read when written)
            good_photos: dict[str, Path] = {}
            for f in photos:
                data = _read_bytes(f, report)
                if data is None:
                    continue
                try:
                    _probe_photo(data)
                except Exception as exc:
                    report.add(f, CORRUPT_IMAGE, str(exc))
                    continue
                if f.stem in good_photos:
                    report.add(f, DUPLICATE_ID, f"another photo with stem {f.stem!r} in {src_class}/")
                    continue
                good_photos[f.stem] = f
            # 2) decode sketches
            decoded: list[tuple[str, str | None, bytes, int, int, Path]] = []
            for f in sketches:
                m = _SKETCH_NAME.match(f.stem)
                photo_stem = m.group("stem") if m else f.stem
                if f.stem in invalid:
                    if opts.drop_invalid:
                        report.drop(f"invalid_list:{invalid[f.stem]}")
                        continue
                    on_invalid_list += 1
                data = _read_bytes(f, report)
                if data is None:
                    continue
                try:
                    png, h, w = _sketch_raster_bytes(data)
                except Exception as exc:
                    report.add(f, CORRUPT_IMAGE, str(exc))
                    continue
                if not m:
                    report.add(f, SKETCH_WITHOUT_PHOTO, "file name is not <photo stem>-<k>")
                    decoded.append((photo_stem, None, png, h, w, f))
                elif photo_stem not in good_photos:
                    report.add(f, SKETCH_WITHOUT_PHOTO, f"no usable photo {src_class}/{photo_stem}.*")
                    decoded.append((photo_stem, None, png, h, w, f))
                else:
                    decoded.append((photo_stem, photo_stem, png, h, w, f))
            paired = {d[1] for d in decoded if d[1] is not None}
            # 3) photos
            splits = {stem: photo_split(src_class, stem, f"{src_class}/{stem}") for stem in good_photos}
            lab = sink.pick_labelled(f"{src_class}/{stem}" for stem in good_photos
                                     if splits[stem] == "train" and stem in paired)
            written: set[str] = set()
            for stem, f in good_photos.items():
                pid = f"{src_class}/{stem}"
                split = splits[stem]
                labelled = pid in lab
                data = _read_bytes(f, report)
                if data is None:
                    continue
                img, h, w = _photo_bytes(data)
                if sink.photo(pid, target, split, labelled, img, h, w, _rel(f, root), f):
                    written.add(stem)
            # 4) sketches
            for photo_stem, pstem, png, h, w, f in decoded:
                sid = f"{src_class}/{f.stem}"
                if pstem is not None and pstem not in written:
                    report.add(f, SKETCH_WITHOUT_PHOTO, f"photo {src_class}/{pstem} could not be written")
                    pstem = None
                if pstem is not None:
                    split, photo_id = splits[pstem], f"{src_class}/{pstem}"
                else:
                    split, photo_id = photo_split(src_class, photo_stem, f"{src_class}/{photo_stem}"), None
                sink.sketch_raster(sid, target, split, png, h, w, photo_id, _rel(f, root), f)
        if invalid and not opts.drop_invalid:
            report.info["sketches_on_invalid_lists_kept"] = on_invalid_list
        if ext_files:
            known = {(c, f.stem) for c, fs in photo_files.items() for f in fs}

            def dup(c: str, stem: str) -> bool:
                if (c, stem) in known:
                    report.drop("extended_photo_already_in_sketchy")
                    return True
                return False

            report.info["extended_photos_written"] = _write_photo_folder(
                sink, ext_files, mapper, opts, report, ext_root, prefix="ext/", skip=dup, can_be_labelled=False)
        sink.flush()
    return _done(out, report)


# =========================================================================== TU-Berlin
def _svg_stroke3(f: Path, opts: IngestOptions, report: IngestReport, eps: float) -> tuple[np.ndarray | None, str]:
    """Parse one SVG sketch -> (stroke-3 or None, failure reason)."""
    from sbir.strokes import polylines_to_stroke3

    try:
        sk = svg_to_polylines(f, flatten_step=opts.flatten_step)
    except SvgError as exc:
        msg = str(exc).replace(f"{f}: ", "")
        return None, (EMPTY_DRAWING if "no strokes" in msg else UNPARSABLE_SVG) + "|" + msg
    x0, y0, x1, y1 = sk.bbox()
    if math.isfinite(sk.width) and math.isfinite(sk.height) and sk.width > 0 and sk.height > 0:
        tol_x, tol_y = opts.canvas_tolerance * sk.width, opts.canvas_tolerance * sk.height
        if x0 < -tol_x or y0 < -tol_y or x1 > sk.width + tol_x or y1 > sk.height + tol_y:
            report.add(f, OUTSIDE_CANVAS, f"strokes span x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f} on a "
                                          f"{sk.width:g} x {sk.height:g} canvas (kept)")
    s3 = polylines_to_stroke3(sk.polylines)
    s3 = _checked_stroke3(s3, f, report, eps)
    return s3, ""


@_adapter
def ingest_tuberlin(root: str | os.PathLike, out: str | os.PathLike,
                    options: IngestOptions | None = None) -> IngestReport:
    """TU-Berlin SVG/PNG sketches per class folder (+ optional per-class photos); see the module doc."""
    opts = options or IngestOptions()
    if opts.tuberlin_source not in ("auto", "svg", "png"):
        raise IngestError(f"tuberlin_source must be auto, svg or png, got {opts.tuberlin_source!r}")
    root = _check_root(root, "TU-Berlin")
    out = Path(out)
    report = _new_report("tuberlin", root, out, opts)
    eps = 0.5 if opts.simplify_eps is None else opts.simplify_eps

    if (root / "svg").is_dir() or (root / "png").is_dir():
        svg_files = _scan_class_dirs(root / "svg", (".svg",), report, root)
        png_files = _scan_class_dirs(root / "png", (".png",), report, root)
        report.info["layout"] = "svg/<class>, png/<class>"
    else:
        both = _scan_class_dirs(root, (".svg", ".png"), report, root, exclude=("images",))
        svg_files = {c: [f for f in fs if f.suffix.lower() == ".svg"] for c, fs in both.items()}
        png_files = {c: [f for f in fs if f.suffix.lower() == ".png"] for c, fs in both.items()}
        report.info["layout"] = "<class>/*.svg|png"
    if opts.tuberlin_source == "png":
        svg_files = {c: [] for c in svg_files}
    elif opts.tuberlin_source == "svg":
        png_files = {c: [] for c in png_files}
    sketch_classes = {c for c, fs in svg_files.items() if fs} | {c for c, fs in png_files.items() if fs}
    if not sketch_classes:
        raise IngestError(f"no TU-Berlin sketches under {root}: expected <class>/<n>.svg or <class>/<n>.png "
                          f"(or svg/<class>/, png/<class>/)")
    photo_files: dict[str, list[Path]] = {}
    photo_root = None
    if opts.photos is not None:
        photo_root = Path(opts.photos)
        if not photo_root.is_dir():
            raise IngestError(f"TU-Berlin photo folder {photo_root} does not exist (expected <class>/*.jpg)")
    elif (root / "images").is_dir():  # TU-Berlin Extended photos beside the sketches
        photo_root = root / "images"
    if photo_root is not None:
        photo_files = _scan_class_dirs(photo_root, PHOTO_EXTS, report, photo_root)
        report.info["photo_folder"] = str(photo_root)

    mapper = _ClassMapper(opts.class_map, report)
    classes = mapper.class_names(sketch_classes | set(photo_files))
    writer = _writer(out, classes, report.name, opts, "tuberlin",
                     {"split_source": "hash", "simplify_eps": eps, "flatten_step": opts.flatten_step})

    with writer:
        sink = _Sink(writer, opts, report, eps)
        n_svg = n_png = 0
        for src_class in sorted(sketch_classes):
            svgs = {f.stem: f for f in svg_files.get(src_class, [])}
            pngs = {f.stem: f for f in png_files.get(src_class, [])}
            target = mapper(src_class)
            if target is None:
                mapper.drop(src_class, len(set(svgs) | set(pngs)))
                continue
            for stem in sorted(set(svgs) | set(pngs), key=_natkey):
                sid = f"{src_class}/{stem}"
                split = _hash_split(sid, opts)
                if stem in svgs:
                    f = svgs[stem]
                    s3, why = _svg_stroke3(f, opts, report, eps)
                    if s3 is not None:
                        n_svg += sink.sketch_strokes(sid, target, split, s3, None, _rel(f, root), f)
                        continue
                    if why:
                        reason, detail = why.split("|", 1)
                        report.add(f, reason, detail + (" (using the PNG instead)" if stem in pngs else ""))
                    if stem not in pngs:
                        continue
                f = pngs[stem]
                data = _read_bytes(f, report)
                if data is None:
                    continue
                try:
                    png, h, w = _sketch_raster_bytes(data)
                except Exception as exc:
                    report.add(f, CORRUPT_IMAGE, str(exc))
                    continue
                n_png += sink.sketch_raster(sid, target, split, png, h, w, None, _rel(f, root), f)
        report.info["sketches_from_svg"] = n_svg
        report.info["sketches_from_png"] = n_png
        if photo_files:
            report.info["photos_written"] = _write_photo_folder(sink, photo_files, mapper, opts, report, photo_root)
        sink.flush()
    return _done(out, report)


# =========================================================================== Quick, Draw!
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
    files = [p for p in root.rglob("*") if p.is_file() and not _is_hidden(p)
             and (p.name.lower().endswith((".ndjson", ".ndjson.gz", ".npz")))]
    return sorted(files, key=lambda p: (_qd_class(p), p.as_posix()))


def _qd_drawing_to_stroke3(drawing: Any) -> np.ndarray:
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
    return _abs_to_stroke3(pts, pen)


def _iter_lines(path: Path, progress: bool, desc: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) with a byte-based progress bar; gz read transparently."""
    size = path.stat().st_size
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    bar = _tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) \
        if not path.name.lower().endswith(".gz") else _tqdm(unit=" lines", desc=desc, disable=not progress, leave=False)
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                bar.update(len(raw) if bar.total else 1)
                yield lineno, raw
    finally:
        bar.close()


@_adapter
def ingest_quickdraw(root: str | os.PathLike, out: str | os.PathLike,
                     options: IngestOptions | None = None) -> IngestReport:
    """Quick, Draw! ndjson (simplified or raw) and sketch-rnn .npz, one file per class; streamed."""
    opts = options or IngestOptions()
    if opts.npz_valid_split not in ("test", "val", "train", "drop"):
        raise IngestError(f"npz_valid_split must be test, val, train or drop, got {opts.npz_valid_split!r}")
    root = _check_root(root, "Quick Draw")
    out = Path(out)
    report = _new_report("quickdraw", root, out, opts)
    eps = opts.simplify_eps or 0.0
    files = _qd_files(root)
    if not files:
        raise IngestError(f"no Quick Draw files under {root}: expected <word>.ndjson (simplified or raw, "
                          f"optionally .gz) or sketch-rnn <word>.npz")
    photo_files: dict[str, list[Path]] = {}
    photo_root = None
    if opts.photos is not None:
        photo_root = Path(opts.photos)
        if not photo_root.is_dir():
            raise IngestError(f"Quick Draw photo folder {photo_root} does not exist (expected <class>/*.jpg)")
        photo_files = _scan_class_dirs(photo_root, PHOTO_EXTS, report, photo_root)
    base = root if root.is_dir() else root.parent
    mapper = _ClassMapper(opts.class_map, report)
    classes = mapper.class_names({_qd_class(f) for f in files} | set(photo_files))
    kinds = sorted({"npz" if f.name.lower().endswith(".npz") else "ndjson" for f in files})
    writer = _writer(out, classes, report.name, opts, "quickdraw",
                     {"files": kinds, "split_source": "npz splits / hash" if "npz" in kinds else "hash"})

    with writer:
        sink = _Sink(writer, opts, report, eps)
        kept: dict[str, int] = defaultdict(int)
        truncated: list[str] = []
        bar = _tqdm(files, desc="quickdraw files", unit="file", disable=not opts.progress or len(files) < 2)
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
            report.info["photos_written"] = _write_photo_folder(sink, photo_files, mapper, opts, report, photo_root)
        sink.flush()
    return _done(out, report)


def _qd_ndjson(f: Path, src_class: str, target: str, sink: _Sink, opts: IngestOptions, report: IngestReport,
               base: Path, eps: float, kept: dict[str, int], truncated: list[str]) -> None:
    rel = _rel(f, base)
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
            s3 = _qd_drawing_to_stroke3(rec["drawing"])
        except ValueError as exc:
            if str(exc) == "empty":
                report.add(f, EMPTY_DRAWING, "drawing has no points", line=lineno)
            else:
                report.add(f, INVALID_DRAWING, str(exc), line=lineno)
            continue
        s3 = _checked_stroke3(s3, f, report, eps, line=lineno)
        if s3 is None:
            continue
        key = rec.get("key_id")
        sid = f"{src_class}/{key}" if key is not None else f"{src_class}/line{lineno}"
        split = _hash_split(sid, opts)
        if sink.sketch_strokes(sid, target, split, s3, None, f"{rel}:{lineno}", f"{f}:{lineno}"):
            kept[src_class] += 1
    if blank:
        report.info.setdefault("blank_lines", {})[f.name] = blank


def _qd_npz(f: Path, src_class: str, target: str, sink: _Sink, opts: IngestOptions, report: IngestReport,
            base: Path, eps: float, truncated: list[str]) -> None:
    rel = _rel(f, base)
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
        items = _tqdm(range(len(arr)), desc=f"{src_class}:{key}", disable=not opts.progress, leave=False)
        for i in items:
            if opts.max_per_class is not None and n_kept >= opts.max_per_class:
                truncated.append(f"{src_class} ({f.name}:{key}, {len(arr) - i} not read)")
                break
            where = f"{f}:{key}[{i}]"
            s3 = _checked_stroke3(np.asarray(arr[i]), where, report, eps)
            if s3 is None:
                continue
            sid = f"{src_class}/{key}/{i:06d}"
            n_kept += sink.sketch_strokes(sid, target, split, s3, None, f"{rel}:{key}[{i}]", where)


# =========================================================================== QMUL
class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the QMUL coordinate file: only numpy arrays and plain containers, no code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"),
        ("_codecs", "encode"),  # protocol-2 pickles store bytes this way
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _qmul_class_guess(text: str) -> str:
    t = text.lower()
    for key, name in (("handbag", "handbag"), ("chair", "chair"), ("shoe", "shoe")):
        if key in t:
            return name
    return "shoe"


def _qmul_detect(root: Path, opts: IngestOptions) -> tuple[str, Any, list[str]]:
    layouts: dict[str, Any] = {}
    if root.is_file():
        layouts["coordinates"] = [root]
    else:
        coords = sorted(p for p in root.iterdir() if p.is_file() and not _is_hidden(p) and (
            "coordinate" in p.name.lower() or p.suffix.lower() in (".pkl", ".pickle", ".p")))
        if coords:
            layouts["coordinates"] = coords
        if all((root / d).is_dir() for d in ("trainA", "trainB")) or all((root / d).is_dir() for d in ("testA", "testB")):
            layouts["ab"] = True
        mats = sorted(root.glob("*_sketch_db_*.mat"))
        if mats:
            layouts["v1"] = mats
        pair_dirs = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("photo_gt.*"))
                           and (any(d.glob("sketch_gt.*"))))
        if pair_dirs:
            layouts["pairs"] = pair_dirs
    want = opts.qmul_layout
    if want != "auto":
        if want not in ("coordinates", "ab", "v1", "pairs"):
            raise IngestError(f"qmul_layout must be auto, coordinates, ab, v1 or pairs, got {want!r}")
        if want not in layouts:
            raise IngestError(f"QMUL layout {want!r} not found under {root}")
        return want, layouts[want], sorted(layouts)
    for k in ("coordinates", "ab", "v1", "pairs"):
        if k in layouts:
            return k, layouts[k], sorted(layouts)
    raise IngestError(
        f"no QMUL layout under {root}: expected a pickled coordinate file (*_Coordinate, *.pkl) + photo/<photo>.png, "
        f"trainA/ trainB/ testA/ testB/ folders, <x>_sketch_db_{{train,test}}.mat + <x>_edge_db_*.mat (QMUL-V1), "
        f"or <photo>/{{photo_gt.png, sketch_gt.svg|png}} pair folders")


@_adapter
def ingest_qmul(root: str | os.PathLike, out: str | os.PathLike,
                options: IngestOptions | None = None) -> IngestReport:
    """QMUL-Shoe/Chair (V2 coordinates, trainA/B, V1 .mat, pair folders); see the module doc."""
    opts = options or IngestOptions()
    root = _check_root(root, "QMUL")
    out = Path(out)
    kind, what, found = _qmul_detect(root, opts)
    report = _new_report("qmul", root, out, opts)
    report.info["layout"] = kind
    if len(found) > 1:
        report.info["other_layouts_found"] = [k for k in found if k != kind]  # choose with qmul_layout
    fn = {"coordinates": _qmul_coordinates, "ab": _qmul_ab, "v1": _qmul_v1, "pairs": _qmul_pairs}[kind]
    return fn(root, out, what, opts, report)


def _single_class(opts: IngestOptions, guess_from: str, report: IngestReport) -> tuple[list[str], str | None]:
    src = opts.class_name or _qmul_class_guess(guess_from)
    mapper = _ClassMapper(opts.class_map, report)
    classes = mapper.class_names([src])
    return classes, mapper(src)


def _load_photo_for_write(f: Path, report: IngestReport) -> tuple[bytes, int, int] | None:
    data = _read_bytes(f, report)
    if data is None:
        return None
    try:
        return _photo_bytes(data)
    except Exception as exc:
        report.add(f, CORRUPT_IMAGE, str(exc))
        return None


def _find_photo(folder: Path, stem: str) -> Path | None:
    for ext in (".png", ".jpg", ".jpeg", ".PNG", ".JPG"):
        p = folder / (stem + ext)
        if p.is_file():
            return p
    return None


def _qmul_coordinates(root: Path, out: Path, coord_files: list[Path], opts: IngestOptions,
                      report: IngestReport) -> IngestReport:
    base = root if root.is_dir() else root.parent
    photo_dir = base / "photo"
    if not photo_dir.is_dir():
        raise IngestError(f"QMUL coordinate layout: photo folder {photo_dir} does not exist (expected photo/<photo>.png)")
    classes, target = _single_class(opts, coord_files[0].name + " " + base.name, report)
    # load and convert every sketch first (the dict is in memory anyway)
    sketches: list[tuple[str, str, str, np.ndarray, str]] = []  # (split, sid, photo, s3, file label)
    for cf in coord_files:
        try:
            with open(cf, "rb") as fh:
                data = _SafeUnpickler(fh, encoding="latin1").load()
        except Exception as exc:
            report.add(cf, UNREADABLE_FILE, f"cannot unpickle ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(data, dict):
            report.add(cf, UNREADABLE_FILE, f"expected a dict of '/train|test/<photo>_<k>' -> (N,3), "
                                            f"got {type(data).__name__}")
            continue
        for key in sorted(data, key=lambda k: _natkey(str(k))):
            skey = key.decode() if isinstance(key, bytes) else str(key)
            parts = [p for p in skey.split("/") if p]
            label = f"{cf}:{skey}"
            if len(parts) < 2 or parts[0] not in ("train", "test"):
                report.add(cf, BAD_KEY, f"key {skey!r} is not '/train/<photo>_<k>' or '/test/<photo>_<k>'")
                continue
            split, name = parts[0], parts[-1]
            m = re.match(r"^(?P<photo>.+)_(?P<k>\d+)$", name)
            photo = m.group("photo") if m else name
            arr = np.asarray(data[key])
            if arr.size == 0:
                report.add(cf, EMPTY_DRAWING, f"{skey}: no points")
                continue
            if arr.ndim != 2 or arr.shape[1] < 3 or not np.issubdtype(arr.dtype, np.number):
                report.add(cf, INVALID_DRAWING, f"{skey}: expected (N,3) numbers, got {arr.shape} {arr.dtype}")
                continue
            arr = arr.astype(np.float64)
            if not np.isfinite(arr[:, :3]).all():
                report.add(cf, INVALID_DRAWING, f"{skey}: non-finite coordinates")
                continue
            s3 = _abs_to_stroke3(arr[:, :2], arr[:, 2])
            s3 = _checked_stroke3(s3, label, report, opts.simplify_eps or 0.0)
            if s3 is not None:
                sketches.append((split, name, photo, s3, label))
    photo_files = sorted((p for p in photo_dir.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTS),
                         key=lambda p: _natkey(p.name))
    return _write_paired(out, classes, target, [(p.stem, p) for p in photo_files], sketches, opts, report, base,
                         "coordinates", {})


def _write_paired(out: Path, classes: list[str], target: str | None, photo_files: list[tuple[str, Path]],
                  sketches: list[tuple[str, str, str, Any, str]], opts: IngestOptions, report: IngestReport,
                  base: Path, layout: str, extra: dict[str, Any],
                  photo_split_default: Callable[[str], str] | None = None) -> IngestReport:
    """Shared writer for paired single-class QMUL layouts.

    ``photo_files``: (photo id, file); ``sketches``: (split, sketch id, photo id, stroke-3 array or
    (png, h, w) raster, file label);
    photo splits come from their sketches (a photo without sketches: ``photo_split_default`` or hash).
    """
    writer = _writer(out, classes, report.name, opts, "qmul", {"layout": layout, **extra})

    with writer:
        sink = _Sink(writer, opts, report, 0.0)
        if target is None:
            report.drop("unmapped_class", len(sketches) + len(photo_files))
            photo_files, sketches = [], []
        by_stem = dict(photo_files)
        photo_split: dict[str, str] = {}
        for split, sid, photo, _, label in sketches:
            if photo in photo_split and photo_split[photo] != split:
                report.add(label, SPLIT_CONFLICT, f"photo {photo} has sketches in train and test (test kept)")
                photo_split[photo] = "test"
            else:
                photo_split.setdefault(photo, split)
        lab = sink.pick_labelled(stem for stem, _ in photo_files if photo_split.get(stem) == "train")
        written: set[str] = set()
        for stem, f in photo_files:
            loaded = _load_photo_for_write(f, report)
            if loaded is None:
                continue
            img, h, w = loaded
            if stem in photo_split:
                split = photo_split[stem]
            else:
                split = photo_split_default(stem) if photo_split_default else _hash_split(stem, opts)
            labelled = split == "train" and stem in lab
            if sink.photo(stem, target, split, labelled, img, h, w, _rel(f, base), f):
                written.add(stem)
        for split, sid, photo, payload, label in sketches:
            photo_id = photo if photo in written else None
            if photo_id is None:
                why = "photo file is missing" if photo not in by_stem else "photo could not be read"
                report.add(label, SKETCH_WITHOUT_PHOTO, f"{why}: {photo}")
            src = label[len(str(base)) + 1:] if label.startswith(str(base) + os.sep) else label
            if isinstance(payload, np.ndarray):
                sink.sketch_strokes(sid, target, split, payload, photo_id, src, label)
            else:
                png, h, w = payload
                sink.sketch_raster(sid, target, split, png, h, w, photo_id, src, label)
        sink.flush()
    return _done(out, report)


def _read_sketch_file(f: Path, opts: IngestOptions, report: IngestReport) -> Any:
    """A sketch file of any kind -> stroke-3 (SVG) or (png, h, w) raster, or None (reported)."""
    if f.suffix.lower() == ".svg":
        eps = 0.5 if opts.simplify_eps is None else opts.simplify_eps
        s3, why = _svg_stroke3(f, opts, report, eps)
        if s3 is None and why:
            reason, detail = why.split("|", 1)
            report.add(f, reason, detail)
        return s3
    data = _read_bytes(f, report)
    if data is None:
        return None
    try:
        return _sketch_raster_bytes(data)
    except Exception as exc:
        report.add(f, CORRUPT_IMAGE, str(exc))
        return None


def _qmul_ab(root: Path, out: Path, _: Any, opts: IngestOptions, report: IngestReport) -> IngestReport:
    side = opts.qmul_sketch_side.upper()
    if side not in ("A", "B"):
        raise IngestError(f"qmul_sketch_side must be A or B, got {opts.qmul_sketch_side!r}")
    other = "B" if side == "A" else "A"
    classes, target = _single_class(opts, root.name, report)
    photo_files: list[Path] = []
    sketches: list[tuple[str, str, str, Any, str]] = []
    for split in ("train", "test"):
        sdir, pdir = root / f"{split}{side}", root / f"{split}{other}"
        if not sdir.is_dir() and not pdir.is_dir():
            continue
        photos = sorted((p for p in pdir.iterdir() if p.is_file() and not _is_hidden(p)), key=lambda p: _natkey(p.name)) \
            if pdir.is_dir() else []
        for p in photos:
            if p.suffix.lower() not in PHOTO_EXTS:
                report.add(p, UNEXPECTED_FILE, f"expected photos in {pdir.name}/")
        photos = [p for p in photos if p.suffix.lower() in PHOTO_EXTS]
        stems = {p.stem for p in photos}
        photo_files.extend(photos)
        files = sorted((p for p in sdir.iterdir() if p.is_file() and not _is_hidden(p)), key=lambda p: _natkey(p.name)) \
            if sdir.is_dir() else []
        for f in files:
            if f.suffix.lower() not in RASTER_SKETCH_EXTS + (".svg",):
                report.add(f, UNEXPECTED_FILE, f"expected sketches (png/svg) in {sdir.name}/")
                continue
            m = re.match(r"^(?P<photo>.+)_(?P<k>\d+)$", f.stem)
            photo = f.stem if f.stem in stems or not m else m.group("photo")
            payload = _read_sketch_file(f, opts, report)
            if payload is not None:
                sketches.append((split, f.stem, photo, payload, str(f)))
    # a photo is paired only with the sketches of its own split folder
    photo_split = {}
    for p in photo_files:
        photo_split[p.stem] = "test" if p.parent.name.startswith("test") else "train"
    return _write_paired(out, classes, target, [(p.stem, p) for p in photo_files], sketches, opts, report, root,
                         "trainA/trainB",
                         {"sketch_side": side}, photo_split_default=lambda stem: photo_split.get(stem, "train"))


def _load_mat(path: Path, report: IngestReport) -> np.ndarray | None:
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
        if "data" not in m:
            report.add(path, UNREADABLE_FILE, f"no 'data' array (keys: {sorted(k for k in m if not k.startswith('__'))})")
            return None
        arr = np.asarray(m["data"])
    except NotImplementedError:  # MATLAB v7.3 = HDF5
        try:
            import h5py
        except ImportError:
            report.add(path, UNREADABLE_FILE, "MATLAB v7.3 (HDF5) file: install h5py to read it")
            return None
        try:
            with h5py.File(path, "r") as h:
                arr = np.asarray(h["data"][()]).T  # HDF5 stores MATLAB arrays transposed
        except Exception as exc:
            report.add(path, UNREADABLE_FILE, f"cannot read v7.3 file ({exc})")
            return None
    except Exception as exc:
        report.add(path, UNREADABLE_FILE, f"not a readable .mat file ({exc})")
        return None
    if arr.ndim == 4 and arr.shape[-1] not in (1, 3) and arr.shape[2] in (1, 3):  # (H, W, C, N)
        arr = np.moveaxis(arr, -1, 0)
    if arr.ndim == 3 and arr.shape[0] == arr.shape[1] and arr.shape[2] != arr.shape[1]:  # (H, W, N)
        arr = np.moveaxis(arr, -1, 0)
    if arr.ndim not in (3, 4) or arr.dtype != np.uint8:
        report.add(path, UNREADABLE_FILE, f"expected uint8 (N,H,W[,3]) images, got {arr.shape} {arr.dtype}")
        return None
    return arr


def _qmul_v1(root: Path, out: Path, sketch_mats: list[Path], opts: IngestOptions,
             report: IngestReport) -> IngestReport:
    prefixes = sorted({m.name.split("_sketch_db_")[0] for m in sketch_mats})
    if opts.class_name and len(prefixes) > 1:
        raise IngestError(f"class_name given but {root} holds several QMUL-V1 sets: {prefixes}")
    if opts.qmul_v1_photos not in ("auto", "image", "edge"):
        raise IngestError(f"qmul_v1_photos must be auto, image or edge, got {opts.qmul_v1_photos!r}")
    mapper = _ClassMapper(opts.class_map, report)
    src_names = {p: (opts.class_name or _qmul_class_guess(p)) for p in prefixes}
    classes = mapper.class_names(src_names.values())
    photo_kinds: dict[str, str] = {}
    jobs = []
    for prefix in prefixes:
        ann_path = root / f"{prefix}_annotation.json"
        ann = None
        if ann_path.is_file():
            try:
                ann = json.loads(ann_path.read_text())
            except Exception as exc:
                report.add(ann_path, UNREADABLE_FILE, f"annotation JSON unreadable ({exc}); using row numbers")
        for split in ("train", "test"):
            sk = root / f"{prefix}_sketch_db_{split}.mat"
            if not sk.is_file():
                continue
            img, edge = root / f"{prefix}_image_db_{split}.mat", root / f"{prefix}_edge_db_{split}.mat"
            if opts.qmul_v1_photos == "image" or (opts.qmul_v1_photos == "auto" and img.is_file()):
                ph, pkind = img, "photo"
            else:
                ph, pkind = edge, "edge_map"
            photo_kinds[f"{prefix}/{split}"] = pkind
            jobs.append((prefix, split, sk, ph, ann))

    extra = {"layout": "qmul_v1_mat", "photo_kind": photo_kinds}
    if any(v == "edge_map" for v in photo_kinds.values()):
        extra["photo_note"] = ("QMUL-V1 photos are not available: the photo table holds the edge map extracted "
                               "from each product photo (<x>_edge_db_*.mat), which stands in for the photo")
    writer = _writer(out, classes, report.name, opts, "qmul", extra)

    with writer:
        sink = _Sink(writer, opts, report, 0.0)
        for prefix, split, sk_path, ph_path, ann in jobs:
            target = mapper(src_names[prefix])
            sk = _load_mat(sk_path, report)
            if not ph_path.is_file():
                report.add(ph_path, UNREADABLE_FILE, "photo/edge database missing; sketches written unpaired")
                ph = None
            else:
                ph = _load_mat(ph_path, report)
            if sk is None:
                continue
            if target is None:
                mapper.drop(src_names[prefix], len(sk) + (0 if ph is None else len(ph)))
                continue
            n_sk, n_ph = len(sk), (0 if ph is None else len(ph))
            if ph is not None and n_sk != n_ph:
                report.add(sk_path, ROW_COUNT_MISMATCH, f"{n_sk} sketches vs {n_ph} rows in {ph_path.name}; "
                                                        f"rows paired up to {min(n_sk, n_ph)}")
            names_img = names_sk = None
            if ann is not None and isinstance(ann.get(split), dict):
                a = ann[split]
                if len(a.get("images", [])) == n_ph and len(a.get("sketches", [])) == n_sk:
                    names_img = [Path(x).stem for x in a["images"]]
                    names_sk = [Path(x).stem for x in a["sketches"]]
            photo_ids = []
            pids = [f"{prefix}/{names_img[i] if names_img else f'{split}_{i + 1:04d}'}" for i in range(n_ph)]
            lab = sink.pick_labelled(pids[:n_sk]) if split == "train" else set()
            bar = _tqdm(total=n_ph + n_sk, desc=f"{prefix} {split}", unit="row", leave=False,
                        disable=not opts.progress)
            for i in range(n_ph):
                pid = pids[i]
                png = encode_png(np.ascontiguousarray(ph[i]))
                labelled = pid in lab
                bar.update()
                ok = sink.photo(pid, target, split, labelled, png, ph[i].shape[0], ph[i].shape[1],
                                f"{ph_path.name}:data[{i}]", f"{ph_path}:data[{i}]")
                photo_ids.append(pid if ok else None)
            for i in range(n_sk):
                sid = f"{prefix}/{names_sk[i] if names_sk else f'{split}_{i + 1:04d}'}"
                photo_id = photo_ids[i] if i < len(photo_ids) else None
                if photo_id is None:
                    report.add(f"{sk_path}:data[{i}]", SKETCH_WITHOUT_PHOTO, f"no row {i} in the photo database")
                img = sk[i]
                grey = img if img.ndim == 2 else np.asarray(Image.fromarray(img).convert("L"))
                sink.sketch_raster(sid, target, split, encode_png(np.ascontiguousarray(grey)), grey.shape[0],
                                   grey.shape[1], photo_id, f"{sk_path.name}:data[{i}]", f"{sk_path}:data[{i}]")
                bar.update()
            bar.close()
        sink.flush()
    return _done(out, report)


def _qmul_pairs(root: Path, out: Path, pair_dirs: list[Path], opts: IngestOptions,
                report: IngestReport) -> IngestReport:
    classes, target = _single_class(opts, root.name, report)
    photo_files: list[Path] = []
    sketches: list[tuple[str, str, str, Any, str]] = []
    for d in sorted(pair_dirs, key=lambda p: _natkey(p.name)):
        photo = sorted(d.glob("photo_gt.*"))
        if photo:
            # the photo keeps its folder's name as id: copy the path under that stem
            photo_files.append(photo[0])
        svg, raster = d / "sketch_gt.svg", sorted(p for p in d.glob("sketch_gt.*") if p.suffix.lower() != ".svg")
        payload = None
        src = svg
        if svg.is_file():
            payload = _read_sketch_file(svg, opts, report)
            src = svg
        if payload is None and raster:
            payload = _read_sketch_file(raster[0], opts, report)
            src = raster[0]
        if payload is not None:
            sketches.append(("", d.name, d.name, payload, str(src)))
    # ids are the folder names; split by hash of the folder name
    split_of = {d.name: _hash_split(d.name, opts) for d in pair_dirs}
    sketches = [(split_of[s[2]],) + s[1:] for s in sketches]
    return _write_paired(out, classes, target, [(p.parent.name, p) for p in photo_files], sketches, opts, report,
                         root, "pair folders", {"split_source": "hash"},
                         photo_split_default=lambda stem: split_of.get(stem, "train"))


# =========================================================================== dispatch
FORMATS: dict[str, Callable[..., IngestReport]] = {
    "sketchy": ingest_sketchy,
    "tuberlin": ingest_tuberlin,
    "quickdraw": ingest_quickdraw,
    "qmul": ingest_qmul,
}


def ingest(fmt: str, root: str | os.PathLike, out: str | os.PathLike,
           options: IngestOptions | None = None, report_path: str | os.PathLike | None = None) -> IngestReport:
    """Run one adapter and write its report (``report_path`` or :func:`default_report_path`).

    The report is written even when the ingest fails in strict mode (then the exception is re-raised).
    """
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    opts = options or IngestOptions()
    rpath = Path(report_path) if report_path is not None else default_report_path(out, opts.name)
    try:
        report = FORMATS[fmt](root, out, opts)
    except StrictIngestError as exc:
        exc.report.write(rpath)
        raise
    report.info["report_path"] = str(rpath)
    report.write(rpath)
    return report
