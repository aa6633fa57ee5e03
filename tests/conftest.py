"""Shared fixtures: isolated MLflow store and Ray results per test session, the real-data folder,
a tiny prepared dataset, and a real MLflow tracking server (tests/mlflow_rest.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from mlflow_rest import ServerError, running_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_stores(tmp_path_factory):
    """Keep tests out of the repository's mlflow/, ray_results/ and logs/."""
    base = tmp_path_factory.mktemp("stores")
    old = {k: os.environ.get(k) for k in ("SBIR_MLFLOW_DIR", "SBIR_RAY_RESULTS", "SBIR_LOG_DIR")}
    os.environ["SBIR_MLFLOW_DIR"] = str(base / "mlflow")
    os.environ["SBIR_RAY_RESULTS"] = str(base / "ray_results")
    os.environ["SBIR_LOG_DIR"] = str(base / "logs")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def shared_data_dir() -> Path | None:
    """The real samples (../shared/data or $SBIR_SHARED_DATA); None if absent."""
    d = Path(os.environ.get("SBIR_SHARED_DATA", REPO.parent / "shared" / "data"))
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real data samples: fail loudly in CI when missing, skip elsewhere."""
    d = shared_data_dir()
    if d is None:
        msg = "real data samples not found (../shared/data or $SBIR_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A tiny embedded dataset (4 classes) written in the Parquet format."""
    from sbir.data.format import DatasetWriter, PhotoRow, SketchRow, encode_png
    from sbir.data.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("data") / "prepared"
    ds = generate(SyntheticConfig(seed=0, num_classes=4, train_instances_per_class=24, test_instances_per_class=8))
    with DatasetWriter(out, ds.class_names, name="tiny", row_group_size=32) as w:
        for ph in ds.photos:
            w.add_photo(PhotoRow(ph.id, ph.class_name, ph.label, ph.split, encode_png(ph.image), 32, 32,
                                 labelled=ph.labelled))
        for sk in ds.sketches:
            w.add_sketch(SketchRow(sk.id, sk.class_name, sk.label, sk.split, encode_png(sk.image), 32, 32,
                                   strokes=sk.strokes, photo_id=sk.photo_id))
    return out


@pytest.fixture()
def mlflow_server(tmp_path) -> Iterator[str]:
    """A real ``mlflow server`` on a free port (SQLite store and artifacts under tmp_path/mlflow_server);
    yields its base URL (``http://127.0.0.1:<port>``) and stops it, its whole process group, whatever happens."""
    try:
        with running_server(tmp_path / "mlflow_server") as base:
            yield base
    except ServerError as exc:
        pytest.fail(str(exc))
