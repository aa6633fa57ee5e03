"""QMUL-Shoe/Chair (V2 pickled coordinates + photos, trainA/trainB/testA/testB, QMUL-V1 ``.mat``
databases, ``<photo>/{photo_gt, sketch_gt}`` pair folders) -> the project's Parquet format; see
:mod:`sbir.data.ingest`."""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from sbir.data.format import encode_png
from sbir.data.ingest.common import (
    BAD_KEY,
    EMPTY_DRAWING,
    INVALID_DRAWING,
    PHOTO_EXTS,
    RASTER_SKETCH_EXTS,
    ROW_COUNT_MISMATCH,
    SKETCH_WITHOUT_PHOTO,
    SPLIT_CONFLICT,
    UNEXPECTED_FILE,
    UNREADABLE_FILE,
    IngestError,
    IngestOptions,
    IngestReport,
    absolute_to_stroke3,
    check_root,
    checked_stroke3,
    hash_split,
    is_hidden,
    load_photo,
    natural_key,
    new_report,
    progress_bar,
    relative_name,
    visible_files,
)
from sbir.data.ingest.sketch_files import read_sketch_file
from sbir.data.ingest.writing import ClassMapper, Sink, adapter, finish_report, new_writer


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
        coords = sorted(p for p in root.iterdir() if p.is_file() and not is_hidden(p) and (
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


@adapter
def ingest_qmul(root: str | os.PathLike, out: str | os.PathLike,
                options: IngestOptions | None = None) -> IngestReport:
    """QMUL-Shoe/Chair (V2 coordinates, trainA/B, V1 .mat, pair folders); see the module doc."""
    opts = options or IngestOptions()
    root = check_root(root, "QMUL")
    out = Path(out)
    kind, what, found = _qmul_detect(root, opts)
    report = new_report("qmul", root, out, opts)
    report.info["layout"] = kind
    if len(found) > 1:
        report.info["other_layouts_found"] = [k for k in found if k != kind]  # choose with qmul_layout
    fn = {"coordinates": _qmul_coordinates, "ab": _qmul_ab, "v1": _qmul_v1, "pairs": _qmul_pairs}[kind]
    return fn(root, out, what, opts, report)


def _single_class(opts: IngestOptions, guess_from: str, report: IngestReport) -> tuple[list[str], str | None]:
    src = opts.class_name or _qmul_class_guess(guess_from)
    mapper = ClassMapper(opts.class_map, report)
    classes = mapper.class_names([src])
    return classes, mapper(src)


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
        for key in sorted(data, key=lambda k: natural_key(str(k))):
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
            s3 = absolute_to_stroke3(arr[:, :2], arr[:, 2])
            s3 = checked_stroke3(s3, label, report, opts.simplify_eps or 0.0)
            if s3 is not None:
                sketches.append((split, name, photo, s3, label))
    photo_files = sorted((p for p in photo_dir.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTS),
                         key=lambda p: natural_key(p.name))
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
    writer = new_writer(out, classes, report.name, opts, "qmul", {"layout": layout, **extra})

    with writer:
        sink = Sink(writer, opts, report, 0.0)
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
            loaded = load_photo(f, report)
            if loaded is None:
                continue
            img, h, w = loaded
            if stem in photo_split:
                split = photo_split[stem]
            else:
                split = photo_split_default(stem) if photo_split_default else hash_split(stem, opts)
            labelled = split == "train" and stem in lab
            if sink.photo(stem, target, split, labelled, img, h, w, relative_name(f, base), f):
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
    return finish_report(out, report)


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
        photos = visible_files(pdir)
        for p in photos:
            if p.suffix.lower() not in PHOTO_EXTS:
                report.add(p, UNEXPECTED_FILE, f"expected photos in {pdir.name}/")
        photos = [p for p in photos if p.suffix.lower() in PHOTO_EXTS]
        stems = {p.stem for p in photos}
        photo_files.extend(photos)
        for f in visible_files(sdir):
            if f.suffix.lower() not in RASTER_SKETCH_EXTS + (".svg",):
                report.add(f, UNEXPECTED_FILE, f"expected sketches (png/svg) in {sdir.name}/")
                continue
            m = re.match(r"^(?P<photo>.+)_(?P<k>\d+)$", f.stem)
            photo = f.stem if f.stem in stems or not m else m.group("photo")
            payload = read_sketch_file(f, opts, report)
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


@dataclass
class _V1Job:
    """One split of one QMUL-V1 set: its sketch database and the photo (or edge map) database paired with it."""

    prefix: str
    split: str
    sketch_db: Path
    photo_db: Path
    annotation: Any  # the set's <x>_annotation.json (row names), or None


def _v1_annotation(root: Path, prefix: str, report: IngestReport) -> Any:
    ann_path = root / f"{prefix}_annotation.json"
    if not ann_path.is_file():
        return None
    try:
        return json.loads(ann_path.read_text())
    except Exception as exc:
        report.add(ann_path, UNREADABLE_FILE, f"annotation JSON unreadable ({exc}); using row numbers")
        return None


def _v1_jobs(root: Path, prefixes: list[str], opts: IngestOptions,
             report: IngestReport) -> tuple[list[_V1Job], dict[str, str]]:
    """The (set, split) databases to read, and the photo kind of each ("photo" or "edge_map")."""
    photo_kinds: dict[str, str] = {}
    jobs = []
    for prefix in prefixes:
        ann = _v1_annotation(root, prefix, report)
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
            jobs.append(_V1Job(prefix, split, sk, ph, ann))
    return jobs, photo_kinds


def _v1_tables(job: _V1Job, report: IngestReport) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(sketch rows, photo rows) of a job; a missing or unreadable database is reported and None."""
    sk = _load_mat(job.sketch_db, report)
    if not job.photo_db.is_file():
        report.add(job.photo_db, UNREADABLE_FILE, "photo/edge database missing; sketches written unpaired")
        return sk, None
    return sk, _load_mat(job.photo_db, report)


def _v1_row_ids(job: _V1Job, n_ph: int, n_sk: int) -> tuple[list[str], list[str]]:
    """Photo and sketch ids: ``<prefix>/<name>`` from the annotation when its counts match the
    databases, else ``<prefix>/<split>_<row>`` (1-based)."""
    names_img = names_sk = None
    ann = job.annotation
    if ann is not None and isinstance(ann.get(job.split), dict):
        a = ann[job.split]
        if len(a.get("images", [])) == n_ph and len(a.get("sketches", [])) == n_sk:
            names_img = [Path(x).stem for x in a["images"]]
            names_sk = [Path(x).stem for x in a["sketches"]]

    def ids(names: list[str] | None, n: int) -> list[str]:
        return [f"{job.prefix}/{names[i] if names else f'{job.split}_{i + 1:04d}'}" for i in range(n)]

    return ids(names_img, n_ph), ids(names_sk, n_sk)


def _write_v1_job(sink: Sink, job: _V1Job, target: str, sk: np.ndarray, ph: np.ndarray | None,
                  opts: IngestOptions, report: IngestReport) -> None:
    """Row i of the sketch database pairs with row i of the photo database."""
    n_sk, n_ph = len(sk), (0 if ph is None else len(ph))
    if ph is not None and n_sk != n_ph:
        report.add(job.sketch_db, ROW_COUNT_MISMATCH, f"{n_sk} sketches vs {n_ph} rows in {job.photo_db.name}; "
                                                      f"rows paired up to {min(n_sk, n_ph)}")
    pids, sids = _v1_row_ids(job, n_ph, n_sk)
    lab = sink.pick_labelled(pids[:n_sk]) if job.split == "train" else set()
    bar = progress_bar(total=n_ph + n_sk, desc=f"{job.prefix} {job.split}", unit="row", leave=False,
                       disable=not opts.progress)
    photo_ids = []
    for i, pid in enumerate(pids):
        png = encode_png(np.ascontiguousarray(ph[i]))
        bar.update()
        ok = sink.photo(pid, target, job.split, pid in lab, png, ph[i].shape[0], ph[i].shape[1],
                        f"{job.photo_db.name}:data[{i}]", f"{job.photo_db}:data[{i}]")
        photo_ids.append(pid if ok else None)
    for i, sid in enumerate(sids):
        photo_id = photo_ids[i] if i < len(photo_ids) else None
        if photo_id is None:
            report.add(f"{job.sketch_db}:data[{i}]", SKETCH_WITHOUT_PHOTO, f"no row {i} in the photo database")
        img = sk[i]
        grey = img if img.ndim == 2 else np.asarray(Image.fromarray(img).convert("L"))
        sink.sketch_raster(sid, target, job.split, encode_png(np.ascontiguousarray(grey)), grey.shape[0],
                           grey.shape[1], photo_id, f"{job.sketch_db.name}:data[{i}]", f"{job.sketch_db}:data[{i}]")
        bar.update()
    bar.close()


def _qmul_v1(root: Path, out: Path, sketch_mats: list[Path], opts: IngestOptions,
             report: IngestReport) -> IngestReport:
    prefixes = sorted({m.name.split("_sketch_db_")[0] for m in sketch_mats})
    if opts.class_name and len(prefixes) > 1:
        raise IngestError(f"class_name given but {root} holds several QMUL-V1 sets: {prefixes}")
    if opts.qmul_v1_photos not in ("auto", "image", "edge"):
        raise IngestError(f"qmul_v1_photos must be auto, image or edge, got {opts.qmul_v1_photos!r}")
    mapper = ClassMapper(opts.class_map, report)
    src_names = {p: (opts.class_name or _qmul_class_guess(p)) for p in prefixes}
    classes = mapper.class_names(src_names.values())
    jobs, photo_kinds = _v1_jobs(root, prefixes, opts, report)

    extra = {"layout": "qmul_v1_mat", "photo_kind": photo_kinds}
    if any(v == "edge_map" for v in photo_kinds.values()):
        extra["photo_note"] = ("QMUL-V1 photos are not available: the photo table holds the edge map extracted "
                               "from each product photo (<x>_edge_db_*.mat), which stands in for the photo")
    with new_writer(out, classes, report.name, opts, "qmul", extra) as writer:
        sink = Sink(writer, opts, report, 0.0)
        for job in jobs:
            target = mapper(src_names[job.prefix])
            sk, ph = _v1_tables(job, report)
            if sk is None:
                continue
            if target is None:
                mapper.drop(src_names[job.prefix], len(sk) + (0 if ph is None else len(ph)))
                continue
            _write_v1_job(sink, job, target, sk, ph, opts, report)
        sink.flush()
    return finish_report(out, report)


def _qmul_pairs(root: Path, out: Path, pair_dirs: list[Path], opts: IngestOptions,
                report: IngestReport) -> IngestReport:
    classes, target = _single_class(opts, root.name, report)
    photo_files: list[Path] = []
    sketches: list[tuple[str, str, str, Any, str]] = []
    for d in sorted(pair_dirs, key=lambda p: natural_key(p.name)):
        photo = sorted(d.glob("photo_gt.*"))
        if photo:
            # the photo keeps its folder's name as id: copy the path under that stem
            photo_files.append(photo[0])
        svg, raster = d / "sketch_gt.svg", sorted(p for p in d.glob("sketch_gt.*") if p.suffix.lower() != ".svg")
        payload = None
        src = svg
        if svg.is_file():
            payload = read_sketch_file(svg, opts, report)
            src = svg
        if payload is None and raster:
            payload = read_sketch_file(raster[0], opts, report)
            src = raster[0]
        if payload is not None:
            sketches.append(("", d.name, d.name, payload, str(src)))
    # ids are the folder names; split by hash of the folder name
    split_of = {d.name: hash_split(d.name, opts) for d in pair_dirs}
    sketches = [(split_of[s[2]],) + s[1:] for s in sketches]
    return _write_paired(out, classes, target, [(p.parent.name, p) for p in photo_files], sketches, opts, report,
                         root, "pair folders", {"split_source": "hash"},
                         photo_split_default=lambda stem: split_of.get(stem, "train"))
