"""`sbir app` (issue #17): the draw-and-search server, its API and bad input, and a real browser (the
system Chromium driven by Playwright) drawing sketches on the canvas.

The model is trained here, in-process, in about half a minute: the teachers of a 4-class procedural
dataset (teacher_pretrain through the stage runner, local mode), served as the classifier-only model,
whose drawn sketches must rank a photo of their class first more often than chance."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sbir import search as S
from sbir.app import Catalog, CatalogError, GallerySpec, ModelSpec, parse_gallery_spec, parse_model_spec
from sbir.app.browser import find_chromium, sketches_of

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
NUM_CLASSES = 4
K = 5


# ----------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A 4-class procedural dataset (no clutter: learnable in seconds) and its teachers.pt."""
    from sbir.data.format import DatasetWriter, PhotoRow, SketchRow, encode_png
    from sbir.data.synthetic import SyntheticConfig, generate
    from sbir.stage import run_stage

    root = tmp_path_factory.mktemp("app")
    data = root / "prepared"
    ds = generate(SyntheticConfig(seed=0, num_classes=NUM_CLASSES, train_instances_per_class=60,
                                  test_instances_per_class=8, clutter=0.0))
    with DatasetWriter(data, ds.class_names, name="app-test", row_group_size=64) as w:
        for ph in ds.photos:
            w.add_photo(PhotoRow(ph.id, ph.class_name, ph.label, ph.split, encode_png(ph.image), 32, 32,
                                 labelled=ph.labelled))
        for sk in ds.sketches:
            w.add_sketch(SketchRow(sk.id, sk.class_name, sk.label, sk.split, encode_png(sk.image), 32, 32,
                                   strokes=sk.strokes, photo_id=sk.photo_id))
    params = {"seed": 0, "dataset_dir": str(data), "outputs_dir": str(root / "outputs"), "ray": {"num_workers": 0},
              "teacher_pretrain": {"backbone": {"name": "small_cnn", "width": 32, "depth": 4},
                                   "modality_backbone": {"name": "small_cnn", "width": 4, "depth": 2},
                                   "image_size": 32, "epochs": 10, "batch_size": 32}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("teacher_pretrain", ["--params", str(root / "params.yaml"), "--no-mlflow", "--restart"])
    return {"root": root, "data": data, "teachers": root / "outputs" / "teacher_pretrain" / "teachers.pt"}


@pytest.fixture(scope="module")
def catalog(trained) -> Catalog:
    return Catalog.open([ModelSpec("classifier_only", trained["teachers"])],
                        [GallerySpec("test", trained["data"]), GallerySpec("missing", trained["root"] / "nowhere")],
                        cache=trained["root"] / "cache", log=lambda m: None)


@pytest.fixture(scope="module")
def client(catalog):
    from fastapi.testclient import TestClient

    from sbir.app.server import Limits, create_app

    with TestClient(create_app(catalog, Limits(max_upload_bytes=64 * 1024, max_image_pixels=512 * 512))) as c:
        yield c


def _drawing(s3: np.ndarray, scale: float = 9.0, offset: float = 40.0) -> list:
    """A stored stroke-3 sketch as the canvas sends it: absolute points in canvas pixels, 0.1 px steps."""
    from sbir.strokes import stroke3_to_polylines

    return [[np.round(p[:, 0] * scale + offset, 1).tolist(), np.round(p[:, 1] * scale + offset, 1).tolist()]
            for p in stroke3_to_polylines(s3)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- specs, catalog, query path
def test_model_and_gallery_specs_are_parsed_and_bad_ids_refused():
    assert parse_model_spec("crossx_dfl=outputs/distill/students.pt") == \
        ModelSpec("crossx_dfl", Path("outputs/distill/students.pt"), None)
    assert parse_model_spec("fg=outputs/fgsbir_joint/checkpoints@supervised").model == "supervised"
    assert parse_model_spec("outputs/teacher_pretrain/teachers.pt").id == "teachers"
    assert parse_gallery_spec("all=data/prepared@train,test") == GallerySpec("all", Path("data/prepared"),
                                                                             ("train", "test"))
    assert parse_gallery_spec("data/prepared").splits == ("test",)
    with pytest.raises(CatalogError, match="may hold only"):
        parse_model_spec("../x=outputs/distill/students.pt")
    with pytest.raises(CatalogError, match="expected ID=PATH"):
        parse_gallery_spec("g=")


def test_drawn_strokes_reach_the_model_as_the_dataset_sketch_does(trained):
    """The canvas's strokes (any scale and offset, 0.1 px rounding) rasterise to the stored sketch."""
    from sbir.data.format import decode_image, open_dataset, strokes_from_arrow

    t = open_dataset(trained["data"]).read("sketches", columns=["strokes", "image"], splits=["test"])
    render = S.render_spec_for(trained["data"], 32)
    for i in (0, 9, 17):
        s3 = strokes_from_arrow(t.column("strokes"))[i]
        stored = decode_image(t.column("image")[i].as_py(), "L").astype(int)
        drawn = S.query_from_drawing(_drawing(s3), "canvas", render).image[0].numpy().astype(int)
        assert np.abs(drawn - stored).max() <= 3, i  # 0.1 px canvas rounding moves a few grey levels at most


def test_catalog_keeps_missing_galleries_out_with_the_reason_and_refuses_an_empty_start(catalog, tmp_path):
    opts = catalog.options()
    assert [m["id"] for m in opts["models"]] == ["classifier_only"]
    assert [g["id"] for g in opts["galleries"]] == ["test"] and opts["galleries"][0]["photos"] == NUM_CLASSES * 8
    assert "nowhere" in opts["unavailable"]["galleries"]["missing"]
    with pytest.raises(CatalogError, match="nothing to serve.*model m: checkpoint .* not found"):
        Catalog.open([ModelSpec("m", tmp_path / "none.pt")], [GallerySpec("g", tmp_path)], cache=tmp_path / "c",
                     log=lambda m: None)


# ----------------------------------------------------------------------------- the API
def test_a_drawing_returns_k_photos_with_scores_and_latency(client, trained):
    sid, cls, s3 = sketches_of(trained["data"], per_class=1)[0]
    r = client.post("/api/search/drawing", json={"model": "classifier_only", "gallery": "test", "k": K,
                                                 "drawing": _drawing(s3)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == K and [h["rank"] for h in body["hits"]] == list(range(1, K + 1))
    assert all(h["image"].startswith("data:image/png;base64,") for h in body["hits"])
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert 0 < body["latency_ms"]["search"] <= body["latency_ms"]["server"]
    assert body["query"]["kind"] == "ndjson" and body["query"]["image"].startswith("data:image/png")
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="pad"' in page.text


def test_uploads_of_each_kind_are_searched(client, trained):
    from sbir.data.format import decode_image, open_dataset

    t = open_dataset(trained["data"]).read("sketches", columns=["image"], splits=["test"])
    png = _png(decode_image(t.column("image")[0].as_py(), "L"))
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
           b'<path d="M 10 10 L 90 10 L 90 90 Z" fill="none" stroke="black"/></svg>')
    ndjson = b'{"word": "x"}\n{"drawing": [[[10, 60, 110], [10, 80, 10]]]}\n'
    for name, data, extra in (("q.png", png, ""), ("q.svg", svg, ""), ("q.ndjson", ndjson, "&ndjson_line=2")):
        r = client.post(f"/api/search/upload?model=classifier_only&gallery=test&k=3&filename={name}{extra}",
                        content=data)
        assert r.status_code == 200, (name, r.text)
        assert len(r.json()["hits"]) == 3


BAD_REQUESTS = [
    # (what, endpoint, payload, status, message)
    ("empty canvas", "drawing", {"drawing": []}, 400, "canvas is empty"),
    ("strokes without points", "drawing", {"drawing": [[[], []], [[], []]]}, 400, "canvas is empty"),
    ("malformed strokes", "drawing", {"drawing": [[[1, 2], [3]]]}, 400, "differ in length"),
    ("not a list", "drawing", {"drawing": "strokes"}, 422, "drawing: Input should be a valid list"),
    ("k too large", "drawing", {"k": 51, "drawing": [[[1, 2], [3, 4]]]}, 422, "k must be between 1 and 50"),
    ("unknown gallery", "drawing", {"gallery": "../../etc", "drawing": [[[1, 2], [3, 4]]]}, 404,
     "no gallery '../../etc'; this server offers: test"),
    ("missing gallery", "drawing", {"gallery": "missing", "drawing": [[[1, 2], [3, 4]]]}, 404,
     "gallery 'missing' is not available: gallery"),
    ("unknown model", "drawing", {"model": "nope", "drawing": [[[1, 2], [3, 4]]]}, 404, "no model 'nope'"),
    ("huge upload", "upload:big.png", b"\x89PNG" + b"0" * (64 * 1024), 413, "limit is 65,536 bytes"),
    ("huge drawing", "drawing", {"drawing": [[list(range(20000)), list(range(20000))]]}, 413, "limit"),
    ("wrong type", "upload:notes.txt", b"hello", 415, "notes.txt: unsupported file type"),
    ("path as file name", "upload:../../etc/passwd", b"root:x:0:0", 415, "passwd: unsupported file type"),
    ("corrupt png", "upload:q.png", b"\x89PNG\r\n\x1a\nnot really", 400, "q.png: cannot decode image"),
    ("huge canvas png", "upload:q.png", "big-canvas", 400, "more than the 262144 allowed"),
    ("empty file", "upload:q.svg", b"", 400, "q.svg: the file is empty"),
    ("several ndjson lines", "upload:q.ndjson", b'{"drawing": [[[1],[2]]]}\n{"drawing": [[[1],[2]]]}\n', 400,
     "ndjson line"),
]


@pytest.mark.parametrize("what,endpoint,payload,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_message_the_server_keeps_serving_and_nothing_is_written(
        client, trained, monkeypatch, tmp_path, what, endpoint, payload, status, message):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where a spooled upload would land
    cache_before = sorted((trained["root"] / "cache").iterdir())
    if endpoint == "drawing":
        r = client.post("/api/search/drawing", json={"model": "classifier_only", "gallery": "test", "k": K, **payload})
    else:
        if payload == "big-canvas":  # small file, 1000 x 1000 canvas
            payload = _png(np.full((1000, 1000), 255, np.uint8))
        r = client.post(f"/api/search/upload?model=classifier_only&gallery=test&filename={endpoint[7:]}",
                        content=payload)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert sorted((trained["root"] / "cache").iterdir()) == cache_before and not any(temp.iterdir())
    ok = client.post("/api/search/drawing", json={"model": "classifier_only", "gallery": "test", "k": 2,
                                                  "drawing": [[[0, 10, 20], [0, 20, 0]]]})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 2


# ----------------------------------------------------------------------------- the command line
def test_app_command_help_binds_localhost_and_make_target(tmp_path):
    from sbir.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and args.model is None and args.gallery is None
    out = subprocess.run([sys.executable, "-m", "sbir", "app", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "127.0.0.1" in out.stdout and "ID=CHECKPOINT[@MODEL]" in out.stdout
    makefile = (REPO / "Makefile").read_text()
    assert "\napp: $(STAMP)\n" in makefile
    # nothing to serve (no outputs in an empty folder): one clear line, exit 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "sbir", "app", "--cache", str(tmp_path / "c")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "sbir app: error: nothing to serve" in proc.stderr
    assert "Traceback" not in proc.stderr and "make repro" in proc.stderr


# ----------------------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        msg = "no system Chromium (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def test_browser_draws_sketches_and_the_drawn_class_ranks_first(chromium, catalog, tmp_path):
    from sbir.app.browser import chromium_page, draw_stroke3, search_drawn
    from sbir.app.server import Limits, create_app, serve_in_background

    sketches = sketches_of(catalog.galleries["test"].path, per_class=2)
    limits = Limits(max_upload_bytes=64 * 1024)
    t0 = time.perf_counter()
    with serve_in_background(create_app(catalog, limits)) as base, chromium_page(executable=chromium) as page:
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']")
        # bad input first: a clear message on the page, and the server keeps serving
        page.uncheck("#live")
        page.click("#search")
        page.wait_for_selector("#message.error")
        assert "canvas is empty" in page.inner_text("#message")
        page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
        page.wait_for_function("document.querySelector('#message').textContent.includes('unsupported file type')")
        page.set_input_files("#upload", files=[{"name": "big.png", "mimeType": "image/png",
                                                "buffer": b"0" * (limits.max_upload_bytes + 1)}])
        page.wait_for_function("document.querySelector('#message').textContent.includes('the limit is')")

        top1 = []
        for sid, cls, s3 in sketches:
            result = search_drawn(page, s3, K)
            assert len(result["classes"]) == K, sid
            assert page.inner_text("#message") == ""  # the earlier error is gone
            top1.append(result["classes"][0] == cls)
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        # undo removes the last stroke; the result grid is still there until the next search
        draw_stroke3(page, sketches[0][2])
        strokes_before = page.evaluate("strokes.length")
        page.click("#undo")
        assert page.evaluate("strokes.length") == strokes_before - 1
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "app-browser-test.png")
    rate = sum(top1) / len(top1)
    (ARTIFACTS / "app-browser-test.json").write_text(json.dumps(
        {"drawn": len(top1), "top1_correct": sum(top1), "chance": 1 / NUM_CLASSES,
         "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    assert rate > 1 / NUM_CLASSES, f"drawn sketches rank their class first in {sum(top1)}/{len(top1)} searches"
