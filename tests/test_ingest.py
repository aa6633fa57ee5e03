"""Tests of sbir.data.ingest and its command line, ``python -m sbir ingest``.

Every published layout is rebuilt here as a small fixture written the way the real files are
(Sketchy tree with tx_000000000000 + info/, Quick Draw simplified/raw ndjson + sketch-rnn npz,
TU-Berlin SVG with a group transform and cubic Béziers, QMUL-V2 pickled coordinate dict + photo/,
trainA/trainB, QMUL-V1 .mat databases), plus the real samples in ../shared/data.
Sketch images are rendered at 64 px (``FAST``) to keep the file well under a minute.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sbir.data.format import decode_image, open_dataset, strokes_from_arrow
from sbir.data.ingest import (
    IngestError,
    IngestOptions,
    StrictIngestError,
    default_report_path,
    ingest,
    ingest_qmul,
    ingest_quickdraw,
    ingest_sketchy,
    ingest_tuberlin,
    load_class_map,
)
from sbir.strokes import stroke3_to_polylines

REPO = Path(__file__).resolve().parents[1]
FAST = dict(progress=False, image_size=64)


def opts(**kw) -> IngestOptions:
    return IngestOptions(**{**FAST, **kw})


# =========================================================================== file writers
def write_jpeg(path: Path, seed: int, size=(40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", quality=90)


def write_png_photo(path: Path, seed: int, size=256) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, "PNG")


def write_sketch_png(path: Path, seed: int, size=64, mode="RGB") -> None:
    """Black lines on white, RGB like Sketchy's sketch PNGs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size, size), 255, np.uint8)
    a[seed % size, :] = 0
    a[:, (3 * seed) % size] = 0
    Image.fromarray(a).convert(mode).save(path, "PNG")


def write_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")


def sketches_table(out: Path):
    return open_dataset(out).read("sketches")


def photos_table(out: Path):
    return open_dataset(out).read("photos")


def rows(table) -> list[dict]:
    return table.to_pylist()


def issue_files(report, reason: str) -> list[str]:
    return [e["file"] for e in report.issues if e["reason"] == reason]


# =========================================================================== Sketchy
SKETCHY = {
    "airplane": {"n02691156_10151": 2, "n02691156_196": 1, "n02691156_359": 0},
    "cat": {"n02121808_1": 1, "n02121808_2": 2},
}


def make_sketchy(root: Path, published: bool = True, bad: bool = False) -> Path:
    base = root / "rendered_256x256" / "256x256" if published else root
    pdir = base / "photo" / ("tx_000000000000" if published else "")
    sdir = base / "sketch" / ("tx_000000000000" if published else "")
    seed = 0
    for cls, photos in SKETCHY.items():
        for stem, n in photos.items():
            write_jpeg(pdir / cls / f"{stem}.jpg", seed)
            for k in range(1, n + 1):
                write_sketch_png(sdir / cls / f"{stem}-{k}.png", seed + k)
            seed += 10
    if published:
        # another augmentation variant that must be ignored
        write_jpeg(base / "photo" / "tx_000100000000" / "airplane" / "n02691156_10151.jpg", 99)
        info = root / "info"
        info.mkdir(parents=True)
        (info / "testset.txt").write_text("airplane/n02691156_196.jpg\ncat/n02121808_2.jpg\n")
        (info / "invalid-error.txt").write_text("n02691156_10151-2\n")
        (info / "invalid-pose.txt").write_text("n02121808_2-2\n")
        (info / "invalid-ambiguous.txt").write_text("")
    if bad:
        write_garbage(pdir / "cat" / "n02121808_3.jpg")                     # corrupt photo
        write_sketch_png(sdir / "cat" / "n02121808_3-1.png", 5)              # ... so its sketch has no photo
        write_sketch_png(sdir / "cat" / "n02121808_77-1.png", 6)             # sketch without any photo
        (sdir / "cat" / "n02121808_1-2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt sketch
    return root


def test_sketchy_published_layout(tmp_path):
    root = make_sketchy(tmp_path / "sketchy")
    rep = ingest_sketchy(root, tmp_path / "out", opts())
    assert rep.ok, rep.issues
    assert rep.info["layout"] == "published"
    ds = open_dataset(tmp_path / "out")
    assert ds.class_names == ["airplane", "cat"]
    photos = {r["id"]: r for r in rows(photos_table(tmp_path / "out"))}
    sketches = {r["id"]: r for r in rows(sketches_table(tmp_path / "out"))}
    assert len(photos) == 5 and len(sketches) == 6  # the tx_000100000000 variant is not read
    # pairs: sketch <stem>-<k> -> photo <class>/<stem>
    for sid, s in sketches.items():
        cls, name = sid.split("/")
        assert s["photo_id"] == f"{cls}/{name.rsplit('-', 1)[0]}"
        assert s["split"] == photos[s["photo_id"]]["split"]  # sketches follow their photo
        assert s["strokes"] is None and decode_image(s["image"], "L").ndim == 2
    # official test list
    assert {p for p, r in photos.items() if r["split"] == "test"} == {"airplane/n02691156_196", "cat/n02121808_2"}
    # labelled: train photos that have a sketch (share 1.0); n02691156_359 has none
    assert {p for p, r in photos.items() if r["labelled"]} == {"airplane/n02691156_10151", "cat/n02121808_1"}
    assert ds.manifest["ingest"]["split_source"] == "testset.txt"
    # invalid lists are honoured only on request
    assert rep.info["sketches_on_invalid_lists_kept"] == 2
    rep2 = ingest_sketchy(root, tmp_path / "out2", opts(drop_invalid=True))
    assert rep2.ok and rep2.manifest["totals"]["sketches"] == 4
    assert rep2.dropped == {"invalid_list:invalid-error": 1, "invalid_list:invalid-pose": 1}


def test_sketchy_flat_layout_hash_split_and_labelled_share(tmp_path):
    root = make_sketchy(tmp_path / "flat", published=False)
    rep = ingest_sketchy(root, tmp_path / "out", opts(test_share=0.5, labelled_share=0.5))
    assert rep.ok and rep.info["layout"] == "flat"
    photos = {r["id"]: r for r in rows(photos_table(tmp_path / "out"))}
    for s in rows(sketches_table(tmp_path / "out")):
        assert s["split"] == photos[s["photo_id"]]["split"]
    assert not any(r["labelled"] for r in photos.values() if r["split"] == "test")
    assert open_dataset(tmp_path / "out").manifest["ingest"]["split_source"] == "hash"
    # the hash split is a property of the id: a different seed changes it, the same seed does not
    rep_b = ingest_sketchy(root, tmp_path / "out_b", opts(test_share=0.5, labelled_share=0.5))
    assert rep_b.manifest["checksum"] == rep.manifest["checksum"]


def test_sketchy_extended_photos(tmp_path):
    root = make_sketchy(tmp_path / "sketchy")
    ext = tmp_path / "EXTEND_image_sketchy"
    write_jpeg(ext / "airplane" / "n02691156_99999.jpg", 1)
    write_jpeg(ext / "airplane" / "n02691156_196.jpg", 2)  # already a Sketchy photo
    write_jpeg(ext / "cat" / "n02121808_5000.jpg", 3)
    rep = ingest_sketchy(root, tmp_path / "out", opts(extended_photos=str(ext)))
    assert rep.ok
    photos = {r["id"]: r for r in rows(photos_table(tmp_path / "out"))}
    ext_ids = sorted(p for p in photos if p.startswith("ext/"))
    assert ext_ids == ["ext/airplane/n02691156_99999", "ext/cat/n02121808_5000"]
    assert not any(photos[p]["labelled"] for p in ext_ids)  # unpaired photos are never labelled
    assert rep.dropped["extended_photo_already_in_sketchy"] == 1


def test_sketchy_bad_input_is_reported(tmp_path):
    root = make_sketchy(tmp_path / "sketchy", bad=True)
    rep = ingest_sketchy(root, tmp_path / "out", opts())
    assert rep.issue_counts == {"corrupt_image": 2, "sketch_without_photo": 2}
    assert any(f.endswith("n02121808_3.jpg") for f in issue_files(rep, "corrupt_image"))
    assert any(f.endswith("n02121808_1-2.png") for f in issue_files(rep, "corrupt_image"))
    assert sorted(Path(f).name for f in issue_files(rep, "sketch_without_photo")) == [
        "n02121808_3-1.png", "n02121808_77-1.png"]
    # sketches without photo are kept, unpaired
    s = {r["id"]: r for r in rows(sketches_table(tmp_path / "out"))}
    assert s["cat/n02121808_77-1"]["photo_id"] is None
    # report file: default path beside the output
    report_path = default_report_path(tmp_path / "out2")
    ingest("sketchy", root, tmp_path / "out2", opts())
    data = json.loads(report_path.read_text())
    assert data["issue_counts"]["corrupt_image"] == 2 and len(data["issues"]) == 4
    assert {"file", "reason"} <= set(data["issues"][0])


def test_raster_sketches_take_the_image_size_like_photos_take_the_photo_size(tmp_path):
    """--photo-size 48 --image-size 48 without --vectorise: photos AND raster sketches come out at 48 px
    (raster sketches used to keep their source size, 128 px here, and training died on the mismatch)."""
    root = tmp_path / "flat"
    for cls, stems in {"cat": ["c1", "c2"], "dog": ["d1"]}.items():
        for i, stem in enumerate(stems):
            write_png_photo(root / "photo" / cls / f"{stem}.png", i, size=128)
            write_sketch_png(root / "sketch" / cls / f"{stem}-1.png", 7 + i, size=128)
    write_sketch_png(root / "sketch" / "dog" / "d1-2.png", 40, size=128, mode="LA")  # with an alpha channel
    rep = ingest_sketchy(root, tmp_path / "out", opts(photo_size=48, image_size=48))
    assert rep.ok, rep.issues
    photos, sketches = rows(photos_table(tmp_path / "out")), rows(sketches_table(tmp_path / "out"))
    assert len(photos) == 3 and len(sketches) == 4
    for p in photos:
        assert (p["height"], p["width"]) == (48, 48) and decode_image(p["image"], "RGB").shape == (48, 48, 3)
    for s in sketches:
        assert s["strokes"] is None
        assert (s["height"], s["width"]) == (48, 48) and decode_image(s["image"], "L").shape == (48, 48)
        img = decode_image(s["image"], "L")
        assert img.min() < 200 and img.max() >= 250  # still (1 px, so grey at 48 px) lines on white
    # the same through the command line; without --photo-size photos keep their bytes, sketches still follow
    r = run_cli("--format", "sketchy", "--root", str(root), "--out", str(tmp_path / "cli"), "--no-progress",
                "--image-size", "32")
    assert r.returncode == 0, r.stderr
    assert {(s["height"], s["width"]) for s in rows(sketches_table(tmp_path / "cli"))} == {(32, 32)}
    assert {(p["height"], p["width"]) for p in rows(photos_table(tmp_path / "cli"))} == {(128, 128)}


def test_sketchy_strict_fails_on_first_issue(tmp_path):
    root = make_sketchy(tmp_path / "sketchy", bad=True)
    with pytest.raises(StrictIngestError, match=r"n02121808_3\.jpg: corrupt_image"):
        ingest("sketchy", root, tmp_path / "out", opts(strict=True), report_path=tmp_path / "r.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    assert json.loads((tmp_path / "r.json").read_text())["n_issues"] == 1


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest_sketchy(tmp_path / "nope", tmp_path / "out", opts())
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match=r"no Sketchy layout under .*empty.*tx_000000000000"):
        ingest_sketchy(tmp_path / "empty", tmp_path / "out", opts())
    for fn in (ingest_tuberlin, ingest_quickdraw, ingest_qmul):
        with pytest.raises(IngestError, match="expected"):
            fn(tmp_path / "empty", tmp_path / "out", opts())


# =========================================================================== Quick, Draw!
def qd_line(word: str, key: int, drawing, recognized=True) -> str:
    rec = {"word": word, "countrycode": "US", "timestamp": "2017-03-16 02:19:08.42475 UTC",
           "recognized": recognized, "key_id": str(key), "drawing": drawing}
    return json.dumps(rec, separators=(",", ":"))


CAT = [
    [[[56, 107, 156, 222], [11, 11, 4, 0]], [[10, 20], [200, 255]]],
    [[[0, 255, 128], [0, 0, 255]]],
    [[[5], [5]], [[30, 40, 50], [60, 70, 80]]],  # a one-point stroke
]


def make_quickdraw(root: Path, bad: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [qd_line("cat", 5000 + i, d, recognized=(i != 2)) for i, d in enumerate(CAT)]
    (root / "cat.ndjson").write_text("\n".join(lines) + "\n")
    raw = [  # raw format: float coordinates and a time list per stroke
        [[[10.5, 20.25, 30.0], [1.0, 2.0, 3.5], [0, 16, 33]], [[100.0, 90.0], [50.0, 40.0], [80, 96]]],
        [[[300.0, 310.0], [400.0, 410.0], [0, 10]]],
    ]
    (root / "full_raw_dog.ndjson").write_text("\n".join(qd_line("dog", 7000 + i, d) for i, d in enumerate(raw)) + "\n")
    rng = np.random.default_rng(0)

    def s3(n):
        a = rng.integers(-20, 20, (n, 3)).astype(np.int16)
        a[:, 2] = 0
        a[n // 2, 2] = 1
        a[-1, 2] = 1
        return a

    np.savez(root / "sheep.npz", train=np.array([s3(5), s3(6), s3(7)], dtype=object),
             valid=np.array([s3(4), s3(8)], dtype=object), test=np.array([s3(9), s3(3)], dtype=object))
    if bad:
        good = qd_line("bird", 1, [[[1, 2], [3, 4]]])
        (root / "bird.ndjson").write_text("\n".join([
            good,
            qd_line("bird", 2, []),                    # empty drawing
            qd_line("bird", 3, [[[], []]]),            # only an empty stroke
            qd_line("bird", 4, [[[1, 2, 3], [4]]]),    # x/y length mismatch
            good[: len(good) // 2],                    # truncated (last line, no newline)
        ]))
    return root


def test_quickdraw_simplified_raw_npz(tmp_path):
    root = make_quickdraw(tmp_path / "qd")
    rep = ingest_quickdraw(root, tmp_path / "out", opts())
    assert rep.ok, rep.issues
    ds = open_dataset(tmp_path / "out")
    assert ds.class_names == ["cat", "dog", "sheep"]  # "full_raw_" prefix stripped
    sk = sketches_table(tmp_path / "out")
    by_id = {r["id"]: r for r in rows(sk)}
    strokes = dict(zip(sk.column("id").to_pylist(), strokes_from_arrow(sk.column("strokes"))))
    assert len(by_id) == 3 + 2 + 7
    # simplified: stroke-3 round-trips to the original absolute points, in source units (0..255)
    for i, drawing in enumerate(CAT):
        polys = stroke3_to_polylines(strokes[f"cat/{5000 + i}"])
        assert len(polys) == len(drawing)
        for got, (xs, ys) in zip(polys, drawing):
            np.testing.assert_array_equal(got, np.array([xs, ys], np.float32).T)
    # raw: time dropped, float coordinates kept
    polys = stroke3_to_polylines(strokes["dog/7000"])
    np.testing.assert_allclose(polys[0], [[10.5, 1.0], [20.25, 2.0], [30.0, 3.5]])
    np.testing.assert_allclose(polys[1], [[100.0, 50.0], [90.0, 40.0]])
    # npz: stroke-3 stored as is; valid -> test
    npz = np.load(root / "sheep.npz", encoding="latin1", allow_pickle=True)
    np.testing.assert_array_equal(strokes["sheep/train/000001"], npz["train"][1].astype(np.float32))
    assert by_id["sheep/valid/000000"]["split"] == "test" and by_id["sheep/train/000000"]["split"] == "train"
    img = decode_image(by_id["cat/5000"]["image"], "L")
    assert img.shape == (64, 64) and img.min() < 128 and img.max() == 255  # black on white
    # options
    rep = ingest_quickdraw(root, tmp_path / "o2", opts(recognized_only=True, npz_valid_split="val"))
    assert rep.dropped == {"not_recognized": 1}
    c = open_dataset(tmp_path / "o2").manifest["counts"]["sketches"]
    assert c["val"] == {"sheep": 2} and sum(c[s].get("cat", 0) for s in c) == 2
    rep = ingest_quickdraw(root, tmp_path / "o3", opts(max_per_class=1))
    c = open_dataset(tmp_path / "o3").manifest["counts"]["sketches"]
    assert {k: sum(c[s].get(k, 0) for s in c) for k in ("cat", "dog", "sheep")} == {"cat": 1, "dog": 1, "sheep": 3}
    assert any(t.startswith("cat ") for t in rep.info["max_per_class_reached"])


def test_quickdraw_bad_lines_reported_with_file_and_line(tmp_path):
    root = make_quickdraw(tmp_path / "qd", bad=True)
    rep = ingest_quickdraw(root, tmp_path / "out", opts())
    assert rep.issue_counts == {"empty_drawing": 2, "invalid_drawing": 1, "invalid_ndjson_line": 1}
    lines = {(Path(e["file"]).name, e["line"], e["reason"]) for e in rep.issues}
    assert lines == {("bird.ndjson", 2, "empty_drawing"), ("bird.ndjson", 3, "empty_drawing"),
                     ("bird.ndjson", 4, "invalid_drawing"), ("bird.ndjson", 5, "invalid_ndjson_line")}
    assert open_dataset(tmp_path / "out").manifest["counts"]["sketches"]
    with pytest.raises(StrictIngestError, match=r"bird\.ndjson:2: empty_drawing"):
        ingest_quickdraw(root, tmp_path / "strict", opts(strict=True))


def test_quickdraw_streams_in_row_groups_and_is_deterministic(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    rng = np.random.default_rng(1)
    with open(root / "line.ndjson", "w") as fh:
        for i in range(300):
            n = int(rng.integers(2, 6))
            fh.write(qd_line("line", i, [[rng.integers(0, 256, n).tolist(), rng.integers(0, 256, n).tolist()]]) + "\n")
    a = ingest_quickdraw(root, tmp_path / "a", opts(row_group_size=64, image_size=32))
    b = ingest_quickdraw(root, tmp_path / "b", opts(row_group_size=50, image_size=32, render_batch=7))
    assert a.manifest["totals"]["sketches"] == 300
    assert pq.ParquetFile(tmp_path / "a" / "sketches.parquet").metadata.num_row_groups == 5
    assert a.manifest["checksum"] == b.manifest["checksum"]  # independent of row-group / render batch sizes
    c = ingest_quickdraw(root, tmp_path / "c", opts(row_group_size=64, image_size=32, split_seed="other"))
    assert c.manifest["checksum"] != a.manifest["checksum"]


def test_class_map(tmp_path):
    root = make_quickdraw(tmp_path / "qd")
    cmap = tmp_path / "map.yaml"
    cmap.write_text("cat: feline\nsheep: sheep\ndog: null\n")
    assert load_class_map(cmap) == {"cat": "feline", "sheep": "sheep", "dog": None}
    rep = ingest_quickdraw(root, tmp_path / "out", opts(class_map=load_class_map(cmap)))
    ds = open_dataset(tmp_path / "out")
    assert ds.class_names == ["feline", "sheep"]
    assert rep.info["unmapped_classes"] == ["dog"] and rep.dropped["unmapped_class_files"] == 1
    sk = rows(sketches_table(tmp_path / "out"))
    assert {r["class_name"] for r in sk} == {"feline", "sheep"}
    assert all(r["id"].startswith(("cat/", "sheep/")) for r in sk)  # ids keep the source class
    jmap = tmp_path / "map.json"
    jmap.write_text(json.dumps({"cat": "feline"}))
    assert load_class_map(jmap) == {"cat": "feline"}
    jmap.write_text("[1, 2]")
    with pytest.raises(IngestError, match="mapping"):
        load_class_map(jmap)


# =========================================================================== TU-Berlin
TU_SVG = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">
<svg viewBox="0 0 800 800" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg" version="1.1">
<g fill="none" stroke="black" stroke-linecap="round" stroke-linejoin="round" stroke-width="1.8481">
<g transform="translate({tx},135.4065) scale(1.6233) translate(0,-60)">
<path id="0" d="M167 268 C167 268 169.3665 263.4813 172 262 C175.9896 259.7559 177.6387 259.2365 183 259 "/>
<path id="1" d="M171 264 C171 264 156.0157 299.1415 149 333 C144.9744 352.4277 146.294 356.9169 148 375 "/>
</g>
</g>
</svg>
"""


def tu_transform(x, y, tx=87.52):
    return tx + 1.6233 * x, 135.4065 + 1.6233 * (y - 60)


def cubic(p0, p1, p2, p3, t):
    t = t[:, None]
    return ((1 - t) ** 3) * p0 + 3 * ((1 - t) ** 2) * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3


def make_tuberlin(root: Path, bad: bool = False) -> Path:
    (root / "airplane").mkdir(parents=True)
    (root / "airplane" / "1.svg").write_text(TU_SVG.replace("{tx}", "87.52"))
    (root / "airplane" / "2.svg").write_text(TU_SVG.replace("{tx}", "20"))
    write_sketch_png(root / "cat" / "3850.png", 3, size=48, mode="L")  # PNG-only sketch
    if bad:
        (root / "cat" / "3841.svg").write_text(TU_SVG.replace("{tx}", "87.52")[:400])  # truncated XML
        write_sketch_png(root / "cat" / "3841.png", 4, size=48)                      # ... PNG twin used instead
        (root / "cat" / "3842.svg").write_text(TU_SVG.replace("{tx}", "87.52").replace("C175.9896", "C17#5.9896"))
        (root / "cat" / "3843.svg").write_text('<svg viewBox="0 0 800 800" xmlns="http://www.w3.org/2000/svg"></svg>')
        (root / "cat" / "3844.svg").write_text(TU_SVG.replace("{tx}", "900"))  # strokes off the canvas
    return root


def test_tuberlin_svg_geometry(tmp_path):
    root = make_tuberlin(tmp_path / "tu")
    photos = tmp_path / "images"
    write_jpeg(photos / "airplane" / "a.jpg", 1)
    write_jpeg(photos / "cat" / "c.jpg", 2)
    rep = ingest_tuberlin(root, tmp_path / "out", opts(simplify_eps=0.0, flatten_step=1.0, photos=str(photos)))
    assert rep.ok, rep.issues
    assert rep.info["sketches_from_svg"] == 2 and rep.info["sketches_from_png"] == 1
    sk = sketches_table(tmp_path / "out")
    strokes = dict(zip(sk.column("id").to_pylist(), strokes_from_arrow(sk.column("strokes"))))
    assert strokes["cat/3850"] is None
    polys = stroke3_to_polylines(strokes["airplane/1"])
    assert len(polys) == 2  # one stroke per <path>
    # the group transform is applied: end points of each path map through it exactly
    np.testing.assert_allclose(polys[0][0], tu_transform(167, 268), atol=1e-3)
    np.testing.assert_allclose(polys[0][-1], tu_transform(183, 259), atol=1e-3)
    np.testing.assert_allclose(polys[1][-1], tu_transform(148, 375), atol=1e-3)
    # the Béziers are flattened: every point lies on the (transformed) curve
    ctrl = [np.array(tu_transform(*p)) for p in [(167, 268), (169.3665, 263.4813), (172, 262)]]
    dense = np.concatenate([
        cubic(np.array(tu_transform(167, 268)), ctrl[1], ctrl[2], np.array(tu_transform(172, 262)),
              np.linspace(0, 1, 2001)),
        cubic(*[np.array(tu_transform(*p)) for p in [(172, 262), (175.9896, 259.7559), (177.6387, 259.2365),
                                                      (183, 259)]], np.linspace(0, 1, 2001)),
    ])
    assert len(polys[0]) > 4
    d = np.min(np.linalg.norm(polys[0][:, None, :] - dense[None, :, :], axis=2), axis=1)
    assert d.max() < 0.05
    # all strokes inside the 800 x 800 canvas
    for sid in ("airplane/1", "airplane/2"):
        pts = np.concatenate(stroke3_to_polylines(strokes[sid]))
        assert pts.min() >= 0 and pts.max() <= 800
    assert photos_table(tmp_path / "out").num_rows == 2


def test_tuberlin_bad_svgs_reported(tmp_path):
    root = make_tuberlin(tmp_path / "tu", bad=True)
    write_jpeg(root / "images" / "cat" / "c.jpg", 1)  # extended photos beside the sketches: used by default
    rep = ingest_tuberlin(root, tmp_path / "out", opts())
    assert rep.issue_counts == {"unparsable_svg": 2, "empty_drawing": 1, "outside_canvas": 1}
    assert rep.manifest["totals"]["photos"] == 1 and rep.manifest["class_names"] == ["airplane", "cat"]
    assert sorted(Path(f).name for f in issue_files(rep, "unparsable_svg")) == ["3841.svg", "3842.svg"]
    assert Path(issue_files(rep, "empty_drawing")[0]).name == "3843.svg"
    assert Path(issue_files(rep, "outside_canvas")[0]).name == "3844.svg"
    ids = set(sketches_table(tmp_path / "out").column("id").to_pylist())
    assert ids == {"airplane/1", "airplane/2", "cat/3841", "cat/3844", "cat/3850"}  # 3841 from its PNG
    with pytest.raises(StrictIngestError, match=r"3841\.svg: unparsable_svg"):
        ingest_tuberlin(root, tmp_path / "strict", opts(strict=True))


def test_tuberlin_malformed_path_data_and_degenerate_sketches_reported(tmp_path):
    """Path data a lenient parser would cut short, and strokes that are no drawing (one spot), are bad
    input like an unparsable file: counted, named in the report, never stored; --strict stops on them."""
    svg = '<svg viewBox="0 0 800 800" xmlns="http://www.w3.org/2000/svg">{}</svg>'
    root = tmp_path / "tu"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "1.svg").write_text(TU_SVG.replace("{tx}", "87.52"))                  # good
    (root / "cat" / "2.svg").write_text(svg.format('<path d="M 10 10 L zz 20 Q"/>'))       # malformed
    (root / "cat" / "3.svg").write_text(svg.format('<path d="M 5 5 L 5 5 Z"/>'))           # no extent
    (root / "cat" / "4.svg").write_text(svg.format('<path d="M 1 1 L 9 9"/><path d="M 3 3 C 1 1"/>'))
    write_sketch_png(root / "cat" / "4.png", 4, size=48)  # ... its PNG twin is used instead
    (root / "cat" / "5.svg").write_text(svg.format('<line x1="7" y1="7" x2="7" y2="7" stroke="black"/>'))
    rep = ingest_tuberlin(root, tmp_path / "out", opts())
    assert rep.issue_counts == {"unparsable_svg": 2, "degenerate_drawing": 2}, rep.issues
    by_file = {Path(e["file"]).name: e for e in rep.issues}
    assert by_file["2.svg"]["reason"] == "unparsable_svg" and "malformed" in by_file["2.svg"]["detail"]
    assert "'L' at character 8 has no coordinates" in by_file["2.svg"]["detail"]
    assert by_file["4.svg"]["reason"] == "unparsable_svg" and "using the PNG instead" in by_file["4.svg"]["detail"]
    assert by_file["3.svg"]["reason"] == by_file["5.svg"]["reason"] == "degenerate_drawing"
    assert "no extent" in by_file["3.svg"]["detail"]
    sk = sketches_table(tmp_path / "out")
    assert sorted(sk.column("id").to_pylist()) == ["cat/1", "cat/4"]
    assert strokes_from_arrow(sk.column("strokes"))[sk.column("id").to_pylist().index("cat/4")] is None  # the PNG
    assert rep.info["sketches_from_svg"] == 1 and rep.info["sketches_from_png"] == 1
    with pytest.raises(StrictIngestError, match=r"2\.svg: unparsable_svg \(path 0 has malformed data"):
        ingest_tuberlin(root, tmp_path / "strict", opts(strict=True))
    (root / "cat" / "2.svg").unlink()
    with pytest.raises(StrictIngestError, match=r"3\.svg: degenerate_drawing"):
        ingest_tuberlin(root, tmp_path / "strict", opts(strict=True))


# =========================================================================== QMUL
def qmul_sketch(rng, n_strokes=3, canvas=256.0) -> np.ndarray:
    """(N,3) ABSOLUTE x, y and a pen flag on each stroke's last point, as in ShoeV2_Coordinate."""
    parts = []
    for _ in range(n_strokes):
        k = int(rng.integers(2, 6))
        a = np.zeros((k, 3))
        a[:, :2] = rng.uniform(0, canvas, (k, 2))
        a[-1, 2] = 1
        parts.append(a)
    return np.concatenate(parts)


def test_qmul_v2_coordinates(tmp_path):
    root = tmp_path / "ShoeV2"
    rng = np.random.default_rng(0)
    data = {"/train/1001_1": qmul_sketch(rng), "/train/1001_2": qmul_sketch(rng, 2),
            "/test/2002_1": qmul_sketch(rng, 4), "/train/3003_1": qmul_sketch(rng)}
    root.mkdir()
    with open(root / "ShoeV2_Coordinate", "wb") as fh:
        pickle.dump(data, fh, protocol=2)
    for i, stem in enumerate(("1001", "2002", "4004")):
        write_png_photo(root / "photo" / f"{stem}.png", i, size=32)
    rep = ingest_qmul(root, tmp_path / "out", opts())
    assert rep.info["layout"] == "coordinates"
    assert rep.issue_counts == {"sketch_without_photo": 1} and "3003_1" in rep.issues[0]["file"]
    ds = open_dataset(tmp_path / "out")
    assert ds.class_names == ["shoe"]
    photos = {r["id"]: r for r in rows(photos_table(tmp_path / "out"))}
    assert photos["1001"]["split"] == "train" and photos["2002"]["split"] == "test"
    assert photos["1001"]["labelled"] and not photos["4004"]["labelled"]  # 4004 has no sketch
    sk = sketches_table(tmp_path / "out")
    by_id = {r["id"]: r for r in rows(sk)}
    assert {k: v["photo_id"] for k, v in by_id.items()} == {"1001_1": "1001", "1001_2": "1001", "2002_1": "2002",
                                                              "3003_1": None}
    assert by_id["2002_1"]["split"] == "test"
    strokes = dict(zip(sk.column("id").to_pylist(), strokes_from_arrow(sk.column("strokes"))))
    # stroke-3 round-trips to the absolute points, split at the pen flags
    src = data["/test/2002_1"]
    ends = np.flatnonzero(src[:, 2] == 1) + 1
    want = np.split(src[:, :2], ends[:-1])
    got = stroke3_to_polylines(strokes["2002_1"])
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-3)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_qmul_pickle_is_loaded_safely(tmp_path):
    root = tmp_path / "ChairV2"
    (root / "photo").mkdir(parents=True)
    with open(root / "ChairV2_Coordinate", "wb") as fh:
        pickle.dump({"/train/1_1": _Evil()}, fh)
    rep = ingest_qmul(root, tmp_path / "out", opts())
    assert rep.issue_counts == {"unreadable_file": 1} and "refusing" in rep.issues[0]["detail"]
    assert open_dataset(tmp_path / "out").class_names == ["chair"]


def test_qmul_trainA_trainB(tmp_path):
    root = tmp_path / "ShoeV2_F"
    write_sketch_png(root / "trainA" / "1001_1.png", 1)
    write_sketch_png(root / "trainA" / "1001_2.png", 2)
    write_sketch_png(root / "trainA" / "5005_1.png", 3)
    write_sketch_png(root / "testA" / "2002_1.png", 4)
    write_png_photo(root / "trainB" / "1001.png", 1, size=32)
    write_png_photo(root / "testB" / "2002.png", 2, size=32)
    rep = ingest_qmul(root, tmp_path / "out", opts(class_name="boot"))
    assert rep.info["layout"] == "ab"
    assert rep.issue_counts == {"sketch_without_photo": 1}
    assert Path(issue_files(rep, "sketch_without_photo")[0]).name == "5005_1.png"
    assert open_dataset(tmp_path / "out").class_names == ["boot"]
    sk = {r["id"]: r for r in rows(sketches_table(tmp_path / "out"))}
    assert sk["1001_2"]["photo_id"] == "1001" and sk["2002_1"]["photo_id"] == "2002"
    assert sk["2002_1"]["split"] == "test" and sk["1001_1"]["split"] == "train"
    photos = {r["id"]: r for r in rows(photos_table(tmp_path / "out"))}
    assert photos["2002"]["split"] == "test"


def test_qmul_v1_mat(tmp_path):
    import scipy.io

    root = tmp_path / "v1"
    root.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        sk = np.full((n, 64, 64), 255, np.uint8)
        ed = np.full((n, 64, 64), 255, np.uint8)
        for i in range(n):  # row i of both databases carries the same mark
            sk[i, 0, 0] = ed[i, 0, 0] = 10 * i + (0 if split == "train" else 100)
        scipy.io.savemat(root / f"shoes_sketch_db_{split}.mat", {"data": sk})
        scipy.io.savemat(root / f"shoes_edge_db_{split}.mat", {"data": ed})
    rep = ingest_qmul(root, tmp_path / "out", opts())
    assert rep.ok and rep.info["layout"] == "v1"
    ds = open_dataset(tmp_path / "out")
    assert ds.manifest["totals"] == {"photos": 5, "sketches": 5}
    assert ds.manifest["ingest"]["photo_kind"] == {"shoes/test": "edge_map", "shoes/train": "edge_map"}
    assert "edge map" in ds.manifest["ingest"]["photo_note"]
    photos = {r["id"]: decode_image(r["image"], "L")[0, 0] for r in rows(photos_table(tmp_path / "out"))}
    for s in rows(sketches_table(tmp_path / "out")):
        assert s["photo_id"] is not None and decode_image(s["image"], "L")[0, 0] == photos[s["photo_id"]]
    assert ds.manifest["counts"]["sketches"] == {"test": {"shoe": 2}, "train": {"shoe": 3}}


QMUL_SVG = ('<?xml version="1.0" encoding="utf-8" ?>\n<svg baseProfile="full" height="99.8" version="1.1" '
            'width="81.9" xmlns="http://www.w3.org/2000/svg" xmlns:ev="http://www.w3.org/2001/xml-events" '
            'xmlns:xlink="http://www.w3.org/1999/xlink"><defs /><rect fill="white" height="99.8" width="81.9" '
            'x="0" y="0" /><path d="M27.9, 28.3 m0.0, 3.4 l0.0, 3.4 0.4, 3.3 l0.8, 3.2 m5.0, 0.0 l2.0, 2.0" '
            'fill="none" stroke="black" stroke-width="1" /></svg>')


def test_qmul_pair_folders(tmp_path):
    root = tmp_path / "pairs"
    for i, stem in enumerate(("2482805404", "2509386515")):
        write_png_photo(root / stem / "photo_gt.png", i, size=32)
        (root / stem / "sketch_gt.svg").write_text(QMUL_SVG)
        write_sketch_png(root / stem / "sketch_gt.png", i)
    rep = ingest_qmul(root, tmp_path / "out", opts())
    assert rep.ok and rep.info["layout"] == "pairs"
    sk = sketches_table(tmp_path / "out")
    assert sk.column("photo_id").to_pylist() == ["2482805404", "2509386515"]
    polys = stroke3_to_polylines(strokes_from_arrow(sk.column("strokes"))[0])
    assert len(polys) == 2  # the 'm' moves split the path; the background rect is not a stroke
    np.testing.assert_allclose(polys[0][0], [27.9, 31.7], atol=1e-4)
    np.testing.assert_allclose(polys[1][-1], [27.9 + 0.4 + 0.8 + 5 + 2, 31.7 + 3.4 + 3.3 + 3.2 + 2], atol=1e-4)


# =========================================================================== real samples
def test_real_sketchy_subset(shared_data, tmp_path):
    rep = ingest_sketchy(shared_data / "sketchy_256_subset", tmp_path / "out", opts())
    assert rep.ok, rep.issues
    m = rep.manifest
    assert m["totals"] == {"photos": 250, "sketches": 250} and m["paired_sketches"] == 250
    assert len(m["class_names"]) == 10 and rep.info["layout"] == "flat"
    for c in m["class_names"]:
        assert sum(m["counts"]["sketches"][s].get(c, 0) for s in m["counts"]["sketches"]) == 25
    photos = {r["id"]: r["split"] for r in rows(photos_table(tmp_path / "out").select(["id", "split"]))}
    sk = sketches_table(tmp_path / "out").select(["photo_id", "split", "height"]).to_pylist()
    assert all(photos[s["photo_id"]] == s["split"] and s["height"] == 64 for s in sk)  # 256 px rasters at FAST size
    rep2 = ingest_sketchy(shared_data / "sketchy_256_subset", tmp_path / "again", opts())
    assert rep2.manifest["checksum"] == m["checksum"]


def test_real_quickdraw_simplified(shared_data, tmp_path):
    rep = ingest_quickdraw(shared_data / "quickdraw_simplified25", tmp_path / "out",
                           opts(recognized_only=True, image_size=32, render_batch=256))
    assert rep.ok, rep.issues[:5]
    assert len(rep.manifest["class_names"]) == 344
    assert rep.manifest["totals"]["sketches"] == 7920 and rep.dropped == {"not_recognized": 680}
    # coordinates stay in Quick Draw's 0..255 units and round-trip exactly
    line = (shared_data / "quickdraw_simplified25" / "data" / "cat.ndjson").read_text().splitlines()[0]
    rec = json.loads(line)
    t = sketches_table(tmp_path / "out")
    i = t.column("id").to_pylist().index(f"cat/{rec['key_id']}")
    polys = stroke3_to_polylines(strokes_from_arrow(t.column("strokes").slice(i, 1))[0])
    for got, (xs, ys) in zip(polys, rec["drawing"]):
        np.testing.assert_array_equal(got, np.array([xs, ys], np.float32).T)


def test_real_sheep_npz(shared_data, tmp_path):
    rep = ingest_quickdraw(shared_data / "aaron_sheep", tmp_path / "out", opts(max_per_class=40))
    assert rep.ok
    assert rep.manifest["counts"]["sketches"] == {"test": {"aaron_sheep": 80}, "train": {"aaron_sheep": 40}}
    assert len(rep.info["max_per_class_reached"]) == 3


def test_real_tuberlin_svg(shared_data, tmp_path):
    rep = ingest_tuberlin(shared_data / "tuberlin_svg", tmp_path / "out", opts())
    assert rep.ok, rep.issues
    assert rep.manifest["totals"]["sketches"] == 17 and rep.info["sketches_from_svg"] == 17
    assert rep.manifest["class_names"] == ["airplane", "alarm clock", "angel", "cat"]
    for s3 in strokes_from_arrow(sketches_table(tmp_path / "out").column("strokes")):
        polys = stroke3_to_polylines(s3)
        assert len(polys) >= 5
        pts = np.concatenate(polys)
        assert pts.min() >= 0 and pts.max() <= 800  # inside the 800 x 800 canvas


def test_real_qmul_pairs_and_v1(shared_data, tmp_path):
    rep = ingest_qmul(shared_data / "qmul_shoe_pairs3", tmp_path / "pairs", opts())
    assert rep.ok and rep.manifest["totals"] == {"photos": 3, "sketches": 3} and rep.manifest["paired_sketches"] == 3
    rep = ingest_qmul(shared_data / "qmul_v1_shoes", tmp_path / "v1", opts())
    assert rep.ok, rep.issues
    m = rep.manifest
    assert m["totals"] == {"photos": 419, "sketches": 419} and m["paired_sketches"] == 419
    assert m["counts"]["sketches"] == {"test": {"shoe": 115}, "train": {"shoe": 304}}
    assert m["ingest"]["photo_kind"] == {"shoes/test": "edge_map", "shoes/train": "edge_map"}
    ids = sketches_table(tmp_path / "v1").column("photo_id").to_pylist()
    assert ids[0] == "shoes/1" and ids[-1] == "shoes/419"  # names from shoes_annotation.json


# =========================================================================== CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "sbir", "ingest", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0
    for opt in ("--format", "--root", "--out", "--strict", "--report", "--class-map", "--drop-invalid",
                "--extended-photos", "--test-share", "--labelled-share", "--photos", "--recognized-only",
                "--max-per-class", "--class-name", "sketchy", "tuberlin", "quickdraw", "qmul"):
        assert opt in r.stdout


def test_cli_real_ingest_and_strict(shared_data, tmp_path):
    out = tmp_path / "shoes"
    r = run_cli("--format", "qmul", "--root", str(shared_data / "qmul_shoe_pairs3"), "--out", str(out),
                "--no-progress", "--image-size", "64")
    assert r.returncode == 0, r.stderr
    assert "3 photos, 3 sketches" in r.stdout
    assert open_dataset(out).manifest["totals"] == {"photos": 3, "sketches": 3}
    assert json.loads((tmp_path / "shoes_ingest_report.json").read_text())["n_issues"] == 0
    # strict: non-zero exit naming the first bad file
    bad = make_sketchy(tmp_path / "bad", bad=True)
    r = run_cli("--format", "sketchy", "--root", str(bad), "--out", str(tmp_path / "b"), "--strict",
                "--report", str(tmp_path / "b.json"), "--no-progress")
    assert r.returncode == 1 and "n02121808_3.jpg" in r.stderr and "corrupt_image" in r.stderr
    assert (tmp_path / "b.json").is_file() and not (tmp_path / "b").exists()
    r = run_cli("--format", "sketchy", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "missing" in r.stderr


# =========================================================================== raster -> strokes, labelled share
def _small_v1_copy(shared_data: Path, dst: Path, n_train: int = 10, n_test: int = 5, blank_row: int | None = None) -> Path:
    """The first rows of the real QMUL-V1 databases, saved the same way (keeps the test fast)."""
    import scipy.io

    dst.mkdir(parents=True)
    src = shared_data / "qmul_v1_shoes"
    for split, n in (("train", n_train), ("test", n_test)):
        sk = scipy.io.loadmat(src / f"shoes_sketch_db_{split}.mat")["data"][:n].copy()
        if blank_row is not None and split == "train":
            sk[blank_row] = 255  # a sketch with no ink at all
        scipy.io.savemat(dst / f"shoes_sketch_db_{split}.mat", {"data": sk})
        scipy.io.savemat(dst / f"shoes_edge_db_{split}.mat",
                         {"data": scipy.io.loadmat(src / f"shoes_edge_db_{split}.mat")["data"][:n]})
    return dst


def test_qmul_v1_vectorised_strokes_and_labelled_flags(shared_data, tmp_path):
    root = _small_v1_copy(shared_data, tmp_path / "v1", blank_row=9)
    rep = ingest_qmul(root, tmp_path / "out", opts(vectorise=True, labelled_share=0.3, photo_size=32, image_size=32,
                                                   line_width=1.0))
    # the blank sketch is reported, kept as a raster without strokes; everything else is traced
    assert rep.issue_counts == {"vectorise_no_strokes": 1} and "train_0010" in rep.issues[0]["detail"]
    v = rep.info["vectorise"]
    assert v["sketches"] == 15 and v["traced"] == 14 and v["no_strokes"] == 1
    assert v["no_strokes_ids"] == ["shoes/train_0010"]
    assert v["iou"]["min"] > 0.75 and v["coverage"]["mean"] > 0.97
    assert 5 <= v["strokes_per_sketch"]["median"] <= 40
    ds = open_dataset(tmp_path / "out")
    assert ds.manifest["ingest"]["vectorise"]["traced"] == 14
    sk = rows(sketches_table(tmp_path / "out"))
    strokes = strokes_from_arrow(sketches_table(tmp_path / "out").column("strokes"))
    for s, s3 in zip(sk, strokes):
        if s["id"] == "shoes/train_0010":
            assert s3 is None and not s["source"].endswith("#vectorised")
        else:
            assert s3 is not None and len(stroke3_to_polylines(s3)) >= 1 and s["source"].endswith("#vectorised")
            assert decode_image(s["image"], "L").shape == (32, 32)  # re-rendered by the project rasteriser
            assert np.abs(s3[:, :2].cumsum(0)).max() <= 256  # source pixels of the 256 px raster
    # labelled: exactly round(0.3 * 10) = 3 train photos, none in test; photos resized to 32 px
    photos = rows(photos_table(tmp_path / "out"))
    lab = [p for p in photos if p["labelled"]]
    assert len(lab) == 3 and all(p["split"] == "train" for p in lab)
    assert all((p["height"], p["width"]) == (32, 32) for p in photos)
    info = rep.info["labelled"]
    assert info["eligible_train_photos"] == 10 and info["labelled_photos"] == 3
    assert info["labelled_train_pairs"] == 3 and info["unlabelled_train_pairs"] == 7
    assert ds.manifest["ingest"]["labelled"] == info
    # deterministic, and the labelled seed changes the choice but not the split
    rep2 = ingest_qmul(root, tmp_path / "out2", opts(vectorise=True, labelled_share=0.3, photo_size=32, image_size=32,
                                                     line_width=1.0))
    assert rep2.manifest["checksum"] == rep.manifest["checksum"]
    rep3 = ingest_qmul(root, tmp_path / "out3", opts(labelled_share=0.3, labelled_seed="other"))
    lab3 = {p["id"] for p in rows(photos_table(tmp_path / "out3")) if p["labelled"]}
    assert len(lab3) == 3 and lab3 != {p["id"] for p in lab}


def test_labelled_share_is_exact_per_class(tmp_path):
    root = make_sketchy(tmp_path / "flat", published=False)
    for share, expect in ((0.0, 0), (0.5, None), (1.0, None)):
        rep = ingest_sketchy(root, tmp_path / f"out{share}", opts(test_share=0.0, labelled_share=share))
        info = rep.info["labelled"]
        # eligible: train photos with a sketch (n02691156_359 has none) = 4
        assert info["eligible_train_photos"] == 4
        # per class: airplane 2 eligible, cat 2 eligible -> round(share * 2) each
        want = {0.0: 0, 0.5: 2, 1.0: 4}[share]
        assert info["labelled_photos"] == want == rep.manifest["labelled_photos"]
        labelled = [r for r in rows(photos_table(tmp_path / f"out{share}")) if r["labelled"]]
        if share == 0.5:
            assert sorted(r["class_name"] for r in labelled) == ["airplane", "cat"]  # stratified
        pairs = info["labelled_train_pairs"] + info["unlabelled_train_pairs"]
        assert pairs == 6  # every sketch of SKETCHY has a photo


def test_vectorise_cli_options(tmp_path):
    root = make_sketchy(tmp_path / "flat", published=False)
    r = run_cli("--format", "sketchy", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress",
                "--vectorise-rdp-eps", "2")
    assert r.returncode == 2 and "without --vectorise" in r.stderr
    r = run_cli("--format", "sketchy", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress",
                "--vectorise", "--vectorise-order", "position", "--vectorise-ink-threshold", "0.5",
                "--image-size", "32", "--photo-size", "16")
    assert r.returncode == 0, r.stderr
    m = open_dataset(tmp_path / "o").manifest
    assert m["ingest"]["vectorise"]["params"]["order"] == "position"
    assert m["ingest"]["vectorise"]["traced"] == m["totals"]["sketches"] == 6
    with pytest.raises(IngestError, match="ink_threshold"):
        ingest_sketchy(root, tmp_path / "o2", opts(vectorise=True, vectorise_params={"ink_threshold": 1.5}))


# =========================================================================== real-data pipelines
PIPELINES = ("sketchy-mini", "sketchy-mini-fg", "qmul-shoe-v1", "quickdraw-sketchy")
CATEGORY_PIPELINES = ("sketchy-mini", "quickdraw-sketchy")  # the others are fine-grained only


@pytest.mark.parametrize("name", PIPELINES)
def test_real_data_pipeline_params_and_dag(name, tmp_path):
    """The pipelines' params validate and their dvc.yaml only names existing stages, params and files."""
    import yaml

    from sbir.config import load_params
    from sbir.registry import STAGES

    pdir = REPO / "pipelines" / name
    params = load_params(pdir / "params.yaml")
    assert params.pipeline == name and params.outputs_dir == f"outputs/{name}" and params.dataset_dir == f"data/{name}"
    dvc = yaml.safe_load((pdir / "dvc.yaml").read_text())
    raw = yaml.safe_load((pdir / "params.yaml").read_text())
    for stage, spec in dvc["stages"].items():
        if stage.startswith("ingest"):
            assert spec["cmd"].startswith("python -m sbir ingest ")
        elif stage == "compose":
            assert spec["cmd"].startswith("python -m sbir compose ")
        else:  # a registered stage
            assert stage in STAGES and spec["cmd"].startswith(f"python -m sbir run {stage} ")
        for dep in spec.get("deps", []):  # code deps exist; data deps are this pipeline's outputs
            assert (REPO / dep).exists() or dep.startswith((f"data/{name}", f"outputs/{name}/")), dep
        for out in spec.get("outs", []):
            assert out.startswith((f"data/{name}", f"outputs/{name}/")), out
        for group in spec.get("params", []):
            for keys in group.values():
                for key in keys:  # every declared param exists in this params.yaml
                    node = raw
                    for part in key.split("."):
                        assert part in node, f"{name}:{stage} declares param {key} missing from params.yaml"
                        node = node[part]
    student = params.distill.student.backbone
    assert student.name == "efficientnet_lite0" and student.pretrained  # every real-data run starts from ImageNet
    if name in CATEGORY_PIPELINES:
        assert "fg_evaluate" not in dvc["stages"] and params.teacher_pretrain.backbone.pretrained
        assert params.teacher_pretrain.image_size == 128 and "--photo-size 96" in dvc["stages"][
            "ingest" if name == "sketchy-mini" else "ingest_sketchy"]["cmd"]
    else:  # fine-grained: F and G's encoder from ImageNet, no teacher stage
        assert params.fgsbir_joint.init == "scratch" and params.sketch_generator.encoder_init == "imagenet"
        assert "teacher_pretrain" not in dvc["stages"] and "distill" not in dvc["stages"]
    if name == "qmul-shoe-v1":
        assert "qmul_v1_shoes" in dvc["stages"]["ingest"]["cmd"]
    if name == "quickdraw-sketchy":  # the class map is a file of the pipeline
        assert "--class-map pipelines/quickdraw-sketchy/class_map.yaml" in dvc["stages"]["ingest_quickdraw"]["cmd"]
    # dvc itself parses the file and resolves the DAG (in a copy: no lock or cache of the checkout touched)
    copy = tmp_path / "repo"
    shutil.copytree(REPO / ".dvc", copy / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(pdir, copy / "pipelines" / name, ignore=shutil.ignore_patterns("dvc.lock"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    r = subprocess.run(["dvc", "dag", "--md", f"pipelines/{name}/dvc.yaml"], cwd=copy, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("evaluate" if name in CATEGORY_PIPELINES else "fg_evaluate") in r.stdout and "ingest" in r.stdout


QMUL_TINY = {
    "ray": {"num_workers": 0},
    "sketch_generator": {"steps": 4, "batch_size": 8, "log_every": 2, "history_every": 2, "eval_pairs": 8,
                         "num_preview": 4},
    "fgsbir_joint": {"supervised_steps": 4, "joint_steps": 4, "batch_size": 8, "pseudo_batch_size": 8, "log_every": 2,
                     "history_every": 2, "discriminator": {"warmup_steps": 2},
                     "policy_gradient": {"every": 2, "batch_size": 4}},
}


@pytest.mark.slow
@pytest.mark.e2e
def test_qmul_shoe_v1_pipeline_tiny_repro(shared_data, tmp_path):
    """`dvc repro pipelines/qmul-shoe-v1/dvc.yaml` on the real QMUL-V1 sample with tiny step counts
    (local-mode Ray) in a copy of the repository: ingest -> vectorise -> ... -> fg_evaluate."""
    import yaml

    def merge(base: dict, over: dict) -> dict:
        for k, v in over.items():
            base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
        return base

    root = tmp_path / "repo"
    root.mkdir()
    for item in ("stages", "src", ".dvc", ".dvcignore", ".gitignore"):
        src = REPO / item
        if not src.exists():  # stages/ is gone once every stage runs as `python -m sbir run <stage>`
            continue
        (shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
         if src.is_dir() else shutil.copy(src, root / item))
    pdir = root / "pipelines" / "qmul-shoe-v1"
    pdir.mkdir(parents=True)
    params = merge(yaml.safe_load((REPO / "pipelines/qmul-shoe-v1/params.yaml").read_text()), QMUL_TINY)
    (pdir / "params.yaml").write_text(yaml.safe_dump(params))
    dvc_text = (REPO / "pipelines/qmul-shoe-v1/dvc.yaml").read_text()
    assert "../shared/data/qmul_v1_shoes" in dvc_text
    (pdir / "dvc.yaml").write_text(dvc_text.replace("../shared/data/qmul_v1_shoes", str(shared_data / "qmul_v1_shoes")))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SBIR_MLFLOW_DIR": str(root / "mlflow"), "SBIR_RAY_RESULTS": str(root / "ray_results"),
           "PYTHONPATH": str(root / "src")}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    r = subprocess.run(["dvc", "repro", "pipelines/qmul-shoe-v1/dvc.yaml"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rep = json.loads((root / "outputs/qmul-shoe-v1/ingest_report.json").read_text())
    assert rep["info"]["vectorise"]["traced"] == 419 and rep["info"]["labelled"]["labelled_photos"] == 91
    m = json.loads((root / "outputs/qmul-shoe-v1/fg_evaluate/metrics.json").read_text())
    assert m["num_queries"] == 115 and m["gallery_size"] == 115
    assert m["chance/acc@1"] == pytest.approx(1 / 115, abs=1e-4)
    for variant in ("supervised", "semi", "full"):
        assert 0.0 <= m[f"{variant}/acc@1"] <= m[f"{variant}/acc@5"] <= m[f"{variant}/acc@10"] <= 1.0


# =========================================================================== cross-dataset composition
def _dataset(root: Path, classes: list[str], sketches: list[tuple[str, str, str, str | None]], size: int = 16,
             photos: list[tuple[str, str, str]] = ()) -> Path:
    """A small prepared dataset: photos (id, class, split) and sketches (id, class, split, photo_id)."""
    from sbir.data.format import DatasetWriter, PhotoRow, SketchRow, encode_png

    img = encode_png(np.full((size, size), 255, np.uint8))
    with DatasetWriter(root, classes, root.name) as w:
        for pid, c, split in photos:
            w.add_photo(PhotoRow(pid, c, classes.index(c), split, img, size, size))
        for sid, c, split, photo in sketches:
            w.add_sketch(SketchRow(sid, c, classes.index(c), split, img, size, size,
                                   np.array([[0, 0, 0], [5, 5, 1]], np.float32), photo))
    return root


def test_compose_cross_dataset(tmp_path):
    """Photos and test sketches from one dataset, every sketch of the other as train sketches: labels follow
    the photo dataset's class list, ids carry their source, what is left out is counted, and mismatched
    classes or sizes stop with the dataset named."""
    from sbir.data.compose import compose
    from sbir.data.format import DatasetFormatError, open_dataset

    photos = [("p1", "cat", "train"), ("p2", "dog", "test"), ("p3", "cat", "test")]
    sk = _dataset(tmp_path / "sketchy", ["cat", "dog"], [("s1", "cat", "train", "p1"), ("s2", "dog", "test", "p2"),
                                                         ("s3", "cat", "test", "gone")], photos=photos)
    qd = _dataset(tmp_path / "qd", ["dog"], [("q1", "dog", "train", None), ("q2", "dog", "test", None)])
    report = compose(sk, qd, sk, tmp_path / "out")
    ds = open_dataset(tmp_path / "out")
    assert ds.class_names == ["cat", "dog"] and ds.manifest["composed"] == report
    rows = ds.read("sketches").to_pylist()
    assert {(r["id"], r["split"], r["label"], r["photo_id"]) for r in rows} == {
        ("qd/q1", "train", 1, None), ("qd/q2", "train", 1, None),  # every split of the train source
        ("sketchy/s2", "test", 1, "p2"), ("sketchy/s3", "test", 0, None)}  # a photo not in the set is dropped
    assert ds.read("photos").num_rows == 3
    assert report["counts"] == {"photos": 3, "train_sketches": 2, "test_sketches": 2}
    assert report["left_out"] == {"sketchy sketches not in its test split": 1}
    # The test source as a train source too gives only its sketches outside the test split (never a query)
    both = compose(sk, [sk, qd], sk, tmp_path / "both")
    rows = open_dataset(tmp_path / "both").read("sketches").to_pylist()
    assert {(r["id"], r["split"], r["photo_id"]) for r in rows} == {
        ("sketchy/s1", "train", "p1"), ("qd/q1", "train", None), ("qd/q2", "train", None),
        ("sketchy/s2", "test", "p2"), ("sketchy/s3", "test", None)}
    assert both["train_sketches_per_source"] == {str(sk): 1, str(qd): 2}
    assert both["left_out"] == {"sketchy sketches not in its test split": 0}
    bad = _dataset(tmp_path / "birds", ["bird"], [("b1", "bird", "train", None)])
    with pytest.raises(DatasetFormatError, match=r"birds.*\['bird'\] are not photo classes"):
        compose(sk, bad, sk, tmp_path / "out2")
    big = _dataset(tmp_path / "big", ["dog"], [("q1", "dog", "train", None)], size=32)
    with pytest.raises(DatasetFormatError, match="sizes differ"):
        compose(sk, big, sk, tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
