"""Ray Tune sweeps over any stage's params, with nested MLflow runs and the best config as a params override.

Usage (``docs/sweeps.md`` has the details)::

    python -m sbir.sweep pipelines/sweeps/estimator_weights.yaml          # run a sweep (make sweep SWEEP=...)
    python -m sbir.sweep apply <sweep dir>/best_params.yaml               # merge the best config into params.yaml
    python -m sbir.sweep verify <sweep dir>                               # rerun the best trial through DVC
    python -m sbir.sweep validate --kind category --outputs-dir outputs   # the objective on some outputs

A sweep spec (``pipelines/sweeps/*.yaml``, validated by :class:`SweepSpec`) names the stages each trial
runs, base overrides that shrink the run, the search space per dotted params key, the objective, the
searcher seed, ASHA and the concurrency. The Tuner runs :func:`~sbir.sweep.trial.run_trial` once per trial
(Ray's current pattern for Tune over Train): the trial runs the stages of :mod:`sbir.registry` in-process
through :func:`sbir.stage.run_stage`, so every training stage is a real ``TorchTrainer.fit`` (through
:func:`sbir.train.runtime.run_training`), with ``TuneReportCallback`` (and a callback that logs each
report to the trial's MLflow run) added through :class:`sbir.train.runtime.TrainingHooks`. Each trial
writes to its own ``outputs_dir`` and Ray storage under the sweep folder; the stages it does not run
are linked from the pipeline's outputs (read only), so the pipeline's ``outputs/`` is never written.

The objective is a held-out validation score computed after the trial's stages
(:mod:`sbir.tune_validation`, train-split validation sets, never the test split), or, with
``validation: none``, a metric the last stage's loop reports itself.

Modules: :mod:`~sbir.sweep.spec` (the spec, loading, the Tune space), :mod:`~sbir.sweep.upstream` (the
pipeline outputs trials link), :mod:`~sbir.sweep.trial` (one trial), :mod:`~sbir.sweep.run`
(:func:`run_sweep`), :mod:`~sbir.sweep.results` (results.csv, plot, best overrides),
:mod:`~sbir.sweep.apply` (override files into params.yaml), :mod:`~sbir.sweep.verification`
(:func:`verify`), :mod:`~sbir.sweep.cli` (:func:`main`); every public name is re-exported here.
"""
from __future__ import annotations

from sbir.sweep.apply import apply_overrides, read_override_file
from sbir.sweep.cli import main
from sbir.sweep.results import best_row, collect_results, plot_objective, write_results
from sbir.sweep.run import default_out_dir, run_sweep
from sbir.sweep.spec import (
    AshaSpec,
    ChoiceDim,
    Dim,
    GridDim,
    LogUniformDim,
    Objective,
    SweepError,
    SweepSpec,
    UniformDim,
    format_override,
    load_spec,
    param_space,
    repo_path,
)
from sbir.sweep.trial import MlflowReportCallback, run_trial
from sbir.sweep.upstream import link_upstream, upstream_checksums
from sbir.sweep.verification import verify

__all__ = [
    "AshaSpec", "ChoiceDim", "Dim", "GridDim", "LogUniformDim", "MlflowReportCallback", "Objective", "SweepError",
    "SweepSpec", "UniformDim",
    "apply_overrides", "best_row", "collect_results", "default_out_dir", "format_override", "link_upstream",
    "load_spec", "main", "param_space", "plot_objective", "read_override_file", "repo_path", "run_sweep", "run_trial",
    "upstream_checksums", "verify", "write_results",
]
