"""Sweeps (sbir.sweep): a tiny Ray Tune sweep over reconstruct -> distill in local mode, its nested MLflow
runs, the results files, and the override files (parse, validate, apply to a params file)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sbir import tracking
from sbir.config import ParamsError, load_params
from sbir.sweep import SweepError, apply_overrides, load_spec, main, read_override_file, run_sweep

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "ray": {"num_workers": 0},
    "teacher_pretrain": {"epochs": 1, "batch_size": 32},
    "reconstruct": {"steps": 4, "batch_size": 16, "log_every": 2, "bank_size": 64},
    "distill": {"rounds": 4, "student_steps": 2, "batch_size": 16, "log_every": 2},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


@pytest.fixture(scope="module")
def tiny_params(tiny_dataset, tmp_path_factory) -> Path:
    """A params file on the tiny dataset with trained tiny teachers in its outputs dir."""
    from sbir.stage import run_stage

    d = tmp_path_factory.mktemp("sweep")
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), json.loads(json.dumps(TINY)))
    params.update(dataset_dir=str(tiny_dataset), outputs_dir=str(d / "outputs"), pipeline="sweep-test")
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    run_stage("teacher_pretrain", argv=["--params", str(path), "--no-mlflow"])
    return path


def _spec(tmp: Path, params: Path, **over) -> Path:
    spec = {
        "name": "tiny", "params": str(params), "stages": ["reconstruct", "distill"],
        "base_overrides": {"reconstruct.steps": 4},
        "space": {"reconstruct.weights.semantic_ce": {"type": "loguniform", "low": 0.5, "high": 5.0},
                  "reconstruct.weights.diversity": {"type": "choice", "values": [0.0, 0.5]}},
        "validation": "category", "validation_options": {"per_class": 4, "precision_ks": [4]},
        "objective": {"metric": "val/crossx_dfl/mAP@all", "mode": "max"},
        "num_samples": 2, "seed": 3, "max_concurrent_trials": 2, **over,
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tiny_sweep_nested_runs_and_best_override(tiny_params, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(_spec(tmp_path, tiny_params), out)
    assert summary["num_trials"] == 2 and summary["num_completed"] == 2, summary
    # results table and plot
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 and set(df["status"]) == {"completed"}
    assert df["objective"].between(0, 1).all()
    assert df["reconstruct.weights.semantic_ce"].between(0.5, 5.0).all()
    assert set(df["reconstruct.weights.diversity"]) <= {0.0, 0.5}
    assert (out / "objective_vs_params.png").stat().st_size > 1000
    best = df.loc[df["objective"].idxmax()]
    assert math.isclose(summary["best_objective"], best["objective"])
    # each trial wrote into its own outputs dir; the pipeline's outputs dir holds only the teachers
    for trial_id in df["trial_id"]:
        assert (out / "trials" / trial_id / "outputs" / "distill" / "students.pt").is_file()
        assert (out / "trials" / trial_id / "outputs" / "teacher_pretrain").is_symlink()
    assert sorted(p.name for p in Path(load_params(tiny_params).outputs_dir).iterdir()) == ["teacher_pretrain"]
    # nested MLflow runs: parent -> one child per trial (params, per-report and final metrics) -> stage runs
    parent_id = summary["parent_run_id"]
    parent = tracking.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sbir.sweep"] == "tiny"
    children = tracking.child_runs("sweep-test", parent_id)
    assert len(children) == 2
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.status == "FINISHED"
        assert "swept.reconstruct.weights.semantic_ce" in child.data.params
        assert "val/crossx_dfl/mAP_at_all" in child.data.metrics
        curve = tracking.metric_history(child.info.run_id, "reconstruct/total")
        assert len(curve) == 2  # steps 4, log_every 2: two reports
        stages = sorted(r.data.tags["sbir.stage"] for r in tracking.child_runs("sweep-test", child.info.run_id))
        assert stages == ["distill", "reconstruct"]
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking.tracking_uri()).list_artifacts(parent_id)}
    assert {"results.csv", "objective_vs_params.png", "best_params.yaml", "best_overrides.txt"} <= artifacts
    # the best config: only the swept keys, nested like params.yaml, valid params, same values as the table
    best_yaml = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best_yaml) == {"reconstruct"} and set(best_yaml["reconstruct"]["weights"]) == {"semantic_ce", "diversity"}
    from_txt = read_override_file(out / "best_overrides.txt")
    assert from_txt == read_override_file(out / "best_params.yaml")
    assert math.isclose(from_txt["reconstruct.weights.semantic_ce"], best["reconstruct.weights.semantic_ce"])
    root = load_params(tiny_params, from_txt)
    assert root.reconstruct.weights.semantic_ce == from_txt["reconstruct.weights.semantic_ce"]
    assert read_override_file(out / "trial_overrides.txt")["reconstruct.steps"] == 4


def test_apply_overrides_keeps_comments_and_validates(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    over = tmp_path / "best_overrides.txt"
    over.write_text("-S reconstruct.weights.semantic_ce=1.5\n-S distill.student_steps=3\n")
    changes = apply_overrides(over, params)
    assert changes["reconstruct.weights.semantic_ce"][1] == 1.5 and changes["distill.student_steps"][1] == 3
    text = params.read_text()
    assert "# MLflow experiment name" in text  # comments kept
    root = load_params(params)
    assert root.reconstruct.weights.semantic_ce == 1.5 and root.distill.student_steps == 3
    assert apply_overrides(over, params) == {}  # idempotent
    # invalid values: nothing written, the error names the key
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  student_steps: 0\n")
    before = params.read_text()
    with pytest.raises(ParamsError, match="student_steps"):
        apply_overrides(bad, params)
    assert params.read_text() == before
    # the CLI
    assert main(["apply", str(over), "--params", str(params), "--dry-run"]) == 0


def test_spec_errors_are_clear(tmp_path, tiny_params):
    with pytest.raises(SweepError, match="unknown stage"):
        load_spec(_spec(tmp_path, tiny_params, stages=["nope"]))
    with pytest.raises(SweepError, match="must include 'distill'"):
        load_spec(_spec(tmp_path, tiny_params, stages=["reconstruct"]))
    with pytest.raises(SweepError, match="do not fit"):
        load_spec(_spec(tmp_path, tiny_params, space={"reconstruct.weights.nope": {"type": "choice", "values": [1]}}))
    with pytest.raises(SweepError, match="low"):
        load_spec(_spec(tmp_path, tiny_params, space={"reconstruct.lr": {"type": "loguniform", "low": 0, "high": 1}}))


def test_shipped_sweep_specs_are_valid():
    names = sorted(p.stem for p in (REPO / "pipelines" / "sweeps").glob("*.yaml"))
    assert {"estimator_weights", "km_alternation", "fg_reward_weight"} <= set(names)
    for name in names:
        spec = load_spec(REPO / "pipelines" / "sweeps" / f"{name}.yaml")
        assert spec.name == name


def test_stage_keys_name_the_stage():
    from sbir.sweep.trial import stage_keys

    assert stage_keys("upper_bound", {"val_mAP@all": 0.5, "step": 3}) == {
        "val_mAP@all": 0.5, "step": 3, "upper_bound/val_mAP@all": 0.5, "upper_bound/step": 3}


def _objective_curve(out: Path, trial_id: str, metric: str) -> dict[int, float]:
    """training_iteration -> objective of every result Tune recorded for the trial (its result.json)."""
    (result_file,) = (out / "tune").glob(f"*/run_trial_{trial_id}_*/result.json")
    rows = [json.loads(line) for line in result_file.read_text().splitlines() if line]
    return {r["training_iteration"]: r[metric] for r in rows if metric in r}


def test_objective_reported_during_training_lets_asha_prune(tiny_params, tmp_path):
    """upper_bound validates every eval_every steps and the trial reports each point to Tune under the name
    the objective has (``upper_bound/best_val_mAP@all``), so ASHA compares trials at its rungs while they
    train. Two trials run one after the other; ASHA's rule then says exactly what must happen: the second
    stops at the first rung (iteration 2) where its objective is below the first trial's."""
    out = tmp_path / "sweep"
    metric = "upper_bound/best_val_mAP@all"
    spec = _spec(tmp_path, tiny_params, stages=["upper_bound"], validation="none", validation_options={},
                 base_overrides={"upper_bound.max_steps": 12, "upper_bound.eval_every": 2, "upper_bound.patience": 10,
                                 "upper_bound.batch_size": 16},
                 space={"upper_bound.lr": {"type": "grid", "values": [0.01, 1e-9]}},
                 objective={"metric": metric, "mode": "max"}, num_samples=1, max_concurrent_trials=1,
                 asha={"enabled": True, "time_attr": "training_iteration", "max_t": 100, "grace_period": 2,
                       "reduction_factor": 2})
    summary = run_sweep(spec, out, use_mlflow=False)
    df = pd.read_csv(out / "results.csv").set_index("upper_bound.lr")
    assert summary["num_trials"] == 2 and summary["num_failed"] == 0, summary
    first, second = (_objective_curve(out, df.loc[lr, "trial_id"], metric) for lr in (0.01, 1e-9))
    assert df.loc[0.01, "status"] == "completed"
    assert sorted(first) == list(range(1, 8))  # 6 validation points during training + the trial's final result
    assert math.isclose(first[7], df.loc[0.01, "objective"])
    # ASHA's rungs at 2 and 4 (grace 2, factor 2); the cutoff of one recorded trial is its value
    stop_at = next((m for m in (2, 4) if second[m] < first[m]), None)
    if stop_at is None:
        assert df.loc[1e-9, "status"] == "completed"
    else:
        assert df.loc[1e-9, "status"] == "pruned" and max(second) == stop_at
