"""One Tune trial: the spec's stages through :func:`sbir.stage.run_stage` with the trial's params, then the
objective's validation; every report goes to Tune and to the trial's MLflow run."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sbir.config import load_params
from sbir.sweep.spec import SweepSpec, format_override, repo_path
from sbir.sweep.upstream import link_upstream

if TYPE_CHECKING:
    from sbir.train.runtime import TrainingHooks

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


def stage_keys(stage: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A stage report as Tune gets it: every key also as ``<stage>/<key>``, the name the trial's final
    result gives it, so an objective such as ``upper_bound/best_val_mAP@all`` is in every report of a
    loop that validates as it trains, and ASHA can stop the trial early on it."""
    return {**metrics, **{f"{stage}/{k}": v for k, v in metrics.items()}}


try:
    from ray.tune.integration.ray_train import TuneReportCallback as _TuneReportCallback
except Exception:  # pragma: no cover
    _TuneReportCallback = object  # type: ignore[assignment,misc]


class StageTuneReportCallback(_TuneReportCallback):  # type: ignore[misc,valid-type]
    """Ray Tune's report callback with the stage's name on the keys (see :func:`stage_keys`)."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [stage_keys(self.stage, metrics[0]), *metrics[1:]], checkpoint)


def run_trial(config: dict[str, Any], spec_json: str, ctx_json: str) -> None:
    """The Tune trial driver: run the spec's stages with this trial's params, then score them."""
    from ray import tune

    from sbir import tracking

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
    import ray

    summary: dict[str, Any] = {"trial_id": trial_id, "swept": swept, "linked_upstream": linked, "status": "running",
                               "node_id": ray.get_runtime_context().get_node_id()}  # where it ran, on a cluster
    _write_summary(trial_dir, summary)
    parent = ctx.get("parent_run_id")
    local = int(load_params(repo_path(spec.params), overrides).ray.num_workers) == 0
    start = time.time()
    if parent is None:
        final = _run_stages(spec, overrides, trial_dir, local, None)
        run_id = None
    else:
        params = {**{f"swept.{k}": v for k, v in swept.items()}, **{f"base.{k}": v for k, v in spec.base_overrides.items()},
                  "trial_id": trial_id, "stages": ",".join(spec.stages), "validation": spec.validation}
        with tracking.nested_run(ctx["experiment"], f"trial {trial_id}", params, parent_run_id=parent,
                                 tags={"sbir.sweep": spec.name, "sbir.trial_id": trial_id}) as run:
            summary["mlflow_run_id"] = run.run_id
            _write_summary(trial_dir, summary)
            final = _run_stages(spec, overrides, trial_dir, local, run)
            run.log_metrics({k.replace("@", "_at_"): v for k, v in final.items()})
            run_id = run.run_id
    if spec.objective.metric not in final:
        raise KeyError(f"trial {trial_id}: objective {spec.objective.metric!r} not among the reported metrics "
                       f"{sorted(final)[:40]}")
    summary.update(status="completed", metrics=final, seconds=round(time.time() - start, 1), mlflow_run_id=run_id)
    _write_summary(trial_dir, summary)
    # the last report carries the objective (a stage's per-report keys of the same name are overwritten)
    tune.report({**final, "sweep_trial_done": 1.0})


def _write_summary(trial_dir: Path, summary: dict[str, Any]) -> None:
    (trial_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def _run_stages(spec: SweepSpec, overrides: dict[str, Any], trial_dir: Path, local: bool,
                run: Any) -> dict[str, float]:
    """The spec's stages in order (each through :func:`sbir.stage.run_stage`, as ``sbir run <stage>``
    would), then the validation; returns ``<stage>/<metric>`` of every stage and the ``val/*`` metrics."""
    from sbir import tracking
    from sbir.stage import run_stage
    from sbir.train import runtime as rt
    from sbir.tune_validation import run_validation

    argv = ["--params", str(repo_path(spec.params))]
    for k, v in overrides.items():
        argv += ["--set", format_override(k, v)]
    stage_metrics: dict[str, float] = {}
    with rt.training_hooks(_training_hooks(trial_dir, local, run)), \
            tracking.default_parent(run.run_id if run is not None else None):
        for stage in spec.stages:
            extra = ["--no-mlflow"] if run is None else []
            out = run_stage(stage, argv=argv + extra)
            stage_metrics.update({f"{stage}/{k}": v for k, v in _numeric(out).items()})
    root = load_params(repo_path(spec.params), overrides)
    val = run_validation(spec.validation, repo_path(root.dataset_dir), trial_dir / "outputs", spec.validation_options,
                         torch_threads=root.ray.torch_threads_per_worker)
    return {**stage_metrics, **val}


def _training_hooks(trial_dir: Path, local: bool, run: Any) -> TrainingHooks:
    """What the trial adds to every Ray Train fit of its stages: its own Ray storage and the reports to Tune
    and MLflow (``TuneReportCallback`` + :class:`MlflowReportCallback`; in local mode, where Ray runs no
    callbacks, the runtime hands each report to ``on_local_report`` instead)."""
    from ray import tune

    from sbir.train import runtime as rt

    counters: dict[str, int] = {}

    def on_local_report(stage: str, metrics: dict) -> None:  # local mode: no Train callbacks run
        counters[stage] = counters.get(stage, 0) + 1
        tune.report(stage_keys(stage, _numeric(metrics)))
        if run is not None:
            run.log_metrics({f"{stage}/{k}": v for k, v in _numeric(metrics).items()},
                            step=_report_step(metrics, counters[stage]))

    def callbacks(stage: str) -> list:
        return [StageTuneReportCallback(stage)] + ([MlflowReportCallback(run, stage)] if run is not None else [])

    return rt.TrainingHooks(storage_root=trial_dir / "ray_results", callbacks=None if local else callbacks,
                            on_local_report=on_local_report if local else None)
