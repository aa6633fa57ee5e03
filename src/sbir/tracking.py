"""The one module that talks to MLflow.

Store: a SQLite database ``mlflow/mlflow.db`` in the repository with artifacts in ``mlflow/artifacts``
(override with the ``SBIR_MLFLOW_URI`` environment variable, e.g. an ``http://`` server). One experiment
per pipeline; one run per stage execution, tagged with the git commit, stage, params hash and the
dataset checksum. The driver creates the store, the experiment and the run before any Ray worker
starts (several processes creating one SQLite store race); workers get a picklable
:class:`RunHandle` and only rank 0 logs through it.

Experiments are tagged ``mlflow.experimentKind = custom_model_development`` (what the MLflow UI's
experiment-type selector writes for "machine learning"), so the UI does not ask, and treats them as
model training rather than GenAI; :func:`experiment_ui_url` is the link that also switches the UI's
workflow toggle to "machine learning" (MLflow 3's UI picks the view from that toggle).

Stage runs of one ``dvc repro`` (or ``dvc exp run``) are grouped under one parent run, so two repros
compare side by side: dvc starts each stage as its own process, so a stage finds its repro by walking
up its process tree to the ``dvc`` process (its pid and start time name the repro) unless
``SBIR_REPRO_GROUP`` names the group; the first stage creates the parent (:func:`repro_parent`), the
others find it by its ``sbir.repro`` tag. The parent carries every stage's final metrics as
``<stage>/<metric>`` and the stages' params, and ends FINISHED or FAILED with the last stage.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
MLFLOW_DIR_ENV = "SBIR_MLFLOW_DIR"
MLFLOW_URI_ENV = "SBIR_MLFLOW_URI"
REPRO_GROUP_ENV = "SBIR_REPRO_GROUP"
# the experiment tag MLflow's UI reads for the experiment type, and its value for model training
# (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT; GenAI experiments say "genai_development")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
REPRO_TAG = "sbir.repro"          # the repro a run belongs to: on the parent and on each of its stage runs
RUN_KIND_TAG = "sbir.run_kind"    # "repro" on a repro's parent run


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
    """The experiment's id, created when missing; tagged as a model-training experiment (an older
    experiment without the tag gets it; a kind someone chose in the UI is left as it is)."""
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    artifact_location = None
    if not os.environ.get(MLFLOW_URI_ENV):
        artifact_location = (mlflow_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


def experiment_ui_url(name: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's runs table of an experiment in the model-training view (``workflowType`` is
    the UI's GenAI / machine-learning toggle, which MLflow 3 keeps per browser, GenAI by default).
    An experiment made before the kind tag existed gets it here, so the UI does not ask for its type."""
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is not None and EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    where = f"experiments/{exp.experiment_id}/runs" if exp is not None else "experiments"
    return f"{base.rstrip('/')}/#/{where}?workflowType=machine_learning"


# ----------------------------------------------------------------------------- one dvc repro, one group
@dataclass(frozen=True)
class ReproGroup:
    """The ``dvc repro`` a stage process runs in: ``id`` is shared by all its stages, ``name`` is the
    parent run's name, ``command`` what was run."""

    id: str
    name: str
    command: str


def dvc_invocation(ancestors: Iterable[tuple[int, float, Sequence[str]]]) -> tuple[int, float, str] | None:
    """The nearest ``dvc repro`` / ``dvc exp run`` among a process's ancestors, given as
    ``(pid, start time, command line)``, nearest first (``dvc`` run as a script or ``python -m dvc``):
    its pid, start time and command (``"dvc repro dvc.yaml"``)."""
    for pid, started, cmdline in ancestors:
        args = [str(a) for a in cmdline]
        for i, arg in enumerate(args):
            is_dvc = Path(arg).name in ("dvc", "dvc.exe") or (arg == "dvc" and i > 0 and args[i - 1] == "-m")
            if not is_dvc:
                continue
            words = [a for a in args[i + 1 :] if not a.startswith("-")]
            if words[:1] == ["repro"] or words[:2] == ["exp", "run"]:
                return pid, started, " ".join(["dvc", *args[i + 1 :]])
    return None


def _ancestors() -> list[tuple[int, float, list[str]]]:
    import psutil

    out = []
    for proc in psutil.Process().parents():
        try:
            out.append((proc.pid, proc.create_time(), proc.cmdline()))
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    return out


def repro_group() -> ReproGroup | None:
    """This process's repro: ``$SBIR_REPRO_GROUP`` when set, else the ``dvc repro`` it descends from
    (its host, pid and start time: unique per repro), else None (a stage run by hand, a test)."""
    import socket
    import time

    named = os.environ.get(REPRO_GROUP_ENV, "").strip()
    if named:
        return ReproGroup(id=named, name=f"repro {named}", command=f"{REPRO_GROUP_ENV}={named}")
    found = dvc_invocation(_ancestors())
    if found is None:
        return None
    pid, started, command = found
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return ReproGroup(id=f"{socket.gethostname()}:{pid}:{int(started * 1000)}", name=f"{command} · {when}",
                      command=command)


def repro_parent(experiment: str, group: ReproGroup) -> str:
    """The id of ``group``'s parent run in ``experiment``, created by the first stage that asks."""
    client = _client()
    exp_id = get_or_create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{REPRO_TAG}` = '{_quoted(group.id)}' "
                                                      f"AND tags.`{RUN_KIND_TAG}` = 'repro'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    tags = {REPRO_TAG: group.id, RUN_KIND_TAG: "repro", "sbir.repro_command": group.command,
            "sbir.git_commit": git_commit(), "mlflow.runName": group.name}
    return client.create_run(exp_id, tags=tags, run_name=group.name).info.run_id


def _quoted(value: str) -> str:
    return value.replace("'", "''")


def _report_to_parent(client: Any, parent_id: str, stage: str, run_id: str, status: str) -> None:
    """Copy a finished stage run's final metrics (``<stage>/<key>``) and new params onto its repro's
    parent, and give the parent the stage's status: the parent of a repro ends with its last stage."""
    from mlflow.entities import Metric, Param

    import time

    run, parent = client.get_run(run_id), client.get_run(parent_id)
    ts = int(run.info.end_time or time.time() * 1000)
    metrics = [Metric(f"{stage}/{k}", float(v), ts, 0) for k, v in run.data.metrics.items()]
    params = [Param(k, v) for k, v in run.data.params.items() if k not in parent.data.params]
    for i in range(0, max(len(metrics), len(params)), 100):  # MLflow caps a batch at 100 of each
        client.log_batch(parent_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
    client.set_terminated(parent_id, status=status)


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
    repro = None if parent_run_id else repro_group()
    if repro is not None:  # a stage of a dvc repro: the child of that repro's parent run
        parent_run_id = repro_parent(experiment, repro)
        tags[REPRO_TAG] = repro.id
        client.update_run(parent_run_id, status="RUNNING")
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=tags, run_name=run_name or stage)
    handle = RunHandle(tracking_uri(), run.info.run_id)
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    status = "FAILED"
    try:
        with _finished_or_failed(client, run.info.run_id):
            yield handle
        status = "FINISHED"
    finally:
        if repro is not None:
            try:
                _report_to_parent(client, parent_run_id, stage, run.info.run_id, status)
            except Exception as exc:  # bookkeeping only: never hide the stage's own outcome
                print(f"[{stage}] MLflow: could not update the repro's parent run ({exc})", file=sys.stderr)


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
    """Stage runs of an experiment (newest first), optionally of one stage: for tests and reports.
    The runs that only group stage runs (a repro's parent, a sweep) are left out: :func:`repro_runs`."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = f"tags.`sbir.stage` = '{stage}'" if stage else ""
    runs = client.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"])
    return [r for r in runs if "sbir.stage" in r.data.tags]


def repro_runs(experiment: str) -> list[Any]:
    """The parent runs of the experiment's repros (newest first); :func:`child_runs` gives their stages."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KIND_TAG}` = 'repro'",
                              order_by=["attributes.start_time DESC"], max_results=10_000)
