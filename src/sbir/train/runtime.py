"""The one place that builds and runs Ray Train jobs, plus the helpers every training loop uses.

A stage calls :func:`run_training` with a loop function ``loop(config: dict) -> None``. The loop runs on
every Ray worker (CPU workers with gloo here, GPUs when present, a cluster when ``ray.address`` is
set), or in-process when ``ray.num_workers`` is 0 (Ray Train's local mode, for fast unit tests).

Inside a loop: :func:`world` gives (rank, world size), :func:`shard_indices` this rank's share of an
epoch, :func:`sync_gradients` averages gradients over workers (explicit all-reduce rather than DDP,
because the data-free stages train several modules against each other and DDP's hooks only fire
through the wrapped ``forward``), :func:`report` sends metrics and a checkpoint (rank 0 writes it and
logs the metrics to the stage's MLflow run) and :func:`restore_into` loads the last checkpoint into
the loop's modules and optimisers after a restart or ``--resume``.

Resume policy: Ray restores a run when ``(storage_path, name)`` repeat, so the run name is the stage
name (no time stamps). :func:`run_training` keeps the previous run only when it is unfinished and
was started with the same params hash; otherwise it starts clean.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.distributed as dist

from sbir.config import RayParams
from sbir.train import shared_ray

COMPLETED_MARKER = "sbir_completed.json"
PARAMS_MARKER = "sbir_params_hash.txt"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/Inf; the message names the term and the step."""


@dataclass
class TrainingOutcome:
    metrics: dict[str, Any]
    state: dict[str, Any] | None  # the state saved with the last checkpoint (models, history, ...)
    run_dir: Path
    resumed: bool
    seconds: float
    # where a resumed run continued from: the position keys (epoch/step/round...) of the checkpoint it
    # restored at start, e.g. {"epoch": 3}; None when it started clean
    resumed_from: dict[str, Any] | None = None


# Every run_training call of this process, in order (stage.py copies them into stage_metrics.json).
TRAINING_LOG: list[dict[str, Any]] = []
POSITION_FILE = "sbir_position.json"


# ------------------------------------------------------------------------------------ driver side
_PIPELINE = "default"


def set_pipeline(name: str) -> None:
    """Runs of different pipelines (params files) keep separate Ray folders: ray_results/<pipeline>/<stage>."""
    global _PIPELINE
    _PIPELINE = name


def ray_results_dir(storage_path: str | None = None) -> Path:
    """Where a pipeline's Ray runs live: ``<storage_path>/<pipeline>`` (``ray.storage_path``: on a cluster, a
    folder every node mounts), else ``$SBIR_RAY_RESULTS`` or ``ray_results/`` of the repository."""
    from sbir.tracking import REPO_ROOT

    root = storage_path or os.environ.get("SBIR_RAY_RESULTS", REPO_ROOT / "ray_results")
    return (Path(root) / _PIPELINE).resolve()


def ray_environment(ray_params: RayParams) -> None:
    """Environment variables of the Ray instance the stage starts, set before Ray is imported (Ray reads
    some of them at import) and inherited by its processes (``shared_ray.RAY_ENV`` and, for an instance on
    this machine, ``shared_ray.LOCAL_RAY_ENV``: why each is set is said there)."""
    for key, value in shared_ray.RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray_params.address:
        return
    for key, value in shared_ray.LOCAL_RAY_ENV.items():
        # the auth mode only before Ray's import: set later, the driver's cached config would not send the
        # token the new instance expects
        if key != "RAY_AUTH_MODE" or "ray" not in sys.modules:
            os.environ.setdefault(key, value)


def ensure_ray(ray_params: RayParams) -> None:
    """Start (or join, with ``ray.address``) the Ray instance the stages' Train jobs run on."""
    import ray

    if ray.is_initialized():
        return
    if ray_params.address:
        ray.init(address=ray_params.address, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": "sbir.train.ray_hooks.setup_ray_worker"})
        return
    if shared_ray.shared_address():  # the one local instance of a whole `make repro` (sbir.train.shared_ray)
        context = ray.init(address=shared_ray.shared_address(), include_dashboard=False, logging_level="WARNING",
                           runtime_env={"worker_process_setup_hook": "sbir.train.ray_hooks.setup_local_ray_worker"})
        logging.getLogger(__name__).info("joined the shared Ray instance %s (its logs: %s)",
                                         shared_ray.shared_address(), context.address_info.get("session_dir"))
        return
    needed = max(1, ray_params.num_workers) * ray_params.cpus_per_worker
    # Give Ray at least as many logical CPUs as the workers ask for: on this 2-core machine asking
    # for more than exists makes the placement group wait forever (the known deadlock).
    num_cpus = max(os.cpu_count() or 1, math.ceil(needed))
    context = ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=True,
                       logging_level="WARNING",
                       runtime_env={"worker_process_setup_hook": "sbir.train.ray_hooks.setup_local_ray_worker"})
    # the stage's log file gets this line: Ray keeps its own logs (every level, every process) there
    logging.getLogger(__name__).info("Ray session (its own logs under logs/): %s",
                                     context.address_info.get("session_dir"))


def use_gpu(ray_params: RayParams) -> bool:
    """Whether the stage's workers get a GPU (``use_gpu: auto``: whether this process sees CUDA)."""
    if ray_params.use_gpu == "auto":
        return torch.cuda.is_available()
    return bool(ray_params.use_gpu)


def fault_injection() -> dict[str, Any]:
    """Test-only faults from ``$SBIR_FAULT_INJECT`` (comma-separated), so reliability tests can make a real
    stage fail at a known point without touching its code:

    * ``nan:<term>@<step>``: :func:`check_finite` treats loss term ``<term>`` (``*``: the first term) as NaN
      from step ``<step>`` on (the guard, the error and the kept checkpoint are the real ones);
    * ``report_sleep:<seconds>``: sleep after every :func:`report` (makes "interrupt after a checkpoint"
      deterministic in tests on a fast tiny run).
    """
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in os.environ.get("SBIR_FAULT_INJECT", "").split(","))):
        kind, _, arg = item.partition(":")
        try:
            if kind == "nan":
                term, _, step = arg.rpartition("@")
                out["nan"] = (term or "*", int(step))
            elif kind == "report_sleep":
                out["report_sleep"] = float(arg)
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(f"$SBIR_FAULT_INJECT: cannot parse {item!r} (expected nan:<term>@<step> or "
                             "report_sleep:<seconds>)") from None
    return out


_POSITION_KEYS = ("epoch", "step", "round", "variant")


def _position(metrics: Mapping[str, Any], state: Mapping[str, Any] | None) -> dict[str, Any]:
    """Where a checkpoint stands in training: integer epoch/step/round keys of the state or metrics
    (``<variant>/step`` metrics too), so a resumed run can say what it continued from."""
    pos: dict[str, Any] = {}
    for src in (metrics, state or {}):
        for k, v in src.items():
            if (k in _POSITION_KEYS or k.endswith("/step")) and isinstance(v, (int, float)) and not isinstance(v, bool):
                pos.setdefault(k, int(v))
    return pos


def checkpoint_position(run_dir: Path) -> dict[str, Any] | None:
    """The position of the checkpoint a (re)started run in ``run_dir`` restores: Ray's latest checkpoint
    (from its checkpoint manager snapshot) or the runtime's latest local-mode checkpoint."""
    ckpt: Path | None = None
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if snapshot.is_file():
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("checkpoint_dir_name"):
                ckpt = run_dir / latest["checkpoint_dir_name"]
                if not (ckpt / POSITION_FILE).is_file():
                    return _position(latest.get("metrics") or {}, None) or None
        except (OSError, ValueError):
            ckpt = None
    if ckpt is None:
        local = _local_checkpoints(run_dir)
        ckpt = local[-1] if local else None
    if ckpt is None or not (ckpt / POSITION_FILE).is_file():
        return None
    try:
        return json.loads((ckpt / POSITION_FILE).read_text())
    except (OSError, ValueError):
        return None


def _unwrap_non_finite(error: BaseException) -> BaseException:
    """Ray wraps a worker's NonFiniteLossError in a WorkerGroupError; surface the original message so the
    stage can print one clear line (the term and the step) instead of a wall of worker tracebacks."""
    failures = getattr(error, "worker_failures", None) or {}
    for exc in [error, *failures.values()]:
        if isinstance(exc, NonFiniteLossError):
            return exc
        text = str(exc)
        if "NonFiniteLossError" in text or "loss term '" in text:
            import re

            m = re.search(r"([\w/]+ )?loss term '[^']*' is [-a-z]+ at step \d+[^\n]*", text)
            if m:
                return NonFiniteLossError(m.group(0))
    return error


def prepare_run_dir(run_dir: Path, params_digest: str, resume: Literal["auto", "always", "never"]) -> bool:
    """Decide whether to continue the run in ``run_dir``; wipe it otherwise. Returns True if resuming."""
    marker = run_dir / PARAMS_MARKER
    previous = marker.read_text().strip() if marker.is_file() else None
    finished = (run_dir / COMPLETED_MARKER).is_file()
    keep = False
    if resume == "always":
        if previous is None:
            raise FileNotFoundError(f"--resume: no earlier run of this stage in {run_dir}")
        if previous != params_digest:
            raise ValueError(f"--resume: the run in {run_dir} used other params (hash {previous}, now "
                             f"{params_digest}); rerun without --resume to start clean")
        keep = True
    elif resume == "auto":
        keep = previous == params_digest and not finished
    if not keep and run_dir.exists():
        shutil.rmtree(run_dir)
    if keep and finished:
        (run_dir / COMPLETED_MARKER).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(params_digest)
    return keep and any(run_dir.glob("checkpoint*"))


@dataclass
class TrainingHooks:
    """What a caller running stages inside another Ray job (a Tune trial: ``sbir.sweep``) adds to every
    :func:`run_training` call in its scope, without the stage code knowing about it."""

    storage_root: Path | None = None  # Ray storage for the runs (a sweep trial's own folder)
    callbacks: Callable[[str], list] | None = None  # stage -> extra RunConfig callbacks (TuneReportCallback, ...)
    # local mode (num_workers=0) runs no callbacks, and inside a Tune trial Ray refuses ray.train.report:
    # with this set, every report of a local-mode loop goes here instead (the sweep reports it to Tune)
    on_local_report: Callable[[str, dict], None] | None = None


_HOOKS: TrainingHooks | None = None
_LOCAL_REPORT: Callable[[dict], None] | None = None


def active_hooks() -> TrainingHooks | None:
    """The hooks of the enclosing :func:`training_hooks` block, if any."""
    return _HOOKS


@contextmanager
def training_hooks(hooks: TrainingHooks) -> Iterator[TrainingHooks]:
    """Apply ``hooks`` to every :func:`run_training` call inside the ``with`` block."""
    global _HOOKS
    previous, _HOOKS = _HOOKS, hooks
    try:
        yield hooks
    finally:
        _HOOKS = previous


def run_training(stage: str, loop: Callable[[dict], None], loop_config: Mapping[str, Any],
                 ray_params: RayParams, params_digest: str,
                 resume: Literal["auto", "always", "never"] = "auto",
                 storage_root: Path | None = None, mlflow_run: Any = None) -> TrainingOutcome:
    """Run ``loop`` as a Ray Train job named after the stage; returns the last reported metrics.
    ``mlflow_run`` (a picklable :class:`sbir.tracking.RunHandle`) receives every report's metrics."""
    ray_environment(ray_params)
    global _LOCAL_REPORT
    hooks = _HOOKS or TrainingHooks()
    storage = (storage_root or hooks.storage_root or ray_results_dir(ray_params.storage_path)).resolve()
    run_dir = storage / stage
    resumed = prepare_run_dir(run_dir, params_digest, resume)
    resumed_from = checkpoint_position(run_dir) if resumed else None
    if resumed:
        where = ", ".join(f"{k} {v}" for k, v in (resumed_from or {}).items()) or "its last checkpoint"
        from sbir.stage_log import announce

        announce(f"[{stage}] resumed from {where} ({run_dir})")
    config = dict(loop_config)
    config["_runtime"] = {"torch_threads": ray_params.torch_threads_per_worker, "stage": stage,
                          "local_dir": str(run_dir) if ray_params.num_workers == 0 else None,
                          "run_dir": str(run_dir), "mlflow_run": mlflow_run}
    trainer = _trainer(stage, _Timed(loop), config, ray_params, storage, hooks)
    (run_dir / LOOP_TIMES_FILE).unlink(missing_ok=True)
    start = time.time()
    last_local: dict[str, Any] = {}
    if ray_params.num_workers == 0 and hooks.on_local_report is not None:
        def _local_report(metrics: dict) -> None:
            last_local.clear()
            last_local.update(metrics)
            hooks.on_local_report(stage, metrics)

        _LOCAL_REPORT = _local_report
    try:
        result = trainer.fit()  # Ray Train V2 raises a failed run's error here (V1 returned it in result)
    except Exception as error:
        TRAINING_LOG.append({"stage": stage, "resumed": resumed, "resumed_from": resumed_from, "failed": True})
        unwrapped = _unwrap_non_finite(error)
        if unwrapped is not error:
            raise unwrapped from error
        raise
    finally:
        _LOCAL_REPORT = None
    seconds = time.time() - start
    state = None
    if ray_params.num_workers == 0:
        state = _latest_local_state(run_dir)
    elif result.checkpoint is not None:  # read on the driver, so outputs land here even on a cluster
        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    (run_dir / COMPLETED_MARKER).write_text(json.dumps({"seconds": seconds}))
    TRAINING_LOG.append({"stage": stage, "resumed": resumed, "resumed_from": resumed_from,
                         "train_seconds": round(seconds, 2), "num_workers": ray_params.num_workers,
                         "precision": ray_params.precision,
                         "time_split": time_split(run_dir, start, start + seconds),
                         "worker_nodes": worker_nodes(run_dir), "restores": restores(run_dir)})
    return TrainingOutcome(metrics=dict(result.metrics or last_local), state=state, run_dir=run_dir, resumed=resumed,
                           seconds=seconds, resumed_from=resumed_from)


def _trainer(stage: str, loop: Callable[[dict], None], config: dict[str, Any], ray_params: RayParams,
             storage: Path, hooks: TrainingHooks) -> Any:
    """The TorchTrainer of one run (on Ray workers: starting or joining Ray first)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # the driver's Ray logger at WARNING, as ensure_ray's ray.init(logging_level=...) sets it; local mode
    # (num_workers=0) calls no ray.init, and Ray's import sets it to INFO ("Running in local mode ...")
    logging.getLogger("ray").setLevel(logging.WARNING)
    gpu = use_gpu(ray_params)
    if ray_params.num_workers > 0:
        ensure_ray(ray_params)
        scaling = ScalingConfig(num_workers=ray_params.num_workers, use_gpu=gpu,
                                resources_per_worker={"CPU": ray_params.cpus_per_worker, **({"GPU": 1} if gpu else {})},
                                placement_strategy=ray_params.placement_strategy)
    else:
        scaling = ScalingConfig(num_workers=0)
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=stage,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_params.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=ray_params.max_failures),
            callbacks=list(hooks.callbacks(stage)) if hooks.callbacks else None,
            # Ray Train's INFO lines (worker group started, every report and checkpoint) stay in its own
            # log files under the Ray session folder; the console gets its warnings and errors
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


LOOP_TIMES_FILE = "sbir_loop_times.json"


def time_split(run_dir: Path, fit_start: float, fit_end: float) -> dict[str, float] | None:
    """Where a fit's time went (rank 0's view, written by :class:`_Timed`): ``start_up`` (fit() to the loop's
    first line: worker processes, imports, process group), ``compute`` (the loop minus its reports),
    ``reports`` (inside :func:`report`: metrics, the barrier, checkpoints) and ``teardown`` (the loop's end to
    fit()'s return). None if the loop never finished on rank 0 in this run folder."""
    path = run_dir / LOOP_TIMES_FILE
    if not path.is_file():
        return None
    t = json.loads(path.read_text())
    loop = t["end"] - t["start"]
    return {"start_up": round(t["start"] - fit_start, 2), "compute": round(loop - t["report_seconds"], 2),
            "reports": round(t["report_seconds"], 2), "num_reports": t["num_reports"],
            "teardown": round(fit_end - t["end"], 2)}


class _Timed:
    """The loop as the trainer runs it: rank 0 notes when it started and ended and its time in reports. A
    module-level class (pickled by reference), so the counters it reads are this module's, not a copy's."""

    def __init__(self, loop: Callable[[dict], None]) -> None:
        self.loop = loop
        functools.update_wrapper(self, loop)

    def __call__(self, config: dict) -> None:
        global _REPORT_SECONDS, _NUM_REPORTS
        _REPORT_SECONDS, _NUM_REPORTS = 0.0, 0
        started = time.time()
        self.loop(config)
        if is_rank0():
            times = {"start": started, "end": time.time(), "report_seconds": _REPORT_SECONDS, "num_reports": _NUM_REPORTS}
            try:  # diagnostics only: a run folder this node cannot write (a cluster without shared storage) skips it
                Path(config["_runtime"]["run_dir"], LOOP_TIMES_FILE).write_text(json.dumps(times))
            except OSError:
                pass


# ------------------------------------------------------------------------------------ worker side
_REPORT_SECONDS = 0.0  # this worker's time inside report() during the current loop (see _Timed)
_NUM_REPORTS = 0
# Ray Train's local mode (num_workers=0) keeps a reported checkpoint only as a reference to its folder,
# so the runtime keeps local-mode checkpoints itself, in the run folder (checkpoint_local_<n>).
_LOCAL_DIR: Path | None = None
_LOCAL_KEEP = 2
_MLFLOW_RUN: Any = None  # the stage's MLflow run (a RunHandle), set by setup_worker
_RUN_DIR: Path | None = None  # the run folder (on shared storage on a cluster), set by setup_worker


WORKER_NODES_DIR = "sbir_worker_nodes"


def _record_worker_node(run_dir: str | None) -> None:
    """Each Ray worker writes the node it runs on into the run folder (shared storage on a cluster); a
    restarted worker group overwrites the entries, so they describe the attempt that finished."""
    if not run_dir or not _in_ray_worker():
        return
    import ray

    rank, _ = world()
    folder = Path(run_dir) / WORKER_NODES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
             "node_ip": ray.util.get_node_ip_address()}
    tmp = folder / f".rank_{rank}.tmp"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, folder / f"rank_{rank}.json")


RESTORES_FILE = "sbir_restores.jsonl"


def _record_restore(state: Mapping[str, Any]) -> None:
    """Rank 0 notes each checkpoint a (re)started worker group restored: after a lost worker or node,
    the stage's record says where training continued from."""
    if _RUN_DIR is None or not is_rank0():
        return
    entry = {"resumed_from": _position({}, state), "time": round(time.time(), 1)}
    if _in_ray_worker():
        import ray

        entry["node_id"] = ray.get_runtime_context().get_node_id()
    with open(_RUN_DIR / RESTORES_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def restores(run_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint restore of the run, in order (see :func:`_record_restore`)."""
    path = run_dir / RESTORES_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def worker_nodes(run_dir: Path) -> list[dict[str, Any]]:
    """The node of every worker of the run's last attempt (rank order); empty when the loop ran in the
    stage's own process (local mode outside a Tune trial)."""
    folder = run_dir / WORKER_NODES_DIR
    entries = [json.loads(p.read_text()) for p in folder.glob("rank_*.json")] if folder.is_dir() else []
    return sorted(entries, key=lambda e: e["rank"])


def _local_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_local_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))


def _latest_local_state(run_dir: Path) -> dict[str, Any] | None:
    ckpts = _local_checkpoints(run_dir)
    if not ckpts:
        return None
    return torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)


def setup_worker(config: Mapping[str, Any]) -> torch.device:
    """Per-worker set-up: thread count, device. Call first in every loop."""
    global _LOCAL_DIR, _MLFLOW_RUN, _RUN_DIR
    rt = config.get("_runtime", {})
    torch.set_num_threads(int(rt.get("torch_threads", 1)))
    _LOCAL_DIR = Path(rt["local_dir"]) if rt.get("local_dir") else None
    _RUN_DIR = Path(rt["run_dir"]) if rt.get("run_dir") else None
    _MLFLOW_RUN = rt.get("mlflow_run")
    _record_worker_node(rt.get("run_dir"))
    if os.environ.get("SBIR_DETERMINISTIC") == "1":
        set_deterministic()
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # outside Ray (plain function call in a test)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_deterministic() -> None:
    """Bit-reproducible GPU runs (``SBIR_DETERMINISTIC=1``, read by :func:`setup_worker` on every worker):
    deterministic cuDNN/cuBLAS kernels and an error from any op that has no deterministic implementation
    (slower; see docs/reliability.md). CPU runs here are deterministic without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    return world()[0] == 0


def sync_gradients(modules: Iterable[torch.nn.Module] | torch.nn.Module) -> None:
    """Average gradients over workers (no-op with one worker)."""
    _, size = world()
    if size == 1:
        return
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_module(module: torch.nn.Module) -> None:
    """Make every worker start from rank 0's parameters and buffers."""
    if world()[1] == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def mean_over_workers(values: Mapping[str, float]) -> dict[str, float]:
    """Average scalar metrics over workers (every worker must call it)."""
    keys = sorted(values)
    if world()[1] == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= world()[1]
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def shard_indices(n: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True,
                  drop_last: bool = True) -> Iterator[torch.Tensor]:
    """This rank's batches of one epoch: one shared permutation, each rank takes every k-th batch.

    Every rank yields the same number of batches, so collective calls inside the loop stay aligned.
    """
    rank, size = world()
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    per_step = batch_size * size
    steps = n // per_step if drop_last else math.ceil(n / per_step)
    if steps == 0:  # tiny datasets: still one (smaller) step
        steps, batch_size = 1, max(1, n // size)
    for s in range(steps):
        chunk = order[s * per_step : (s + 1) * per_step]
        part = chunk[rank * batch_size : (rank + 1) * batch_size]
        if len(part) == 0:
            part = chunk[:1]
        yield part


def check_finite(losses: Mapping[str, torch.Tensor | float], step: int, stage: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming the first NaN/Inf loss term."""
    inject = fault_injection().get("nan")
    for i, (name, value) in enumerate(losses.items()):
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if inject and step >= inject[1] and (inject[0] == name or (inject[0] == "*" and i == 0)):
            v = float("nan")  # test-only fault (see fault_injection)
        if not math.isfinite(v):
            where = f"{stage} " if stage else ""
            raise NonFiniteLossError(f"{where}loss term {name!r} is {v} at step {step}; the last good "
                                     "checkpoint is kept (lower the lr or check the inputs)")


def report(metrics: Mapping[str, float], state: Mapping[str, Any] | None = None) -> None:
    """Report metrics (a barrier across workers) and, from rank 0, a checkpoint holding ``state``; rank 0
    also logs the metrics to the stage's MLflow run at the report's position (epoch/step/round)."""
    global _REPORT_SECONDS, _NUM_REPORTS
    started = time.time()
    try:
        _report(metrics, state)
    finally:
        _REPORT_SECONDS += time.time() - started
        _NUM_REPORTS += 1


def _report(metrics: Mapping[str, float], state: Mapping[str, Any] | None) -> None:
    import ray.train

    if _MLFLOW_RUN is not None and is_rank0():
        position = _position(metrics, state)
        _MLFLOW_RUN.log_metrics(metrics, step=next(iter(position.values()), None))

    if _LOCAL_DIR is not None:
        if state is not None:
            ckpts = _local_checkpoints(_LOCAL_DIR)
            n = int(ckpts[-1].name.rsplit("_", 1)[1]) + 1 if ckpts else 0
            tmp = _LOCAL_DIR / f".checkpoint_local_{n}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save(dict(state), tmp / "state.pt")
            (tmp / POSITION_FILE).write_text(json.dumps(_position(metrics, state)))
            os.replace(tmp, _LOCAL_DIR / f"checkpoint_local_{n}")  # atomic: never a half-written checkpoint
            for old in _local_checkpoints(_LOCAL_DIR)[:-_LOCAL_KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        if _LOCAL_REPORT is not None:  # in a Tune trial Ray refuses ray.train.report: the hook reports instead
            _LOCAL_REPORT(dict(metrics))
        else:
            ray.train.report(dict(metrics), checkpoint=None)
    elif state is not None and is_rank0():
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(dict(state), os.path.join(tmp, "state.pt"))
            Path(tmp, POSITION_FILE).write_text(json.dumps(_position(metrics, state)))
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(dict(metrics), checkpoint=None)
    sleep = fault_injection().get("report_sleep")
    if sleep:
        time.sleep(sleep)  # test-only fault (see fault_injection)


def restore_into(**targets: Any) -> dict[str, Any] | None:
    """The state saved by the last :func:`report` of this run (after a worker restart or resume), with
    ``state[name]`` loaded into each ``name=object`` given (modules, optimisers, schedulers; None skips);
    None when the run starts clean."""
    state = restore()
    if state is not None:
        for name, target in targets.items():
            if target is not None:
                target.load_state_dict(state[name])
    return state


def restore() -> dict[str, Any] | None:
    """The state saved by the last :func:`report` of this run (after a worker restart or resume)."""
    import ray.train

    if _LOCAL_DIR is not None:
        state = _latest_local_state(_LOCAL_DIR)
    else:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    if state is not None:
        _record_restore(state)
    return state


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
    """A progress bar of rank 0 on the console. In a Ray worker it is Ray's tqdm_ray bar, which the driver
    draws in place (Ray forwards a plain tqdm bar's every refresh as a new log line); in-process (local
    mode, or a stage's own loop) a tqdm bar on stderr."""
    if not is_rank0():
        return iterable
    if _in_ray_worker():
        return _ray_progress(iterable, total, desc)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, mininterval=2.0, file=sys.stderr, ascii=True, leave=True)


def _ray_progress(iterable: Iterable, total: int | None, desc: str) -> Iterator:
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    bar = ray_tqdm(total=total, desc=desc, flush_interval_s=2.0)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()  # tqdm_ray's own iteration never closes its bar: the driver would keep it open


def _in_ray_worker() -> bool:
    """Whether this code runs in a Ray actor (a Train worker, a Tune trial), whose output Ray forwards."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (the stages that work outside Ray use the Ray
    workers' ``ray.torch_threads_per_worker``: on a busy machine extra threads mostly wait)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def with_worker_threads(body: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """A stage body run with the Ray workers' torch thread count (``ray.torch_threads_per_worker``), for
    the work the stage does in the driver process (see :func:`torch_threads`)."""

    @functools.wraps(body)
    def run(ctx) -> dict[str, Any]:
        with torch_threads(ctx.params.ray.torch_threads_per_worker):
            return body(ctx)

    return run
