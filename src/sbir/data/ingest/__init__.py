"""Ingest adapters: published sketch/photo datasets -> the project's Parquet format.

One function per source layout, each ``ingest_<format>(root, out, options) -> IngestReport``, in a
module of its own (:mod:`.sketchy`, :mod:`.tuberlin`, :mod:`.quickdraw`, :mod:`.qmul`); what they share
is in :mod:`.common` (options, report, helpers), :mod:`.writing` (the dataset sink) and
:mod:`.sketch_files`; the command line (``sbir ingest``) is :mod:`.cli`.

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
  Sketches that exist only as rasters keep their raster (as greyscale, resized to ``image_size`` x
  ``image_size`` like every sketch image) with ``strokes = None``,
  unless ``vectorise`` is on: then each raster is traced into stroke-3 (:mod:`sbir.data.vectorise`,
  in the raster's pixel units), the stored image is re-rendered from the strokes by the project's
  rasteriser, ``source`` ends in ``#vectorised``, and the trace statistics (strokes per sketch,
  IoU / coverage against the raster) go to ``info.vectorise`` and the manifest (``ingest.vectorise``).
  A raster that yields no strokes keeps its raster, is counted (``no_strokes``) and reported as an
  issue (``vectorise_no_strokes``).
* ``photo_size``: photos are resized to ``photo_size`` x ``photo_size`` (PNG) at ingest, for small
  pipelines on CPU; by default photos keep their bytes.
  Photos keep their original JPEG/PNG bytes (other formats are re-encoded as PNG).
* Bad input is never dropped silently: every corrupt image, unparsable SVG (malformed path data
  included), invalid ndjson line, empty drawing, degenerate SVG drawing (fewer than 2 points or no
  extent), sketch without photo, unreadable file... is an *issue* in the
  :class:`IngestReport` (count per reason + ``{file, reason, detail}``); deliberate exclusions
  (class map, ``drop_invalid``, ``recognized_only``, ``max_per_class``) are counted under
  ``dropped``. With ``strict=True`` the first issue raises :class:`StrictIngestError`.
* Deterministic: file lists are sorted, splits are hashes, no time stamps, so the same input gives
  the same manifest checksum.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from sbir.data.ingest.common import (
    IngestError,
    IngestOptions,
    IngestReport,
    StrictIngestError,
    default_report_path,
    load_class_map,
)
from sbir.data.ingest.qmul import ingest_qmul
from sbir.data.ingest.quickdraw import ingest_quickdraw
from sbir.data.ingest.sketchy import ingest_sketchy
from sbir.data.ingest.tuberlin import ingest_tuberlin

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
