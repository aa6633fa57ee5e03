"""A real ``mlflow server`` for tests (SQLite backend and proxied artifacts in a folder) and plain-HTTP
helpers for its REST API, so the reading side needs no MLflow client. The ``mlflow_server`` fixture
(tests/conftest.py) wraps :func:`running_server`; tests/test_mlflow_server.py and
tests/test_pipeline_e2e.py read runs back with :func:`get_json`, :func:`post_json` and friends."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90


class ServerError(RuntimeError):
    """The server exited or did not answer /health in time (the message ends with its log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(directory: Path, start_timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """``mlflow server`` on a free port of 127.0.0.1, its store (``server.db``), artifacts (``artifacts/``)
    and log (``server.log``) in ``directory``; yields its base URL once /health answers, and stops it
    (its whole process group) whatever happens."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / "server.log"
    log = log_path.open("w")
    # without the server's job runner (a Huey consumer pool for MLflow's GenAI jobs, which tracking and
    # artifacts do not use): half the start-up time and two processes instead of ten
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{directory / 'server.db'}",
         "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise ServerError(f"mlflow server not up after {start_timeout_s} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker processes
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()


def get_json(base: str, path: str, **query) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post_json(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def search_runs(base: str, experiment_name: str) -> list[dict]:
    """Every run of an experiment (stage runs and the runs that group them), over REST."""
    exp = get_json(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment_name)["experiment"]
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
        if token:
            body["page_token"] = token
        page = post_json(base, "/api/2.0/mlflow/runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def list_artifacts(base: str, run_id: str, path: str | None = None) -> dict[str, bool]:
    """A run's artifacts directly under ``path`` (the root when None): ``{path: is_dir}``."""
    query = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
    files = get_json(base, f"/api/2.0/mlflow/artifacts/list?{query}").get("files", [])
    return {f["path"]: bool(f.get("is_dir")) for f in files}


def download_artifact(base: str, run_id: str, path: str) -> bytes:
    url = f"{base}/get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()
