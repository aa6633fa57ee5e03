"""What every ingest adapter shares: errors, issue reasons, options, the report, and small helpers
(deterministic splits, file listing and reading, image bytes, stroke conversion)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from sbir.data.format import encode_png
from sbir.data.images import to_grey

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RASTER_SKETCH_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# issue reasons (bad input)
CORRUPT_IMAGE = "corrupt_image"
UNREADABLE_FILE = "unreadable_file"
UNPARSABLE_SVG = "unparsable_svg"
INVALID_JSON = "invalid_ndjson_line"
INVALID_DRAWING = "invalid_drawing"
EMPTY_DRAWING = "empty_drawing"
DEGENERATE_DRAWING = "degenerate_drawing"  # fewer than 2 points, or no extent
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
    """Options of every adapter (each reads the ones that concern it; see ``sbir ingest --help``)."""

    name: str | None = None              # dataset name in the manifest (default: output folder name)
    image_size: int = 256                # side of every sketch image (rendered from strokes, or raster resized)
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


def new_report(fmt: str, root: Path, out: Path, opts: IngestOptions) -> IngestReport:
    return IngestReport(format=fmt, root=str(root), out=str(out), name=opts.name or out.name, strict=opts.strict)


# =========================================================================== splits
def _unit(key: str, salt: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from a key."""
    h = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def hash_split(key: str, opts: IngestOptions) -> str:
    """"test" for a ``test_share`` of the keys (salted hash of the key), else "train"."""
    return "test" if _unit(key, opts.split_seed + ":split") < opts.test_share else "train"


def pick_labelled(keys: Iterable[str], opts: IngestOptions) -> set[str]:
    """Exactly ``round(labelled_share * n)`` of the ``n`` eligible keys: those with the smallest
    salted hash (deterministic, independent of order; a larger share keeps the smaller one's picks)."""
    keys = sorted(set(keys))
    n = int(math.floor(opts.labelled_share * len(keys) + 0.5))
    salt = (opts.labelled_seed if opts.labelled_seed is not None else opts.split_seed) + ":labelled"
    return set(sorted(keys, key=lambda k: _unit(k, salt))[:n])


# =========================================================================== files
def natural_key(s: str) -> tuple:
    """Sort key that orders the digit runs of a name by value ("2" before "10")."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t != "")


def check_root(root: str | os.PathLike, what: str) -> Path:
    p = Path(root)
    if not p.exists():
        raise IngestError(f"{what} root {p} does not exist")
    return p


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or the whole path when it is not below it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name in ("Thumbs.db", "desktop.ini")


def visible_files(folder: Path) -> list[Path]:
    """The files of a folder that are not hidden, in natural order ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and not is_hidden(p)), key=lambda p: natural_key(p.name))


def read_bytes(path: Path, report: IngestReport) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        report.add(path, UNREADABLE_FILE, str(exc))
        return None


def progress_bar(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, **kw)


# =========================================================================== images
def probe_photo(data: bytes) -> tuple[int, int, str]:
    """Fully decode image bytes (raises on corrupt data); returns (height, width, PIL format)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.height, img.width, img.format or ""


def photo_bytes(data: bytes) -> tuple[bytes, int, int]:
    """Validate photo bytes; keep JPEG/PNG as they are, re-encode anything else as RGB PNG."""
    h, w, fmt = probe_photo(data)
    if fmt in ("JPEG", "PNG"):
        return data, h, w
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return encode_png(arr), h, w


def sketch_raster_bytes(data: bytes) -> tuple[bytes, int, int]:
    """Image bytes -> greyscale PNG bytes (transparency onto white), height, width."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        grey = to_grey(img)
    return encode_png(np.ascontiguousarray(grey)), grey.shape[0], grey.shape[1]


def square_png(data: bytes, n: int, mode: str) -> bytes:
    """Image bytes resized to ``n`` x ``n`` (Lanczos) in PIL ``mode`` ("RGB" photos, "L" sketches), as PNG."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert(mode).resize((n, n), Image.Resampling.LANCZOS))
    return encode_png(np.ascontiguousarray(arr))


def _load_image(f: Path, report: IngestReport, convert) -> tuple[bytes, int, int] | None:
    data = read_bytes(f, report)
    if data is None:
        return None
    try:
        return convert(data)
    except Exception as exc:  # PIL raises several types for corrupt files
        report.add(f, CORRUPT_IMAGE, str(exc))
        return None


def load_photo(f: Path, report: IngestReport) -> tuple[bytes, int, int] | None:
    """A photo file -> (bytes, height, width), or None (unreadable or corrupt: reported)."""
    return _load_image(f, report, photo_bytes)


def load_sketch_raster(f: Path, report: IngestReport) -> tuple[bytes, int, int] | None:
    """A raster sketch file -> (greyscale PNG, height, width), or None (unreadable or corrupt: reported)."""
    return _load_image(f, report, sketch_raster_bytes)


# =========================================================================== strokes
def absolute_to_stroke3(points: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """Absolute (N,2) points + pen-lift flags (N,) -> stroke-3 (first row = offset from origin)."""
    out = np.zeros((points.shape[0], 3), dtype=np.float32)
    pts = points.astype(np.float64)
    out[0, :2] = pts[0]
    out[1:, :2] = np.diff(pts, axis=0)
    out[:, 2] = (pen > 0.5).astype(np.float32)
    out[-1, 2] = 1.0
    return out


def checked_stroke3(s3: np.ndarray, file: str | os.PathLike, report: IngestReport, simplify_eps: float,
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
