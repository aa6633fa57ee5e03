"""Ray Tune sweeps over any stage's params, with nested MLflow runs and the best config as a params override.

Usage (``docs/sweeps.md`` has the details)::

    python -m sbir.sweep pipelines/sweeps/estimator_weights.yaml          # run a sweep (make sweep SWEEP=...)
    python -m sbir.sweep apply <sweep dir>/best_params.yaml               # merge the best config into params.yaml
    python -m sbir.sweep verify <sweep dir>                               # rerun the best trial through DVC
    python -m sbir.sweep validate --kind category --outputs-dir outputs   # the objective on some outputs

A sweep spec (``pipelines/sweeps/*.yaml``, validated by :class:`SweepSpec`) names the stages each trial
runs, base overrides that shrink the run, the search space per dotted params key, the objective, the
searcher seed, ASHA and the concurrency. The Tuner runs :func:`_trial` once per trial (Ray's current
pattern for Tune over Train): the trial runs the stage functions in-process through
:func:`sbir.stage.run_stage`, so every training stage is a real ``TorchTrainer.fit`` (through
:func:`sbir.train.runtime.run_training`), with ``TuneReportCallback`` (and a callback that logs each
report to the trial's MLflow run) added through :class:`sbir.train.runtime.TrainingHooks`. Each trial
writes to its own ``outputs_dir`` and Ray storage under the sweep folder; the stages it does not run
are linked from the pipeline's outputs (read only), so the pipeline's ``outputs/`` is never written.

The objective is a held-out validation score computed after the trial's stages
(:mod:`sbir.tune_validation`, train-split validation sets, never the test split), or, with
``validation: none``, a metric the last stage's loop reports itself.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sbir.config import ParamsError, flatten, load_params, read_yaml, set_dotted
from sbir.tracking import REPO_ROOT

# ----------------------------------------------------------------------------------------- the spec


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChoiceDim(_Spec):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class GridDim(_Spec):
    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)


class UniformDim(_Spec):
    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _order(self) -> "UniformDim":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class LogUniformDim(UniformDim):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> "LogUniformDim":
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        return self


Dim = Union[ChoiceDim, GridDim, UniformDim, LogUniformDim]


class Objective(_Spec):
    metric: str = Field(description="a key the trial reports, e.g. val/crossx_dfl/mAP@all")
    mode: Literal["max", "min"] = "max"


class AshaSpec(_Spec):
    enabled: bool = True
    time_attr: str = "training_iteration"
    max_t: int = Field(1000, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_Spec):
    """One sweep: ``pipelines/sweeps/<name>.yaml``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    params: str = Field("params.yaml", description="the params file trials start from (relative to the repo)")
    stages: list[str] = Field(min_length=1, description="stages each trial runs, in order")
    base_overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value for every trial")
    space: dict[str, Dim] = Field(min_length=1, description="dotted params key -> search dimension")
    validation: Literal["category", "fine_grained", "none"] = "category"
    validation_options: dict[str, Any] = Field(default_factory=dict)
    objective: Objective
    num_samples: int = Field(4, ge=1, description="samples of the space (each grid point num_samples times)")
    seed: int = Field(0, description="searcher seed: the same seed draws the same trial configs")
    asha: AshaSpec = AshaSpec()
    max_concurrent_trials: int = Field(2, ge=1)
    trial_resources: dict[str, float] = Field(default_factory=lambda: {"cpu": 0.01},
                                              description="the trial driver's own resources (workers ask for theirs)")

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {sorted(STAGES)}")
        needs = {"category": "distill", "fine_grained": "fgsbir_joint"}.get(self.validation)
        if needs and needs not in self.stages:
            raise ValueError(f"validation {self.validation!r} scores the {needs} stage's output, so stages must "
                             f"include {needs!r} (otherwise every trial would score the pipeline's own {needs})")
        both = set(self.space) & set(self.base_overrides)
        if both:
            raise ValueError(f"key(s) {sorted(both)} are both swept and in base_overrides")
        if "outputs_dir" in self.space or "outputs_dir" in self.base_overrides:
            raise ValueError("outputs_dir is set per trial by the sweep")
        if self.trial_resources.get("cpu", 0) <= 0:
            raise ValueError("trial_resources.cpu must be > 0 (Ray refuses an empty bundle; 0.01 is enough)")
        return self


class SweepError(ValueError):
    """A sweep spec or sweep folder is invalid; the message names the file and the problem."""


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep spec; also check every swept and base key against the params models."""
    path = Path(path)
    try:
        spec = SweepSpec.model_validate(read_yaml(path))
    except ParamsError as exc:
        raise SweepError(str(exc)) from None
    except ValidationError as exc:
        lines = [f"{path}: invalid sweep spec"]
        for err in exc.errors():
            lines.append(f"  {'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}")
        raise SweepError("\n".join(lines)) from None
    # every key must exist in the params (validated values: one sample of each dimension)
    params_path = repo_path(spec.params)
    sample = {k: _sample_value(d) for k, d in spec.space.items()}
    try:
        load_params(params_path, {**spec.base_overrides, **sample})
    except ParamsError as exc:
        raise SweepError(f"{path}: the overrides do not fit {params_path}:\n{exc}") from None
    flat = flatten(read_yaml(params_path))
    unknown = [k for k in list(spec.space) + list(spec.base_overrides)
               if k not in flat and not any(f.startswith(k + ".") for f in flat)]
    if unknown:  # keys the models accept with defaults but the file lacks: allowed, named so typos show
        print(f"[sweep] note: {unknown} not in {params_path}; using the params models' validation only", flush=True)
    return spec


def _sample_value(d: Dim) -> Any:
    if isinstance(d, (ChoiceDim, GridDim)):
        return d.values[0]
    if isinstance(d, LogUniformDim):
        return math.sqrt(d.low * d.high)
    return (d.low + d.high) / 2


def repo_path(p: str | os.PathLike) -> Path:
    p = Path(p)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in spec.space.items():
        if isinstance(d, ChoiceDim):
            out[key] = tune.choice(d.values)
        elif isinstance(d, GridDim):
            out[key] = tune.grid_search(d.values)
        elif isinstance(d, LogUniformDim):
            out[key] = tune.loguniform(d.low, d.high)
        else:
            out[key] = tune.uniform(d.low, d.high)
    return {"swept": out}


# ------------------------------------------------------------------------------------- the stages

# stage -> (module, function, run_stage kwargs, fixed function kwargs): mirrors stages/<stage>.py
STAGES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "prepare": ("sbir.data.prepare", "run_prepare", {}, {}),
    "teacher_pretrain": ("sbir.dfsbir.teacher", "run_teacher_pretrain", {}, {}),
    "reconstruct": ("sbir.dfsbir.reconstruct", "run_reconstruct", {}, {}),
    "distill": ("sbir.dfsbir.distill", "run_distill", {"section": "distill"}, {}),
    "upper_bound": ("sbir.dfsbir.distill", "run_distill", {"section": "distill"}, {"source": "real"}),
    "evaluate": ("sbir.dfsbir.evaluate", "run_evaluate", {}, {}),
    "sketch_generator": ("sbir.fgsbir.generator_train", "run_sketch_generator", {"section": "sketch_generator"}, {}),
    "pseudo_pairs": ("sbir.fgsbir.pseudo_pairs", "run_pseudo_pairs", {"section": "pseudo_pairs"}, {}),
    "fgsbir_joint": ("sbir.fgsbir.joint", "run_fgsbir_joint", {"section": "fgsbir_joint"}, {}),
    "fg_evaluate": ("sbir.fgsbir.evaluate", "run_fg_evaluate", {"section": "fg_evaluate"}, {}),
}


def stage_function(stage: str) -> tuple[Callable[[Any], Mapping[str, Any]], dict[str, Any]]:
    import functools
    import importlib

    module, name, run_kwargs, fn_kwargs = STAGES[stage]
    fn = getattr(importlib.import_module(module), name)
    return (functools.partial(fn, **fn_kwargs) if fn_kwargs else fn), run_kwargs


def format_override(key: str, value: Any) -> str:
    """``key=value`` with the value as compact YAML/JSON (no spaces: safe for ``$(cat file)``)."""
    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def link_upstream(base_outputs: Path, trial_outputs: Path, run_stages: list[str]) -> list[str]:
    """Link the pipeline's outputs of the stages a trial does not run into its outputs dir (read only)."""
    trial_outputs.mkdir(parents=True, exist_ok=True)
    linked = []
    for stage in STAGES:
        src, dst = base_outputs / stage, trial_outputs / stage
        if stage in run_stages or not src.is_dir() or dst.exists() or dst.is_symlink():
            continue
        dst.symlink_to(src.resolve(), target_is_directory=True)
        linked.append(stage)
    return linked


def upstream_checksums(base_outputs: Path, run_stages: list[str]) -> dict[str, str]:
    """sha256 of every file of the upstream stage outputs a sweep links (``verify`` checks they did not change)."""
    import hashlib

    out = {}
    for stage in STAGES:
        d = base_outputs / stage
        if stage in run_stages or not d.is_dir():
            continue
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            out[str(f.relative_to(base_outputs))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------ one trial

_POSITION_KEYS = ("step", "round", "epoch")


def _report_step(metrics: Mapping[str, Any], count: int) -> int:
    for k in _POSITION_KEYS:
        v = metrics.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return count


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


try:  # the Train callback base class; Ray is a dependency, but keep the module importable without it
    from ray.train.v2.api.callback import UserCallback as _UserCallback
except Exception:  # pragma: no cover
    _UserCallback = object  # type: ignore[assignment,misc]


class MlflowReportCallback(_UserCallback):  # type: ignore[misc,valid-type]
    """Ray Train callback (runs on the Train controller): every report of the stage's workers goes to the
    trial's MLflow run as ``<stage>/<metric>`` at the report's step, so the trial run holds the curves."""

    def __init__(self, run: Any, stage: str) -> None:
        self.run, self.stage, self.count = run, stage, 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        self.count += 1
        m = metrics[0]
        self.run.log_metrics({f"{self.stage}/{k}": v for k, v in _numeric(m).items()}, step=_report_step(m, self.count))


def _trial(config: dict[str, Any], spec_json: str, ctx_json: str) -> None:
    """The Tune trial driver: run the spec's stages with this trial's params, then score them."""
    from ray import tune

    from sbir import tracking
    from sbir.stage import run_stage
    from sbir.train import runtime as rt
    from sbir.tune_validation import run_validation

    spec = SweepSpec.model_validate_json(spec_json)
    ctx = json.loads(ctx_json)
    os.environ.update(ctx["env"])  # the sweep's MLflow store and Ray folders, whatever the actor inherited
    swept = dict(config["swept"])
    tune_ctx = tune.get_context()
    trial_id = tune_ctx.get_trial_id()
    trial_dir = Path(ctx["out_dir"]) / "trials" / trial_id
    outputs = trial_dir / "outputs"
    linked = link_upstream(Path(ctx["base_outputs"]), outputs, spec.stages)
    overrides = {**spec.base_overrides, **swept, "outputs_dir": str(outputs)}
    argv = ["--params", str(repo_path(spec.params))]
    for k, v in overrides.items():
        argv += ["--set", format_override(k, v)]
    summary: dict[str, Any] = {"trial_id": trial_id, "swept": swept, "linked_upstream": linked, "status": "running"}
    (trial_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    parent = ctx.get("parent_run_id")
    local = int(load_params(repo_path(spec.params), overrides).ray.num_workers) == 0
    counters: dict[str, int] = {}

    def run_block(run: Any) -> dict[str, float]:
        def on_local_report(stage: str, metrics: dict) -> None:  # local mode: no Train callbacks run
            counters[stage] = counters.get(stage, 0) + 1
            tune.report(_numeric(metrics))
            if run is not None:
                run.log_metrics({f"{stage}/{k}": v for k, v in _numeric(metrics).items()},
                                step=_report_step(metrics, counters[stage]))

        def callbacks(stage: str) -> list:
            from ray.tune.integration.ray_train import TuneReportCallback

            return [TuneReportCallback()] + ([MlflowReportCallback(run, stage)] if run is not None else [])

        hooks = rt.TrainingHooks(storage_root=trial_dir / "ray_results", callbacks=None if local else callbacks,
                                 on_local_report=on_local_report if local else None)
        stage_metrics: dict[str, float] = {}
        with rt.training_hooks(hooks), tracking.default_parent(run.run_id if run is not None else None):
            for stage in spec.stages:
                fn, run_kwargs = stage_function(stage)
                extra = ["--no-mlflow"] if run is None else []
                out = run_stage(stage, fn, argv=argv + extra, **run_kwargs)
                stage_metrics.update({f"{stage}/{k}": v for k, v in _numeric(out).items()})
        root = load_params(repo_path(spec.params), overrides)
        val = run_validation(spec.validation, repo_path(root.dataset_dir), outputs, spec.validation_options,
                             torch_threads=root.ray.torch_threads_per_worker)
        return {**stage_metrics, **val}

    start = time.time()
    if parent is None:
        final = run_block(None)
        run_id = None
    else:
        params = {**{f"swept.{k}": v for k, v in swept.items()}, **{f"base.{k}": v for k, v in spec.base_overrides.items()},
                  "trial_id": trial_id, "stages": ",".join(spec.stages), "validation": spec.validation}
        with tracking.nested_run(ctx["experiment"], f"trial {trial_id}", params, parent_run_id=parent,
                                 tags={"sbir.sweep": spec.name, "sbir.trial_id": trial_id}) as run:
            summary["mlflow_run_id"] = run.run_id
            (trial_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            final = run_block(run)
            run.log_metrics({k.replace("@", "_at_"): v for k, v in final.items()})
            run_id = run.run_id
    if spec.objective.metric not in final:
        raise KeyError(f"trial {trial_id}: objective {spec.objective.metric!r} not among the reported metrics "
                       f"{sorted(final)[:40]}")
    summary.update(status="completed", metrics=final, seconds=round(time.time() - start, 1), mlflow_run_id=run_id)
    (trial_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    # the last report carries the objective (a stage's per-report keys of the same name are overwritten)
    tune.report({**final, "sweep_trial_done": 1.0})


# ------------------------------------------------------------------------------------ the driver


def default_out_dir(spec: SweepSpec) -> Path:
    """``ray_results/sweeps/<name>`` (under $SBIR_RAY_RESULTS when set, like the Ray Train folders)."""
    return (Path(os.environ.get("SBIR_RAY_RESULTS", REPO_ROOT / "ray_results")) / "sweeps" / spec.name).resolve()


def run_sweep(spec_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, use_mlflow: bool = True,
              extra_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the summary written to ``<out_dir>/sweep.json``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from sbir import tracking
    from sbir.train import runtime as rt

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
    parent_cm = None
    parent_id = None
    if use_mlflow:
        # create the store and experiment here, once, before any trial starts (concurrent creation races)
        tracking.get_or_create_experiment(root.pipeline)
        parent_cm = tracking.nested_run(root.pipeline, f"sweep {spec.name}",
                                        {"sweep.name": spec.name, "sweep.stages": ",".join(spec.stages),
                                         "sweep.objective": spec.objective.metric, "sweep.mode": spec.objective.mode,
                                         "sweep.num_samples": spec.num_samples, "sweep.seed": spec.seed,
                                         "sweep.validation": spec.validation,
                                         **{f"space.{k}": d.model_dump_json() for k, d in spec.space.items()},
                                         **{f"base.{k}": v for k, v in spec.base_overrides.items()}},
                                        tags={"sbir.sweep": spec.name, "sbir.stage": "sweep"})
    ctx = {"out_dir": str(out), "base_outputs": str(base_outputs), "env": env, "experiment": root.pipeline}
    start = time.time()
    parent = parent_cm.__enter__() if parent_cm else None
    try:
        if parent is not None:
            parent_id = ctx["parent_run_id"] = parent.run_id
        rt.set_pipeline(root.pipeline)
        # enough logical CPUs for the concurrent trials' workers (one trial's worth at least), never fewer than
        # the machine has; the drivers themselves ask for a sliver (trial_resources) so they never block workers
        worker_cpus = max(1, root.ray.num_workers) * root.ray.cpus_per_worker
        rt._ensure_ray(root.ray.model_copy(update={"num_workers": max(1, root.ray.num_workers),
                                                   "cpus_per_worker": worker_cpus}))
        trainable = tune.with_resources(
            tune.with_parameters(_trial, spec_json=spec.model_dump_json(), ctx_json=json.dumps(ctx)),
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
        grid = tuner.fit()
        rows = collect_results(spec, out, grid)
        summary = write_results(spec, out, rows, root, seconds=time.time() - start)
        if parent is not None:
            _close_unfinished_children(rows)
            parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))
                                and not isinstance(v, bool)})
            parent.set_tags({"sbir.best_trial": summary.get("best_trial_id") or "none"})
            for name in ("results.csv", "objective_vs_params.png", "best_params.yaml", "best_overrides.txt",
                         "trial_overrides.txt", "sweep.json", "spec.yaml"):
                if (out / name).is_file():
                    parent.log_artifact(out / name)
        summary["parent_run_id"] = parent_id
        (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    except BaseException as exc:
        if parent_cm:
            parent_cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if parent_cm:
        parent_cm.__exit__(None, None, None)
    return summary  # Ray stays up for the rest of this process (tests share it); it stops when the process exits


def collect_results(spec: SweepSpec, out: Path, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: status (completed / pruned / failed), objective, swept values, metrics.

    The trial's own ``summary.json`` is the record of completion (Tune's last result can be a stage report
    that reached Tune after the trial's final one: TuneReportCallback forwards through a queue)."""
    import re

    rows = []
    for result in grid:
        config = (result.config or {}).get("swept", {})
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id")
        if not trial_id and result.path:
            m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(result.path).name)
            trial_id = m.group(1) if m else Path(result.path).name
        summary_file = out / "trials" / str(trial_id) / "summary.json"
        trial_summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if result.error is not None:
            status = "failed"
        elif trial_summary.get("status") == "completed":
            status = "completed"
        else:
            status = "pruned"  # stopped by ASHA before its final report
        final = trial_summary.get("metrics", {}) if status == "completed" else {}
        objective = final.get(spec.objective.metric)
        row: dict[str, Any] = {"trial_id": trial_id, "status": status,
                               "objective": float(objective) if objective is not None else float("nan")}
        row.update({k: config.get(k, trial_summary.get("swept", {}).get(k)) for k in spec.space})
        row.update({"iterations": metrics.get("training_iteration"),
                    "seconds": trial_summary.get("seconds", round(float(metrics.get("time_total_s", float("nan"))), 1)),
                    "mlflow_run_id": trial_summary.get("mlflow_run_id"),
                    "error": _short_error(result.error)})
        row.update({k: v for k, v in final.items() if k.startswith("val/")})
        rows.append(row)
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows


def _short_error(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def _close_unfinished_children(rows: list[dict[str, Any]]) -> None:
    """Trials stopped by ASHA or killed leave their MLflow run RUNNING: mark them KILLED / FAILED."""
    from sbir import tracking

    for row in rows:
        if row["status"] != "completed" and row.get("mlflow_run_id"):
            tracking.terminate_run(row["mlflow_run_id"], "KILLED" if row["status"] == "pruned" else "FAILED")


def best_row(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "completed" and math.isfinite(r["objective"])]
    if not done:
        return None
    sign = 1 if spec.objective.mode == "max" else -1
    # ties: the first trial in id order (deterministic)
    return max(done, key=lambda r: (sign * r["objective"], -rows.index(r)))


def write_results(spec: SweepSpec, out: Path, rows: list[dict[str, Any]], root: Any, seconds: float) -> dict[str, Any]:
    """results.csv, objective_vs_params.png, best_params.yaml, best_overrides.txt, trial_overrides.txt."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    plot_objective(spec, df, out / "objective_vs_params.png")
    counts = {s: int((df["status"] == s).sum()) for s in ("completed", "pruned", "failed")}
    summary: dict[str, Any] = {"sweep": spec.name, "objective": spec.objective.metric, "mode": spec.objective.mode,
                               "validation": spec.validation, "num_trials": len(rows),
                               **{f"num_{k}": v for k, v in counts.items()}, "sweep_seconds": round(seconds, 1),
                               "out_dir": str(out)}
    best = best_row(spec, rows)
    if best is None:
        summary["best_trial_id"] = None
        print(f"[sweep] no trial completed ({counts}); see {out / 'results.csv'}", flush=True)
        return summary
    best_values = {k: best[k] for k in spec.space}
    # check the override is valid params before writing it
    load_params(repo_path(spec.params), {**spec.base_overrides, **best_values})
    nested: dict[str, Any] = {}
    for k, v in best_values.items():
        set_dotted(nested, k, v)
    header = (f"# best of sweep {spec.name}: trial {best['trial_id']}, {spec.objective.metric} = "
              f"{best['objective']:.6g} ({spec.objective.mode}); validation: {spec.validation} (train split)\n"
              f"# only the swept keys; the trial also used the base overrides in trial_overrides.txt\n")
    (out / "best_params.yaml").write_text(header + yaml.safe_dump(nested, sort_keys=False))
    (out / "best_overrides.txt").write_text("".join(f"-S {format_override(k, v)}\n" for k, v in best_values.items()))
    (out / "trial_overrides.txt").write_text("".join(f"-S {format_override(k, v)}\n"
                                                     for k, v in {**spec.base_overrides, **best_values}.items()))
    summary.update(best_trial_id=best["trial_id"], best_objective=best["objective"], best_params=best_values)
    print(f"[sweep] {counts['completed']} completed, {counts['pruned']} pruned, {counts['failed']} failed; best "
          f"{spec.objective.metric} = {best['objective']:.4f} (trial {best['trial_id']}): {best_values}", flush=True)
    return summary


def plot_objective(spec: SweepSpec, df: Any, path: Path) -> None:
    """One panel per swept key: the objective of every completed trial against the key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    done = df[df["status"] == "completed"]
    best = best_row(spec, df.to_dict("records"))
    for ax, key in zip(axes[0], keys):
        dim = spec.space[key]
        values = done[key].tolist()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            x = values
            if isinstance(dim, LogUniformDim):
                from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ScalarFormatter())  # 0.2, 0.5, 1, 2, 5 rather than 2x10^-1
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:  # categorical: positions in the order of the spec's values
            labels = [json.dumps(v) for v in getattr(dim, "values", sorted(set(map(str, values))))]
            x = [labels.index(json.dumps(v)) if json.dumps(v) in labels else -1 for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.scatter(x, done["objective"], c="tab:blue", label="trial")
        if best is not None:
            bx = best[key] if numeric else [json.dumps(v) for v in getattr(dim, "values", [])].index(json.dumps(best[key]))
            ax.scatter([bx], [best["objective"]], c="tab:red", marker="*", s=160, label="best")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(spec.objective.metric, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    n_other = int((df["status"] != "completed").sum())
    fig.suptitle(f"sweep {spec.name}: {len(done)} completed trials" + (f" ({n_other} pruned/failed not shown)"
                                                                       if n_other else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ override files


def read_override_file(path: str | os.PathLike) -> dict[str, Any]:
    """Dotted key -> value from ``best_params.yaml`` (nested) or ``best_overrides.txt`` (``-S key=value`` lines)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: override file not found")
    if path.suffix in (".yaml", ".yml"):
        data = read_yaml(path)

        def walk(node: Any, prefix: str) -> dict[str, Any]:
            if isinstance(node, dict):
                return {k2: v2 for k, v in node.items() for k2, v2 in walk(v, f"{prefix}{k}.").items()}
            return {prefix[:-1]: node}

        return walk(data, "")
    out: dict[str, Any] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for flag in ("-S ", "--set-param ", "--set "):
            if line.startswith(flag):
                line = line[len(flag):].strip()
                break
        if "=" not in line:
            raise SweepError(f"{path}:{n}: expected '-S key=value', got {line!r}")
        key, value = line.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}:{n}: value of {key.strip()!r} is not valid YAML ({exc})") from None
    return out


def apply_overrides(override_file: str | os.PathLike, params_path: str | os.PathLike = "params.yaml",
                    dry_run: bool = False) -> dict[str, tuple[Any, Any]]:
    """Merge an override file into a params file, keeping its comments and layout (ruamel.yaml round trip).

    The merged params are validated first (nothing is written when they are invalid). Returns
    ``{key: (old, new)}`` of the keys that change.
    """
    from ruamel.yaml import YAML

    params_path = repo_path(params_path)
    overrides = read_override_file(override_file)
    load_params(params_path, overrides)  # raises ParamsError naming the file and key
    ryaml = YAML()  # round trip: comments and key order stay
    ryaml.preserve_quotes = True
    ryaml.width = 4096
    with params_path.open() as f:
        doc = ryaml.load(f)
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        old = node.get(parts[-1]) if hasattr(node, "get") else None
        if old != value:
            changes[key] = (old, value)
            node[parts[-1]] = value
    if changes and not dry_run:
        tmp = params_path.with_name(params_path.name + ".tmp")
        with tmp.open("w") as f:
            ryaml.dump(doc, f)
        load_params(tmp)  # what we wrote must still validate
        os.replace(tmp, params_path)
    return changes


# ------------------------------------------------------------------------------------ verification


def verify(sweep_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None, keep: bool = False
           ) -> dict[str, Any]:
    """Rerun the best trial's stages through ``dvc repro`` in a temporary copy of the repository (its
    params.yaml with ``trial_overrides.txt`` applied, the pipeline's upstream outputs copied in), score
    the result with the same validation and compare with the sweep's best objective."""
    import tempfile

    sweep_dir = Path(sweep_dir).resolve()
    summary_file = sweep_dir / "sweep.json"
    if not summary_file.is_file():
        raise SweepError(f"{summary_file} not found: not a finished sweep folder")
    summary = json.loads(summary_file.read_text())
    if not summary.get("best_trial_id"):
        raise SweepError(f"{summary_file}: the sweep has no completed trial")
    spec = SweepSpec.model_validate(yaml.safe_load((sweep_dir / "spec.yaml").read_text()))
    tmp_ctx = tempfile.TemporaryDirectory(prefix="sbir-verify-", dir=work_dir)
    repo = Path(tmp_ctx.name) / "repo"
    try:
        repo.mkdir()
        for item in ("dvc.yaml", "dvc.lock", "stages", "src", ".dvc", ".dvcignore", ".gitignore", spec.params):
            src = REPO_ROOT / item
            if src.is_dir():
                shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", "*.tmp"))
            elif src.is_file():
                (repo / item).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, repo / item)
        root = load_params(repo_path(spec.params))
        if Path(root.outputs_dir).is_absolute() or Path(root.dataset_dir).is_absolute():
            raise SweepError(f"{spec.params}: verify needs relative outputs_dir and dataset_dir (the copy would "
                             "otherwise write to the original folders)")
        base_outputs = repo_path(root.outputs_dir)
        recorded = sweep_dir / "upstream.json"
        if recorded.is_file():
            now = upstream_checksums(base_outputs, spec.stages)
            changed = sorted(k for k, v in json.loads(recorded.read_text()).items() if now.get(k) != v)
            if changed:
                raise SweepError(f"{base_outputs}: {len(changed)} upstream file(s) changed since the sweep ran "
                                 f"(e.g. {changed[:3]}); rerun the sweep on the current outputs")
        for stage in STAGES:  # upstream outputs as real copies (DVC hashes its deps)
            if stage not in spec.stages and (base_outputs / stage).is_dir():
                shutil.copytree(base_outputs / stage, repo / root.outputs_dir / stage)
        data = repo_path(root.dataset_dir)
        if data.is_dir():
            (repo / root.dataset_dir).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(data, repo / root.dataset_dir)
        changes = apply_overrides(sweep_dir / "trial_overrides.txt", repo / spec.params)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        env["PYTHONPATH"] = str(repo / "src")
        env["SBIR_MLFLOW_DIR"] = str(repo / "mlflow")
        env["SBIR_RAY_RESULTS"] = str(repo / "ray_results")
        env.pop("SBIR_MLFLOW_URI", None)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=sweep@sbir", "-c", "user.name=sweep", "commit", "-qm", "verify"]):
            subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
        start = time.time()
        dvc = str(Path(sys.executable).parent / "dvc")
        for stage in spec.stages:  # -s: only this stage (its upstream is the copied pipeline output)
            proc = subprocess.run([dvc, "repro", "-s", "-f", stage], cwd=repo, env=env, text=True, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"dvc repro -s {stage} failed in {repo}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        seconds = time.time() - start
        from sbir.tune_validation import run_validation

        vroot = load_params(repo / spec.params)
        val = run_validation(spec.validation, repo / vroot.dataset_dir, repo / vroot.outputs_dir,
                             spec.validation_options, torch_threads=vroot.ray.torch_threads_per_worker)
        got = val.get(spec.objective.metric)
        result = {"sweep_dir": str(sweep_dir), "best_trial_id": summary["best_trial_id"],
                  "objective": spec.objective.metric, "sweep_value": summary["best_objective"], "dvc_value": got,
                  "identical": got == summary["best_objective"],
                  "abs_diff": None if got is None else abs(got - summary["best_objective"]),
                  "params_changed": {k: [o, n] for k, (o, n) in changes.items()}, "dvc_seconds": round(seconds, 1),
                  "dvc_commands": [f"dvc repro -s -f {s}" for s in spec.stages], "validation": val}
        (sweep_dir / "verify.json").write_text(json.dumps(result, indent=2, default=str))
        return result
    finally:
        if keep:
            print(f"[sweep] kept {repo}", flush=True)
        else:
            tmp_ctx.cleanup()


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("run", "apply", "verify", "validate")
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv = ["run"] + argv
    parser = argparse.ArgumentParser(
        prog="python -m sbir.sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ray Tune sweeps over the pipeline's params (docs/sweeps.md).\n\n"
                    "  python -m sbir.sweep pipelines/sweeps/estimator_weights.yaml\n"
                    "  python -m sbir.sweep apply ray_results/sweeps/estimator_weights/best_params.yaml\n"
                    "  python -m sbir.sweep verify ray_results/sweeps/estimator_weights")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a sweep spec (the default command: a .yaml path alone runs it)",
                           description="Run a Ray Tune sweep: one trial = the spec's stages with sampled params, "
                                       "scored on a train-split validation set; one parent MLflow run with a child "
                                       "run per trial; results.csv, objective_vs_params.png, best_params.yaml, "
                                       "best_overrides.txt and trial_overrides.txt in the sweep folder.")
    p_run.add_argument("spec", help="sweep spec, e.g. pipelines/sweeps/estimator_weights.yaml")
    p_run.add_argument("--out", help="sweep folder (default: ray_results/sweeps/<name>; replaced if it exists)")
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="an extra base override for every trial, e.g. --set ray.use_gpu=true (repeatable)")
    p_run.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    p_apply = sub.add_parser("apply", help="merge best_params.yaml / best_overrides.txt into a params file",
                             description="Merge an override file into params.yaml (comments kept), after validating "
                                         "the result. Then `dvc repro` runs the best config.")
    p_apply.add_argument("file", help="best_params.yaml or best_overrides.txt")
    p_apply.add_argument("--params", default="params.yaml", help="params file to edit (default: params.yaml)")
    p_apply.add_argument("--dry-run", action="store_true", help="show the changes without writing")
    p_verify = sub.add_parser("verify", help="rerun the best trial through dvc repro in a temp copy and compare",
                              description=verify.__doc__)
    p_verify.add_argument("sweep_dir")
    p_verify.add_argument("--keep", action="store_true", help="keep the temporary repository copy")
    p_val = sub.add_parser("validate", help="score an outputs folder with a sweep's validation",
                           description="The objective's validation metrics for an outputs folder.")
    p_val.add_argument("--kind", choices=["category", "fine_grained"], required=True)
    p_val.add_argument("--outputs-dir", default="outputs")
    p_val.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from sbir.stage import parse_overrides

            summary = run_sweep(args.spec, args.out, use_mlflow=not args.no_mlflow,
                                extra_overrides=parse_overrides(args.overrides))
            print(json.dumps(summary, indent=2, default=str))
        elif args.command == "apply":
            changes = apply_overrides(args.file, args.params, args.dry_run)
            verb = "would change" if args.dry_run else "changed"
            print(f"{args.params}: {verb} {len(changes)} key(s)")
            for k, (old, new) in changes.items():
                print(f"  {k}: {old!r} -> {new!r}")
        elif args.command == "verify":
            print(json.dumps(verify(args.sweep_dir, keep=args.keep), indent=2, default=str))
        else:
            from sbir.tune_validation import run_validation

            root = load_params(repo_path(args.params))
            print(json.dumps(run_validation(args.kind, repo_path(root.dataset_dir), repo_path(args.outputs_dir),
                                            torch_threads=root.ray.torch_threads_per_worker), indent=2))
    except (SweepError, ParamsError, FileNotFoundError) as exc:
        print(f"[sweep] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # run the importable module's main, not this __main__ copy: Ray pickles the trial function by reference
    # to its module, and classes of a __main__ module would travel by value (pydantic models cannot)
    from sbir.sweep import main as _main

    sys.exit(_main())
