"""`sbir search`: exact streamed top-k, query readers, galleries, the embedding cache, the CLI."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sbir import search as S
from sbir.cli import main

SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100" viewBox="0 0 100 100">
<rect width="100" height="100" fill="white"/>
<path d="M 10 10 L 90 10 L 90 90 C 60 95 40 95 10 90 Z" fill="none" stroke="black"/>
<polyline points="20,50 50,20 80,50" fill="none" stroke="black"/>
</svg>"""
NDJSON = {"word": "cat", "key_id": "1", "recognized": True,
          "drawing": [[[10, 60, 110, 10], [10, 80, 10, 10]], [[30, 90], [120, 120]]]}


# ----------------------------------------------------------------------------- tiny checkpoints
def _students(path: Path, seed: int, image_size: int | None = 32) -> Path:
    """A students.pt in distill's format with random weights; teachers.pt (its image size) beside it."""
    from sbir.config import DistillParams
    from sbir.models.backbones import EncoderPair

    torch.manual_seed(seed)
    p = DistillParams.model_validate({"student": {"backbone": {"name": "small_cnn", "width": 4, "depth": 2},
                                                  "embed_dim": 8, "head": "mlp"}})
    pair = EncoderPair(p.student.backbone, p.student.embed_dim, p.student.head)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"students": pair.state_dict(), "params": p.model_dump(mode="json"), "num_classes": 4,
                "round": 0, "source": "reconstructed"}, path)
    if image_size:
        t = path.parent.parent / "teacher_pretrain" / "teachers.pt"
        t.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": {"image_size": image_size}}, t)
    return path


def _fg_checkpoints(folder: Path) -> Path:
    """fgsbir_joint-style checkpoints/<variant>.pt (random weights) plus the G/D file it skips."""
    from sbir.config import BackboneParams
    from sbir.models.backbones import EncoderPair

    folder.mkdir(parents=True, exist_ok=True)
    arch = {"backbone": BackboneParams(name="small_cnn", width=4, depth=2).model_dump(mode="json"),
            "embed_dim": 8, "head": "linear", "image_size": 32}
    for i, name in enumerate(("supervised", "semi")):
        torch.manual_seed(10 + i)
        pair = EncoderPair(BackboneParams.model_validate(arch["backbone"]), 8, "linear")
        torch.save({"model": pair.state_dict(), "arch": arch, "variant": name, "kind": name}, folder / f"{name}.pt")
    torch.save({"discriminator": {}}, folder / "semi_generator_discriminator.pt")
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _students(tmp_path_factory.mktemp("run") / "outputs" / "distill" / "students.pt", seed=0)


@pytest.fixture(scope="module")
def test_sketch(tiny_dataset):
    """(strokes, stored image) of the first test sketch of the tiny dataset."""
    from sbir.data.format import decode_image, open_dataset, strokes_from_arrow

    t = open_dataset(tiny_dataset).read("sketches", columns=["strokes", "image", "class_name"], splits=["test"])
    return strokes_from_arrow(t.column("strokes"))[0], decode_image(t.column("image")[0].as_py(), "L"), \
        t.column("class_name")[0].as_py()


def _brute(q: torch.Tensor, g: torch.Tensor, k: int):
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    return sims.topk(min(k, len(g)), dim=1)


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("max_elements", [3 * 97, 3 * 1000, 1 << 24])  # many blocks, one boundary, one block
def test_topk_matches_brute_force_across_chunk_boundaries(max_elements):
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(3, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    v, i = S.topk_cosine(q, g, 25, max_elements=max_elements)
    bv, bi = _brute(q, g, 25)
    assert torch.equal(i, bi)
    assert torch.allclose(v, bv, atol=1e-6)
    # the same gallery as an iterable of uneven chunks (as a cache streams it)
    parts = [g[:1], g[1:333], g[333:334], g[334:]]
    v2, i2 = S.topk_cosine(q, iter(parts), 25, max_elements=max_elements)
    assert torch.equal(i2, bi) and torch.allclose(v2, bv, atol=1e-6)


def test_topk_ties_are_ordered_by_gallery_index():
    # one-hot rows give exact scores (0 or 1) whatever the summation order: many exact ties
    g = torch.eye(4)[torch.tensor([2, 0, 1, 0, 3, 0, 0, 1, 0, 2])]
    q = torch.eye(4)[[0, 1]]
    for max_elements in (2, 6, 1000):  # blocks of 1, 3 and all rows
        v, i = S.topk_cosine(q, g, 6, max_elements=max_elements)
        assert i[0].tolist() == [1, 3, 5, 6, 8, 0]  # the five 1.0 rows by index, then the first 0.0 row
        assert v[0].tolist() == [1, 1, 1, 1, 1, 0]
        assert i[1].tolist() == [2, 7, 0, 1, 3, 4]


def test_topk_k_larger_than_gallery_and_bad_input():
    g = torch.randn(5, 4)
    v, i = S.topk_cosine(torch.randn(2, 4), g, 50)
    assert v.shape == i.shape == (2, 5) and sorted(i[0].tolist()) == [0, 1, 2, 3, 4]
    assert torch.all(v[:, :-1] >= v[:, 1:])
    with pytest.raises(S.SearchError, match="empty"):
        S.topk_cosine(torch.randn(1, 4), iter([]), 3)
    with pytest.raises(S.SearchError, match="k must be"):
        S.topk_cosine(torch.randn(1, 4), g, 0)
    with pytest.raises(S.SearchError, match="does not match query dim"):
        S.topk_cosine(torch.randn(1, 3), g, 2)


def test_topk_matches_faiss_index_flat_ip():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5000, 32)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((8, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(32)
    index.add(g)
    fv, fi = index.search(q, 10)
    v, i = S.topk_cosine(q, g, 10, max_elements=8 * 700)
    assert np.array_equal(i.numpy(), fi)
    assert np.allclose(v.numpy(), fv, atol=1e-5)


# ----------------------------------------------------------------------------- queries
def test_every_query_kind_is_read_and_vector_ones_render_like_the_dataset(tmp_path, tiny_dataset, test_sketch):
    strokes, stored, _ = test_sketch
    render = S.render_spec_for(tiny_dataset, fallback_size=64)
    assert render.size == 32  # the dataset's sketch size, not the fallback
    np.save(tmp_path / "q.npy", strokes)
    q = S.load_query(tmp_path / "q.npy", render)
    assert q.kind == "stroke3" and q.image.dtype == torch.uint8
    # a stroke-3 query goes through the same rasteriser as the training sketches: the same pixels
    assert np.array_equal(q.image[0].numpy(), stored)

    Image.fromarray(stored).save(tmp_path / "q.png")
    rgba = np.zeros((20, 20, 4), np.uint8)  # transparent background + one black line -> white + black
    rgba[10, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "q.svg").write_text(SVG)
    (tmp_path / "one.ndjson").write_text(json.dumps(NDJSON) + "\n")
    (tmp_path / "many.ndjson").write_text("\n".join(json.dumps({**NDJSON, "key_id": str(i)}) for i in range(3)))
    png = S.load_query(tmp_path / "q.png", render)
    assert png.kind == "raster" and np.array_equal(png.image[0].numpy(), stored)
    alpha = S.load_query(tmp_path / "alpha.png", render).image[0].numpy()
    assert alpha[0, 0] == 255 and alpha[10, 5] == 0
    svg = S.load_query(tmp_path / "q.svg", render)
    nd = S.load_query(tmp_path / "one.ndjson", render)
    nd3 = S.load_query(tmp_path / "many.ndjson", render, ndjson_line=3)
    for item, kind in ((svg, "svg"), (nd, "ndjson"), (nd3, "ndjson")):
        assert item.kind == kind and item.image.shape == (1, 32, 32)
        assert (item.image < 128).sum() > 10 and (item.image == 255).sum() > 300  # ink on white
    assert nd3.name.endswith("many.ndjson:3")
    assert np.array_equal(nd.image.numpy(), nd3.image.numpy())


@pytest.mark.parametrize("name,content,message", [
    ("bad.png", b"\x89PNG\r\n\x1a\nnot really", "cannot decode image"),
    ("bad.svg", b"<svg><path d='M 0 0 L", "not a parsable SVG"),
    ("empty.svg", b"<svg xmlns='http://www.w3.org/2000/svg'><rect width='5' height='5'/></svg>", "no strokes"),
    ("bad.ndjson", b'{"drawing": [[[1, 2], [3', "malformed ndjson line"),
    ("nodraw.ndjson", b'{"word": "cat"}\n', "no 'drawing' field"),
    ("twolines.ndjson", b'{"drawing": []}\n{"drawing": []}\n', "--ndjson-line"),
    ("emptydraw.ndjson", b'{"drawing": []}\n', "no points"),
    ("shape.npy", None, r"shape \(N, 3\)"),
    ("pen.npy", None, "pen value"),
    ("q.txt", b"hello", "unknown query type"),
])
def test_unreadable_queries_name_the_file_and_the_problem(tmp_path, name, content, message):
    f = tmp_path / name
    if name == "shape.npy":
        np.save(f, np.zeros((5, 2), np.float32))
    elif name == "pen.npy":
        np.save(f, np.array([[0, 0, 0], [1, 1, 0.5]], np.float32))
    else:
        f.write_bytes(content)
    with pytest.raises(S.SearchError, match=message) as exc:
        S.load_query(f)
    assert name in str(exc.value)


def test_missing_query_and_ndjson_line_out_of_range(tmp_path):
    with pytest.raises(S.SearchError, match="not found"):
        S.load_query(tmp_path / "nope.svg")
    (tmp_path / "one.ndjson").write_text(json.dumps(NDJSON))
    with pytest.raises(S.SearchError, match="no line 4"):
        S.load_query(tmp_path / "one.ndjson", ndjson_line=4)


# ----------------------------------------------------------------------------- galleries, cache
def _photo_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (24 + j * 8, 40, 3), dtype=np.uint8)).save(root / cls / f"{j}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "top.JPG").write_bytes(buf.getvalue())
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "notes.txt").write_text("not a photo")
    (root / ".hidden.png").write_bytes(b"x")
    return root


def test_folder_gallery_skips_and_counts_unreadable_photos(tmp_path, ckpt):
    g = S.open_gallery(_photo_folder(tmp_path / "photos"))
    assert isinstance(g, S.FolderGallery) and len(g) == 8 and g.ignored == 1
    enc = S.load_encoder(ckpt)
    logs: list[str] = []
    cache = S.embed_gallery(enc, g, tmp_path / "cache", progress=False, log=logs.append)
    assert len(cache) == 7 and cache.meta["skipped"] == 1
    assert "broken.jpg" in cache.meta["skipped_examples"][0]
    assert any("skipped 1 unreadable" in m for m in logs)
    rows = cache.rows(range(7))
    assert [r["id"] for r in rows] == ["cats/0.png", "cats/1.png", "cats/2.png", "dogs/0.png", "dogs/1.png",
                                       "dogs/2.png", "top.JPG"]
    assert rows[0]["class_name"] == "cats" and rows[-1]["class_name"] is None
    with pytest.raises(S.SearchError, match="empty"):
        S.open_gallery((tmp_path / "none").mkdir() or tmp_path / "none")


def test_cache_is_reused_and_another_checkpoints_cache_is_an_error(tmp_path, tiny_dataset, ckpt):
    enc = S.load_encoder(ckpt)
    gallery = S.open_gallery(tiny_dataset)
    logs: list[str] = []
    first = S.embed_gallery(enc, gallery, tmp_path / "c", progress=False, log=logs.append)
    assert len(first) == 4 * 8 and first.meta["checkpoint_sha256"] == S.file_sha256(ckpt)
    mtime = first.path.stat().st_mtime_ns
    again = S.embed_gallery(enc, S.open_gallery(tiny_dataset), tmp_path / "c", progress=False, log=logs.append)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime and "cache hit" in logs[-1]
    # the cached embeddings are the encoder's embeddings of the test photos, in dataset order
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset

    photos = load_image_set(open_dataset(tiny_dataset), "photos", ["test"])
    assert torch.allclose(first.read_all(), enc.embed_photos(photos.images), atol=1e-5)
    assert [r["id"] for r in first.rows([0, 31])] == [photos.ids[0], photos.ids[31]]

    other = S.load_encoder(_students(tmp_path / "other" / "distill" / "students.pt", seed=1))
    # in a cache folder, another checkpoint gets its own file
    own = S.embed_gallery(other, gallery, tmp_path / "c", progress=False, log=logs.append)
    assert own.path != first.path and len(list((tmp_path / "c").glob("*.parquet"))) == 2
    # an explicitly named cache file made by another checkpoint: a clear error, untouched file
    with pytest.raises(S.CacheMismatchError, match="embedded by .*students.pt.*checkpoint_sha256"):
        S.embed_gallery(other, gallery, first.path, progress=False, log=logs.append)
    assert first.path.stat().st_mtime_ns == mtime
    # ...and of another gallery split
    with pytest.raises(S.CacheMismatchError, match="gallery"):
        S.embed_gallery(enc, S.open_gallery(tiny_dataset, ["train"]), first.path, progress=False, log=logs.append)
    rebuilt = S.embed_gallery(other, gallery, first.path, rebuild=True, progress=False, log=logs.append)
    assert rebuilt.meta["checkpoint_sha256"] == S.file_sha256(other.checkpoint)
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(S.SearchError, match="junk.parquet: not a readable Parquet"):
        S.embed_gallery(enc, gallery, tmp_path / "junk.parquet", progress=False, log=logs.append)


def test_search_agrees_with_brute_force_over_the_cache(tmp_path, tiny_dataset, ckpt, test_sketch):
    enc = S.load_encoder(ckpt)
    cache = S.embed_gallery(enc, S.open_gallery(tiny_dataset), tmp_path, progress=False, log=lambda m: None)
    np.save(tmp_path / "a.npy", test_sketch[0])
    queries = [S.load_query(tmp_path / "a.npy", S.render_spec_for(tiny_dataset, 32))] * 2
    hits = S.search(enc, queries, cache, k=5, max_elements=2 * 7)  # blocks of 7 rows
    bv, bi = _brute(S.embed_queries(enc, queries), cache.read_all(), 5)
    assert [h.row for h in hits[0]] == bi[0].tolist() == [h.row for h in hits[1]]
    assert np.allclose([h.score for h in hits[0]], bv[0].numpy(), atol=1e-5)
    assert hits[0][0].rank == 1 and hits[0][0].class_name is not None


# ----------------------------------------------------------------------------- encoders, CLI
def test_encoders_from_each_checkpoint_kind(tmp_path, ckpt):
    folder = _fg_checkpoints(tmp_path / "checkpoints")
    assert set(S.list_models(folder)) == {"supervised", "semi"}
    assert S.load_encoder(folder).name == "semi"  # the headline model by default
    sup = S.load_encoder(folder, "supervised")
    assert sup.kind == "fine_grained" and sup.image_size == 32 and sup.embed_dim == 8
    with pytest.raises(S.SearchError, match="no model 'full'.*supervised"):
        S.load_encoder(folder, "full")
    bare = _students(tmp_path / "bare" / "students.pt", seed=2, image_size=None)
    with pytest.raises(S.SearchError, match="--image-size"):
        S.load_encoder(bare)
    assert S.load_encoder(bare, image_size=48).image_size == 48
    with pytest.raises(S.SearchError, match="not found"):
        S.load_encoder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(S.SearchError, match="junk.pt: cannot read the checkpoint"):
        S.load_encoder(tmp_path / "junk.pt")


def test_cli_end_to_end(tmp_path, tiny_dataset, ckpt, test_sketch, capsys):
    strokes, _, cls = test_sketch
    np.save(tmp_path / "q.npy", strokes)
    (tmp_path / "q.svg").write_text(SVG)
    argv = ["search", str(tmp_path / "q.npy"), str(tmp_path / "q.svg"), "--gallery", str(tiny_dataset),
            "--checkpoint", str(ckpt), "-k", "4", "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv + ["--grid", str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert "query " + str(tmp_path / "q.npy") in out and out.count("\n   4  ") == 2
    with Image.open(tmp_path / "grid.png") as im:
        assert im.width > 300 and im.height > 150
    assert main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["gallery_size"] == 32 and [len(r["hits"]) for r in res["results"]] == [4, 4]
    assert res["results"][0]["hits"][0]["rank"] == 1
    # fine-grained folder + --model, over a photo folder
    folder = _fg_checkpoints(tmp_path / "checkpoints")
    photos = _photo_folder(tmp_path / "photos")
    assert main(["search", str(tmp_path / "q.svg"), "--gallery", str(photos), "--checkpoint", str(folder),
                 "--model", "supervised", "--cache", str(tmp_path / "cache"), "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "supervised" and res["gallery_size"] == 7 and len(res["results"][0]["hits"]) == 7
    # errors: exit code 2 and a message naming the file
    assert main(["search", str(tmp_path / "q.npy"), "--gallery", str(tiny_dataset),
                 "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt not found" in capsys.readouterr().err
    (tmp_path / "bad.svg").write_text("<svg")
    assert main(["search", str(tmp_path / "bad.svg"), "--gallery", str(tiny_dataset), "--checkpoint", str(ckpt)]) == 2
    assert "bad.svg: not a parsable SVG" in capsys.readouterr().err


def test_help_explains_with_an_example():
    out = subprocess.run([sys.executable, "-m", "sbir.search", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for word in ("examples:", "--ndjson-line", "--grid", "--cache", "stroke-3", "--model"):
        assert word in out.stdout


def test_real_tuberlin_svg_and_quickdraw_line_as_queries(shared_data):
    """Real files people drew: a TU-Berlin SVG (group transforms, Beziers) and a Quick Draw ndjson line."""
    svg = sorted((shared_data / "tuberlin_svg" / "cat").glob("*.svg"))[0]
    ndjson = shared_data / "quickdraw_simplified25" / "data" / "cat.ndjson"
    render = S.RenderSpec(size=64, line_width=1.5, padding=0.05)
    for q in (S.load_query(svg, render), S.load_query(ndjson, render, ndjson_line=7)):
        ink = q.image[0] < 128
        assert q.image.shape == (1, 64, 64) and ink.sum() > 50
        rows, cols = torch.nonzero(ink, as_tuple=True)
        # fitted into the canvas minus the padding, like the dataset's sketches
        assert rows.min() >= 2 and cols.min() >= 2 and rows.max() <= 61 and cols.max() <= 61
    assert S.load_query(ndjson, render, ndjson_line=7).name.endswith("cat.ndjson:7")
