"""Running a sweep: the parent MLflow run, the Tuner over :func:`sbir.sweep.trial.run_trial`, the results."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from sbir.config import load_params
from sbir.sweep.results import collect_results, write_results
from sbir.sweep.spec import SweepSpec, load_spec, param_space, repo_path
from sbir.sweep.trial import run_trial
from sbir.sweep.upstream import upstream_checksums
from sbir.tracking import REPO_ROOT


def default_out_dir(spec: SweepSpec) -> Path:
    """``ray_results/sweeps/<name>`` (under $SBIR_RAY_RESULTS when set, like the Ray Train folders)."""
    return (Path(os.environ.get("SBIR_RAY_RESULTS", REPO_ROOT / "ray_results")) / "sweeps" / spec.name).resolve()


def run_sweep(spec_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, use_mlflow: bool = True,
              extra_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the summary written to ``<out_dir>/sweep.json``."""
    from sbir import tracking

    spec = load_spec(spec_path)
    if extra_overrides:
        spec = SweepSpec.model_validate({**spec.model_dump(), "base_overrides": {**spec.base_overrides,
                                                                                  **extra_overrides}})
    out = Path(out_dir).resolve() if out_dir else default_out_dir(spec)
    if out.exists():
        shutil.rmtree(out)  # a sweep folder is one sweep: stale trials would mix into the results table
    out.mkdir(parents=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    root = load_params(repo_path(spec.params), spec.base_overrides)
    base_outputs = repo_path(root.outputs_dir)
    # the pipeline's outputs the trials read: if they change later, the sweep's numbers are not reproducible
    (out / "upstream.json").write_text(json.dumps(upstream_checksums(base_outputs, spec.stages), indent=1))
    env = {k: os.environ[k] for k in (tracking.MLFLOW_DIR_ENV, tracking.MLFLOW_URI_ENV, "SBIR_RAY_RESULTS")
           if os.environ.get(k)}
    parent_cm = _parent_run(spec, root.pipeline) if use_mlflow else None
    parent_id = None
    ctx = {"out_dir": str(out), "base_outputs": str(base_outputs), "env": env, "experiment": root.pipeline}
    start = time.time()
    parent = parent_cm.__enter__() if parent_cm else None
    try:
        if parent is not None:
            parent_id = ctx["parent_run_id"] = parent.run_id
        rows = collect_results(spec, out, _fit(spec, root, out, ctx))
        summary = write_results(spec, out, rows, root, seconds=time.time() - start)
        if parent is not None:
            _log_parent(parent, rows, summary, out)
        summary["parent_run_id"] = parent_id
        (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    except BaseException as exc:
        if parent_cm:
            parent_cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if parent_cm:
        parent_cm.__exit__(None, None, None)
    return summary  # Ray stays up for the rest of this process (tests share it); it stops when the process exits


def _parent_run(spec: SweepSpec, experiment: str) -> Any:
    """The sweep's parent MLflow run (a context manager, not yet entered): the spec as params."""
    from sbir import tracking

    # create the store and experiment here, once, before any trial starts (concurrent creation races)
    tracking.get_or_create_experiment(experiment)
    return tracking.nested_run(experiment, f"sweep {spec.name}",
                               {"sweep.name": spec.name, "sweep.stages": ",".join(spec.stages),
                                "sweep.objective": spec.objective.metric, "sweep.mode": spec.objective.mode,
                                "sweep.num_samples": spec.num_samples, "sweep.seed": spec.seed,
                                "sweep.validation": spec.validation,
                                **{f"space.{k}": d.model_dump_json() for k, d in spec.space.items()},
                                **{f"base.{k}": v for k, v in spec.base_overrides.items()}},
                               tags={"sbir.sweep": spec.name, "sbir.stage": "sweep"})


def _fit(spec: SweepSpec, root: Any, out: Path, ctx: dict[str, Any]) -> Any:
    """Ray up, then the Tuner over :func:`run_trial` (ASHA or FIFO, seeded searcher); returns its ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from sbir.train import runtime as rt

    rt.set_pipeline(root.pipeline)
    # enough logical CPUs for the concurrent trials' workers (one trial's worth at least), never fewer than
    # the machine has; the drivers themselves ask for a sliver (trial_resources) so they never block workers
    worker_cpus = max(1, root.ray.num_workers) * root.ray.cpus_per_worker
    rt.ensure_ray(root.ray.model_copy(update={"num_workers": max(1, root.ray.num_workers),
                                              "cpus_per_worker": worker_cpus}))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec.model_dump_json(), ctx_json=json.dumps(ctx)),
        dict(spec.trial_resources))
    scheduler = (ASHAScheduler(time_attr=spec.asha.time_attr, metric=spec.objective.metric,
                               mode=spec.objective.mode, max_t=spec.asha.max_t,
                               grace_period=spec.asha.grace_period, reduction_factor=spec.asha.reduction_factor)
                 if spec.asha.enabled else FIFOScheduler())
    # a trial's stage reports (forwarded per epoch) do not carry the objective, which comes after the
    # validation; ASHA skips results without its metric, but Tune's strict check would stop the trial
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tuner = tune.Tuner(
        trainable, param_space=param_space(spec),
        tune_config=tune.TuneConfig(num_samples=spec.num_samples, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=spec.seed,
                                                                     max_concurrent=spec.max_concurrent_trials),
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(out / "tune"), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()


def _log_parent(parent: Any, rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """Close the children ASHA stopped, then the counts, the best trial and the result files on the parent run."""
    _close_unfinished_children(rows)
    parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool)})
    parent.set_tags({"sbir.best_trial": summary.get("best_trial_id") or "none"})
    for name in ("results.csv", "objective_vs_params.png", "best_params.yaml", "best_overrides.txt",
                 "trial_overrides.txt", "sweep.json", "spec.yaml"):
        if (out / name).is_file():
            parent.log_artifact(out / name)


def _close_unfinished_children(rows: list[dict[str, Any]]) -> None:
    """Trials stopped by ASHA or killed leave their MLflow run RUNNING: mark them KILLED / FAILED."""
    from sbir import tracking

    for row in rows:
        if row["status"] != "completed" and row.get("mlflow_run_id"):
            tracking.terminate_run(row["mlflow_run_id"], "KILLED" if row["status"] == "pruned" else "FAILED")
