"""MLflow view and grouping (issue #17 item 4): experiments open in the model-training view, and the
stage runs of one `dvc repro` hang under one parent run, so two repros compare side by side."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sbir import tracking

BIN = Path(sys.executable).parent


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri())


@pytest.mark.parametrize("ancestors,found", [
    ([(30, 3.0, ["/bin/sh", "-c", "python -m sbir run prepare"]),
      (20, 2.0, ["/r/.venv/bin/python", "/r/.venv/bin/dvc", "repro", "dvc.yaml"]),
      (10, 1.0, ["make", "repro"])], (20, 2.0, "dvc repro dvc.yaml")),
    ([(20, 2.0, ["python3", "-m", "dvc", "-q", "exp", "run", "--set-param", "seed=1"])],
     (20, 2.0, "dvc -q exp run --set-param seed=1")),
    ([(20, 2.0, ["dvc", "status"]), (10, 1.0, ["vim", "dvc.yaml"])], None),
    ([(20, 2.0, ["/usr/bin/dvc-tool", "repro"]), (10, 1.0, ["bash"])], None),
    ([], None),
])
def test_the_dvc_repro_a_stage_runs_in_is_found_among_its_ancestors(ancestors, found):
    assert tracking.dvc_invocation(ancestors) == found


def test_experiments_are_tagged_for_the_model_training_view():
    exp_id = tracking.get_or_create_experiment("kind-new")
    assert _client().get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = _client().create_experiment("kind-old")  # made before the tag existed: gets it
    tracking.get_or_create_experiment("kind-old")
    assert _client().get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = _client().create_experiment("kind-chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.get_or_create_experiment("kind-chosen")  # a kind chosen in the UI is left alone
    assert _client().get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    assert tracking.experiment_ui_url("kind-new", "http://127.0.0.1:5000") == \
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    untagged = _client().create_experiment("kind-link")  # the link tags it too (make mlflow-ui before a repro)
    tracking.experiment_ui_url("kind-link")
    assert _client().get_experiment(untagged).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def _stage(experiment: str, stage: str, value: float, fail: bool = False) -> None:
    with tracking.stage_run(experiment, stage, {f"{stage}.lr": value, "seed": 0}, "h") as run:
        run.log_metrics({"loss": value, "mAP@all": 1 - value})
        if fail:
            raise RuntimeError("stage failed")


def test_stages_of_one_repro_share_a_parent_that_carries_their_metrics(monkeypatch):
    exp = "groups"
    for group, value in (("first", 0.5), ("second", 0.25)):
        monkeypatch.setenv(tracking.REPRO_GROUP_ENV, group)
        _stage(exp, "prepare", value)
        _stage(exp, "train", value)
    parents = tracking.repro_runs(exp)
    assert [p.data.tags[tracking.REPRO_TAG] for p in parents] == ["second", "first"]
    for parent, value in zip(parents, (0.25, 0.5)):
        children = tracking.child_runs(exp, parent.info.run_id)
        assert [c.data.tags["sbir.stage"] for c in children] == ["prepare", "train"]
        assert all(c.data.tags[tracking.REPRO_TAG] == parent.data.tags[tracking.REPRO_TAG] for c in children)
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["train/loss"] == value and parent.data.metrics["prepare/mAP_at_all"] == 1 - value
        assert parent.data.params["train.lr"] == str(value) and parent.data.params["seed"] == "0"
    # stage runs are what find_runs lists; the parents only group them
    assert sorted(r.data.tags["sbir.stage"] for r in tracking.find_runs(exp)) == ["prepare"] * 2 + ["train"] * 2

    # the parent ends with its last stage: FAILED when that stage fails
    monkeypatch.setenv(tracking.REPRO_GROUP_ENV, "third")
    _stage(exp, "prepare", 0.1)
    with pytest.raises(RuntimeError):
        _stage(exp, "train", 0.1, fail=True)
    assert tracking.repro_runs(exp)[0].info.status == "FAILED"

    # outside a repro (a stage run by hand, these tests) a stage run has no parent
    monkeypatch.delenv(tracking.REPRO_GROUP_ENV)
    assert tracking.repro_group() is None
    _stage("ungrouped", "prepare", 0.3)
    (run,) = tracking.find_runs("ungrouped")
    assert "mlflow.parentRunId" not in run.data.tags and not tracking.repro_runs("ungrouped")


def test_two_real_dvc_repros_make_two_groups(tmp_path):
    """`dvc repro` runs each stage as its own process: they find their repro through the process tree."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""\
        import sys
        from pathlib import Path
        from sbir import tracking
        stage = sys.argv[1]
        with tracking.stage_run("dvc-groups", stage, {"seed": 0}, "h") as run:
            run.log_metrics({"value": float(len(stage))})
        Path(stage + ".out").write_text("done")
    """))
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          first:
            cmd: {sys.executable} {script} first
            outs: [first.out]
          second:
            cmd: {sys.executable} {script} second
            deps: [first.out]
            outs: [second.out]
    """))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop(tracking.REPRO_GROUP_ENV, None)
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    for _ in range(2):
        proc = subprocess.run([str(BIN / "dvc"), "repro", "--force"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parents = tracking.repro_runs("dvc-groups")
    assert len(parents) == 2 and parents[0].data.tags[tracking.REPRO_TAG] != parents[1].data.tags[tracking.REPRO_TAG]
    for parent in parents:
        assert parent.info.run_name.startswith("dvc repro --force · ")
        assert [c.data.tags["sbir.stage"] for c in tracking.child_runs("dvc-groups", parent.info.run_id)] == \
            ["first", "second"]
        assert parent.data.metrics == {"first/value": 5.0, "second/value": 6.0}
