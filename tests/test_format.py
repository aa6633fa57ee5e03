import json

import numpy as np
import pytest

from sbir.data.format import (DatasetFormatError, DatasetWriter, PhotoRow, SketchRow, decode_image, encode_png,
                              open_dataset, strokes_from_arrow, strokes_to_arrow)


def _write(path, n=10, row_group_size=3):
    rng = np.random.default_rng(0)
    with DatasetWriter(path, ["a", "b"], row_group_size=row_group_size) as w:
        for i in range(n):
            img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            w.add_photo(PhotoRow(f"p{i}", "ab"[i % 2], i % 2, "train" if i < 7 else "test", encode_png(img), 8, 8,
                                 labelled=i < 2))
            strokes = rng.normal(size=(5, 3)).astype(np.float32)
            strokes[:, 2] = [0, 0, 1, 0, 1]
            w.add_sketch(SketchRow(f"s{i}", "ab"[i % 2], i % 2, "train" if i < 7 else "test",
                                   encode_png(img[:, :, 0]), 8, 8, strokes=strokes if i != 3 else None,
                                   photo_id=f"p{i}" if i % 3 else None))
    return path


def test_round_trip_and_manifest(tmp_path):
    ds = open_dataset(_write(tmp_path / "d"))
    m = ds.manifest
    assert m["totals"] == {"photos": 10, "sketches": 10}
    assert m["counts"]["photos"]["train"] == {"a": 4, "b": 3}
    assert m["labelled_photos"] == 2 and m["paired_sketches"] == 6
    tbl = ds.read("sketches", splits=["test"])
    assert tbl.column("id").to_pylist() == ["s7", "s8", "s9"]
    strokes = strokes_from_arrow(ds.read("sketches").column("strokes"))
    assert strokes[3] is None and strokes[0].shape == (5, 3)
    # streaming: row groups are small, batches never exceed them
    sizes = [b.num_rows for b in ds.iter_batches("photos", batch_size=2)]
    assert sum(sizes) == 10 and max(sizes) <= 2


def test_checksum_is_deterministic_and_content_sensitive(tmp_path):
    a = open_dataset(_write(tmp_path / "a")).checksum
    b = open_dataset(_write(tmp_path / "b", row_group_size=7)).checksum
    c = open_dataset(_write(tmp_path / "c", n=9)).checksum
    assert a == b != c


def test_strokes_arrow_round_trip_with_slices():
    arrs = [np.arange(6, dtype=np.float32).reshape(2, 3), None, np.ones((1, 3), np.float32)]
    col = strokes_to_arrow(arrs)
    back = strokes_from_arrow(col.slice(1))
    assert back[0] is None and np.array_equal(back[1], arrs[2])


def test_wrong_version_and_missing_folder_fail_clearly(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    d = _write(tmp_path / "d")
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetFormatError, match="schema version 99"):
        open_dataset(d)


def test_writer_rejects_bad_rows_and_leaves_nothing(tmp_path):
    out = tmp_path / "d"
    with pytest.raises(ValueError, match="does not match class"):
        with DatasetWriter(out, ["a"]) as w:
            w.add_photo(PhotoRow("p", "zzz", 0, "train", b"", 1, 1))
    assert not out.exists() and not (tmp_path / "d.tmp").exists()


def test_corrupt_image_error_names_source():
    with pytest.raises(ValueError, match="row 7"):
        decode_image(b"not an image", source="row 7")
