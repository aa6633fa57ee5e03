"""The one place that builds and runs Ray Train jobs, plus the helpers every training loop uses.

A stage calls :func:`run_training` with a loop function ``loop(config: dict) -> None``. The loop runs on
every Ray worker (CPU workers with gloo here, GPUs when present, a cluster when ``ray.address`` is
set), or in-process when ``ray.num_workers`` is 0 (Ray Train's local mode, for fast unit tests).

Inside a loop: :func:`world` gives (rank, world size), :func:`shard_indices` this rank's share of an
epoch, :func:`sync_gradients` averages gradients over workers (explicit all-reduce rather than DDP,
because the data-free stages train several modules against each other and DDP's hooks only fire
through the wrapped ``forward``), :func:`report` sends metrics and a checkpoint (rank 0 writes it)
and :func:`restore` returns the last checkpoint after a restart or ``--resume``.

Resume policy: Ray restores a run when ``(storage_path, name)`` repeat, so the run name is the stage
name (no time stamps). :func:`run_training` keeps the previous run only when it is unfinished and
was started with the same params hash; otherwise it starts clean.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.distributed as dist

from sbir.config import RayParams

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


# ------------------------------------------------------------------------------------ driver side
_PIPELINE = "default"


def set_pipeline(name: str) -> None:
    """Runs of different pipelines (params files) keep separate Ray folders: ray_results/<pipeline>/<stage>."""
    global _PIPELINE
    _PIPELINE = name


def ray_results_dir() -> Path:
    from sbir.tracking import REPO_ROOT

    return (Path(os.environ.get("SBIR_RAY_RESULTS", REPO_ROOT / "ray_results")) / _PIPELINE).resolve()


def _ensure_ray(ray_params: RayParams) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray workers inherit the environment; quieten noisy but harmless warnings.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if ray_params.address:
        ray.init(address=ray_params.address, include_dashboard=False)
        return
    needed = max(1, ray_params.num_workers) * ray_params.cpus_per_worker
    # Give Ray at least as many logical CPUs as the workers ask for: on this 2-core machine asking
    # for more than exists makes the placement group wait forever (the known deadlock).
    num_cpus = max(os.cpu_count() or 1, math.ceil(needed))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="WARNING")


def _use_gpu(ray_params: RayParams) -> bool:
    if ray_params.use_gpu == "auto":
        return torch.cuda.is_available()
    return bool(ray_params.use_gpu)


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


def run_training(stage: str, loop: Callable[[dict], None], loop_config: Mapping[str, Any],
                 ray_params: RayParams, params_digest: str,
                 resume: Literal["auto", "always", "never"] = "auto",
                 storage_root: Path | None = None) -> TrainingOutcome:
    """Run ``loop`` as a Ray Train job named after the stage; returns the last reported metrics."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = (storage_root or ray_results_dir()).resolve()
    run_dir = storage / stage
    resumed = prepare_run_dir(run_dir, params_digest, resume)
    use_gpu = _use_gpu(ray_params)
    config = dict(loop_config)
    config["_runtime"] = {"torch_threads": ray_params.torch_threads_per_worker, "stage": stage,
                          "local_dir": str(run_dir) if ray_params.num_workers == 0 else None}
    if ray_params.num_workers > 0:
        _ensure_ray(ray_params)
        scaling = ScalingConfig(num_workers=ray_params.num_workers, use_gpu=use_gpu,
                                resources_per_worker={"CPU": ray_params.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    else:
        scaling = ScalingConfig(num_workers=0)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=stage,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_params.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=ray_params.max_failures),
        ),
    )
    start = time.time()
    result = trainer.fit()
    seconds = time.time() - start
    if result.error:
        raise result.error
    state = None
    if ray_params.num_workers == 0:
        state = _latest_local_state(run_dir)
    elif result.checkpoint is not None:  # read on the driver, so outputs land here even on a cluster
        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    (run_dir / COMPLETED_MARKER).write_text(json.dumps({"seconds": seconds}))
    return TrainingOutcome(metrics=dict(result.metrics or {}), state=state, run_dir=run_dir, resumed=resumed,
                           seconds=seconds)


# ------------------------------------------------------------------------------------ worker side
# Ray Train's local mode (num_workers=0) keeps a reported checkpoint only as a reference to its folder,
# so the runtime keeps local-mode checkpoints itself, in the run folder (checkpoint_local_<n>).
_LOCAL_DIR: Path | None = None
_LOCAL_KEEP = 2


def _local_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_local_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))


def _latest_local_state(run_dir: Path) -> dict[str, Any] | None:
    ckpts = _local_checkpoints(run_dir)
    if not ckpts:
        return None
    return torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)


def setup_worker(config: Mapping[str, Any]) -> torch.device:
    """Per-worker set-up: thread count, device. Call first in every loop."""
    global _LOCAL_DIR
    rt = config.get("_runtime", {})
    torch.set_num_threads(int(rt.get("torch_threads", 1)))
    _LOCAL_DIR = Path(rt["local_dir"]) if rt.get("local_dir") else None
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # outside Ray (plain function call in a test)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    for name, value in losses.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            where = f"{stage} " if stage else ""
            raise NonFiniteLossError(f"{where}loss term {name!r} is {v} at step {step}; the last good "
                                     "checkpoint is kept (lower the lr or check the inputs)")


def report(metrics: Mapping[str, float], state: Mapping[str, Any] | None = None) -> None:
    """Report metrics (a barrier across workers) and, from rank 0, a checkpoint holding ``state``."""
    import ray.train

    if _LOCAL_DIR is not None:
        if state is not None:
            ckpts = _local_checkpoints(_LOCAL_DIR)
            n = int(ckpts[-1].name.rsplit("_", 1)[1]) + 1 if ckpts else 0
            tmp = _LOCAL_DIR / f".checkpoint_local_{n}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save(dict(state), tmp / "state.pt")
            os.replace(tmp, _LOCAL_DIR / f"checkpoint_local_{n}")  # atomic: never a half-written checkpoint
            for old in _local_checkpoints(_LOCAL_DIR)[:-_LOCAL_KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        ray.train.report(dict(metrics), checkpoint=None)
        return
    if state is not None and is_rank0():
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(dict(state), os.path.join(tmp, "state.pt"))
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(dict(metrics), checkpoint=None)


def restore() -> dict[str, Any] | None:
    """The state saved by the last :func:`report` of this run (after a worker restart or resume)."""
    import ray.train

    if _LOCAL_DIR is not None:
        return _latest_local_state(_LOCAL_DIR)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
    """A tqdm bar on rank 0 only (sparse refreshes: Ray forwards each refresh as a log line)."""
    if not is_rank0():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, mininterval=10.0, file=sys.stdout, ascii=True, leave=True)
