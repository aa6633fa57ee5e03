"""MLflow tracking-server round trip: a real ``mlflow server`` (SQLite backend and artifacts in tmp),
a tiny stage logging to it through ``SBIR_MLFLOW_URI=http://...``, then the run's params, metrics and
artifacts read back over the REST API with plain HTTP (no MLflow client on the reading side). The
``mlflow_server`` fixture is in tests/conftest.py (tests/mlflow_rest.py); tests/test_pipeline_e2e.py
uses it for a whole ``dvc repro``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from mlflow_rest import get_json as _get, post_json as _post

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_stage_logs_to_tracking_server_and_reads_back_over_rest(mlflow_server, tiny_dataset, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(dataset_dir=str(tiny_dataset), outputs_dir=str(tmp_path / "outputs"), pipeline="server-test")
    params["ray"]["num_workers"] = 0
    params["teacher_pretrain"].update(epochs=2, batch_size=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, SBIR_MLFLOW_URI=mlflow_server, SBIR_RAY_RESULTS=str(tmp_path / "ray_results"),
               SBIR_LOG_DIR=str(tmp_path / "logs"), PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "sbir", "run", "teacher_pretrain", "--params",
                           str(tmp_path / "params.yaml")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # read everything back with plain HTTP against the REST API
    exp = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="server-test")["experiment"]
    runs = _post(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["sbir.stage"] == "teacher_pretrain" and tags["sbir.params_hash"]
    got_params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert got_params["teacher_pretrain.epochs"] == "2" and got_params["ray.num_workers"] == "0"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    local = json.loads((tmp_path / "outputs" / "teacher_pretrain" / "metrics.json").read_text())
    assert metrics["photo_teacher_test_acc"] == pytest.approx(local["photo_teacher_test_acc"], abs=1e-4)  # file rounds
    # per-epoch curve: one point per epoch
    hist = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="photo_ce")["metrics"]
    assert sorted(int(m["step"]) for m in hist) == [0, 1]
    # artifacts: listed and downloadable, identical to the stage's output files
    listed = {f["path"] for f in _get(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=run_id)["files"]}
    assert {"metrics.json", "teachers.pt", "curves.png", "logs"} <= listed, listed
    query = urllib.parse.urlencode({"run_id": run_id, "path": "logs"})
    logs = {f["path"] for f in _get(mlflow_server, f"/api/2.0/mlflow/artifacts/list?{query}")["files"]}
    assert logs == {"logs/teacher_pretrain.log"}, logs  # the stage's log, sent once the run had ended
    url = f"{mlflow_server}/get-artifact?" + urllib.parse.urlencode({"path": "metrics.json", "run_uuid": run_id})
    with urllib.request.urlopen(url, timeout=30) as r:
        assert json.loads(r.read()) == local
