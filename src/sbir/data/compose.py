"""Cross-dataset composition: photos and test sketches from one ingested dataset, training sketches from
another (the paper's cross-dataset study, e.g. a sketch teacher trained on Quick Draw drawings and
evaluated on Sketchy sketches against Sketchy photos).

    sbir compose --photos data/x/sketchy --train-sketches data/x/quickdraw --test-sketches data/x/sketchy \\
        --out data/quickdraw-sketchy

* The class list is the photo dataset's; every sketch class must be one of them (map the sketch source's
  names at ingest with ``--class-map``), else the composition stops naming the dataset and the classes.
* ``--train-sketches`` names one or more sources. Every sketch of a source (all its splits) becomes a
  ``train`` sketch; a source that is also ``--test-sketches`` gives only its sketches outside the test
  split, so no query is ever trained on (e.g. Sketchy's own train sketches beside Quick Draw drawings). The
  ``test`` sketches of ``--test-sketches`` are the queries. A sketch keeps its photo when that photo is in
  the photo dataset. What is left out (the test source's other splits) is counted in the report, never
  silent.
* Sketch images of both sources must have one size, and ids are prefixed with their source dataset's
  name, so the two sources never collide.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from sbir.data.format import DatasetFormatError, DatasetWriter, PhotoRow, SketchRow, open_dataset, strokes_from_arrow


def _sketch_rows(ds, splits: list[str] | None) -> list[dict[str, Any]]:
    table = ds.read("sketches", splits=splits)
    rows = table.drop_columns(["strokes"]).to_pylist()
    for row, strokes in zip(rows, strokes_from_arrow(table.column("strokes"))):
        row["strokes"] = strokes
    return rows


def _check_classes(rows: list[dict[str, Any]], classes: list[str], where: Path) -> None:
    unknown = sorted({r["class_name"] for r in rows} - set(classes))
    if unknown:
        raise DatasetFormatError(f"{where}: sketch classes {unknown} are not photo classes {classes}; map them at "
                                 "ingest with --class-map")


def _check_sizes(rows: list[dict[str, Any]], where: Path) -> tuple[int, int]:
    sizes = Counter((r["height"], r["width"]) for r in rows)
    if len(sizes) > 1:
        raise DatasetFormatError(f"{where}: sketches of several sizes {dict(sizes)}; ingest them with one "
                                 "--image-size")
    return next(iter(sizes))


def compose(photos: str | os.PathLike, train_sketches: str | os.PathLike | Sequence[str | os.PathLike],
            test_sketches: str | os.PathLike, out: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """Write the composed dataset to ``out`` and return its report (also in the manifest, ``composed``)."""
    if isinstance(train_sketches, (str, os.PathLike)):
        train_sketches = [train_sketches]
    photo_ds, test_ds = open_dataset(photos), open_dataset(test_sketches)
    classes = photo_ds.class_names
    test_rows = _sketch_rows(test_ds, ["test"])
    _check_classes(test_rows, classes, test_ds.root)
    sizes = {str(test_ds.root): _check_sizes(test_rows, test_ds.root)}
    train_sources = []  # (dataset, its rows that become train sketches)
    used_from_test = len(test_rows)  # the test source's sketches that go into the composed set
    for path in train_sketches:
        ds = open_dataset(path)
        same_as_test = ds.root.resolve() == test_ds.root.resolve()
        rows = _sketch_rows(ds, [s for s in ds.manifest["counts"]["sketches"] if s != "test"] if same_as_test else None)
        _check_classes(rows, classes, ds.root)
        sizes[str(ds.root)] = _check_sizes(rows, ds.root)
        train_sources.append((ds, rows))
        used_from_test += len(rows) if same_as_test else 0
    if len(set(sizes.values())) > 1:
        raise DatasetFormatError(f"sketch image sizes differ between the sources: {sizes}; ingest both with one "
                                 "--image-size")
    photo_rows = photo_ds.read("photos").to_pylist()
    photo_ids = {r["id"] for r in photo_rows}
    label = {c: i for i, c in enumerate(classes)}
    all_train = [r for _, rows in train_sources for r in rows]
    report: dict[str, Any] = {
        "photos": str(photo_ds.root), "train_sketches": [str(ds.root) for ds, _ in train_sources],
        "test_sketches": str(test_ds.root),
        "counts": {"photos": len(photo_rows), "train_sketches": len(all_train), "test_sketches": len(test_rows)},
        "train_sketches_per_source": {str(ds.root): len(rows) for ds, rows in train_sources},
        "train_sketches_per_class": dict(sorted(Counter(r["class_name"] for r in all_train).items())),
        "left_out": {f"{test_ds.root.name} sketches not in its test split":
                     test_ds.manifest["totals"]["sketches"] - used_from_test},
    }
    out = Path(out)
    with DatasetWriter(out, classes, name or out.name, extra={"composed": report}) as writer:
        for r in photo_rows:
            writer.add_photo(PhotoRow(r["id"], r["class_name"], label[r["class_name"]], r["split"], r["image"],
                                      r["height"], r["width"], r["source"], bool(r["labelled"])))
        for split, ds, rows in [("train", ds, rows) for ds, rows in train_sources] + [("test", test_ds, test_rows)]:
            for r in rows:
                photo_id = r["photo_id"] if r["photo_id"] in photo_ids else None
                writer.add_sketch(SketchRow(f"{ds.root.name}/{r['id']}", r["class_name"], label[r["class_name"]],
                                            split, r["image"], r["height"], r["width"], r["strokes"], photo_id,
                                            r["source"]))
    return report


def add_compose(sub) -> None:
    """The ``sbir compose`` subcommand."""
    p = sub.add_parser("compose", help="a cross-dataset dataset: photos and test sketches from one ingested "
                                       "dataset, training sketches from another",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", required=True, help="ingested dataset whose photos (all splits) are kept")
    p.add_argument("--train-sketches", required=True, nargs="+",
                   help="ingested dataset(s) whose sketches become the train sketches: all splits of each, or "
                        "the splits other than test of the --test-sketches dataset")
    p.add_argument("--test-sketches", required=True, help="ingested dataset whose test sketches are the queries")
    p.add_argument("--out", required=True, help="output dataset folder (written atomically)")
    p.add_argument("--name", default=None, help="dataset name (default: --out folder name)")
    p.add_argument("--report", default=None, help="also write the report as JSON here")
    p.set_defaults(func=_run_compose)


def _run_compose(args) -> int:
    try:
        report = compose(args.photos, args.train_sketches, args.test_sketches, args.out, args.name)
    except DatasetFormatError as exc:
        print(f"sbir compose: {exc}")
        return 2
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"composed {args.out}: {report['counts']} (left out: {report['left_out']})")
    return 0
