"""The one module that talks to MLflow.

Store: a SQLite database ``mlflow/mlflow.db`` in the repository with artifacts in ``mlflow/artifacts``
(override with the ``SBIR_MLFLOW_URI`` environment variable, e.g. an ``http://`` server). One experiment
per pipeline; one run per stage execution, tagged with the git commit, stage, params hash and the
dataset checksum. The driver creates the store, the experiment and the run before any Ray worker
starts (several processes creating one SQLite store race); workers get a picklable
:class:`RunHandle` and only rank 0 logs through it.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
MLFLOW_DIR_ENV = "SBIR_MLFLOW_DIR"
MLFLOW_URI_ENV = "SBIR_MLFLOW_URI"


def mlflow_dir() -> Path:
    return Path(os.environ.get(MLFLOW_DIR_ENV, REPO_ROOT / "mlflow")).resolve()


def tracking_uri() -> str:
    """Absolute tracking URI: SBIR_MLFLOW_URI if set, else the SQLite store under mlflow/."""
    if os.environ.get(MLFLOW_URI_ENV):
        return os.environ[MLFLOW_URI_ENV]
    d = mlflow_dir()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def get_or_create_experiment(name: str) -> str:
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not os.environ.get(MLFLOW_URI_ENV):
        artifact_location = (mlflow_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


@dataclass(frozen=True)
class RunHandle:
    """Picklable reference to one MLflow run; safe to send to Ray workers."""

    tracking_uri: str
    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.tracking import MlflowClient

        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        if items:
            MlflowClient(tracking_uri=self.tracking_uri).log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        if Path(path).is_dir():
            client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            client.log_artifact(self.run_id, str(path), artifact_path)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        items = [Param(k.replace("@", "_at_"), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(self.run_id, params=items[i : i + 100])

    def log_dict(self, data: Any, name: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=self.tracking_uri).log_dict(self.run_id, data, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))


# Runs created by stage_run inside a ``with default_parent(run_id)`` block become children of that run
# (a sweep trial's stages nest under the trial's run without the stage code knowing about sweeps).
_DEFAULT_PARENT: str | None = None


@contextmanager
def default_parent(run_id: str | None) -> Iterator[None]:
    """Make ``run_id`` the parent of every :func:`stage_run` opened inside the block (unless one is given)."""
    global _DEFAULT_PARENT
    previous, _DEFAULT_PARENT = _DEFAULT_PARENT, run_id
    try:
        yield
    finally:
        _DEFAULT_PARENT = previous


@contextmanager
def stage_run(experiment: str, stage: str, params: Mapping[str, Any], params_hash: str,
              dataset_checksum: str | None = None, parent_run_id: str | None = None,
              run_name: str | None = None, extra_tags: Mapping[str, str] | None = None) -> Iterator[RunHandle]:
    """Create an MLflow run for one stage execution; marks it FINISHED or FAILED on exit."""
    client = _client()
    exp_id = get_or_create_experiment(experiment)
    tags = {
        "sbir.stage": stage,
        "sbir.git_commit": git_commit(),
        "sbir.params_hash": params_hash,
        "sbir.dataset_checksum": dataset_checksum or "none",
        "mlflow.runName": run_name or stage,
        **(extra_tags or {}),
    }
    parent_run_id = parent_run_id or _DEFAULT_PARENT
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=tags, run_name=run_name or stage)
    handle = RunHandle(tracking_uri(), run.info.run_id)
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    with _finished_or_failed(client, run.info.run_id):
        yield handle


@contextmanager
def _finished_or_failed(client: Any, run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block ends, FAILED when it raises (then re-raise)."""
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


@contextmanager
def nested_run(experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
               parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[RunHandle]:
    """A run that is not one stage execution (a sweep, one sweep trial), optionally the child of
    ``parent_run_id``; marked FINISHED, or FAILED when the block raises."""
    client = _client()
    exp_id = get_or_create_experiment(experiment)
    all_tags = {"sbir.git_commit": git_commit(), "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
    handle = RunHandle(tracking_uri(), run.info.run_id)
    if params:
        handle.log_params(params)
    with _finished_or_failed(client, run.info.run_id):
        yield handle


def child_runs(experiment: str, parent_run_id: str) -> list[Any]:
    """The direct children of a run (oldest first)."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)


def terminate_run(run_id: str, status: str = "KILLED") -> None:
    """Close a run left RUNNING by a process that was stopped (e.g. a sweep trial pruned by ASHA)."""
    client = _client()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def get_run(run_id: str) -> Any:
    """One run (info, params, metrics, tags) by id."""
    return _client().get_run(run_id)


def metric_history(run_id: str, key: str) -> list[Any]:
    """Every logged value of one metric of a run (per-epoch curves)."""
    return _client().get_metric_history(run_id, key.replace("@", "_at_"))


def find_runs(experiment: str, stage: str | None = None) -> list[Any]:
    """Runs of an experiment (newest first), optionally of one stage: for tests and reports."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = f"tags.`sbir.stage` = '{stage}'" if stage else ""
    return client.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"])
