"""The Ray Train + MLflow plumbing with a real (tiny) training loop."""
from pathlib import Path

import pytest
import torch

from sbir import tracking
from sbir.config import RayParams
from sbir.train import runtime as rt
from sbir.train.smoke import make_data, regression_loop

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_two_ray_workers_train_checkpoint_and_log_to_mlflow(tmp_path):
    with tracking.stage_run("test-runtime", "smoke", {"lr": 0.1}, "hash0", "sum0") as run:
        out = rt.run_training("smoke", regression_loop, {"epochs": 3},
                              RayParams(num_workers=2, max_failures=0), params_digest="d1",
                              storage_root=tmp_path, mlflow_run=run)
    assert out.metrics["world_size"] == 2
    assert out.metrics["mse"] < 0.05  # it really learned
    # the checkpoint was written by rank 0 and reads back into a model
    model = torch.nn.Linear(8, 1)
    model.load_state_dict(out.state["model"])
    x, y, _ = make_data()
    assert torch.nn.functional.mse_loss(model(x), y) < 0.05
    assert list((tmp_path / "smoke").glob("checkpoint_*"))
    # where the fit's time went, as stage_metrics.json records it: the parts add up to the fit
    split = rt.TRAINING_LOG[-1]["time_split"]
    assert split["num_reports"] == 3 and min(split["start_up"], split["compute"], split["reports"], split["teardown"]) >= 0
    parts = split["start_up"] + split["compute"] + split["reports"] + split["teardown"]
    assert parts == pytest.approx(out.seconds, abs=0.1)
    # the MLflow run is in the store with per-epoch metrics, params and tags
    runs = tracking.find_runs("test-runtime", "smoke")
    assert runs and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["lr"] == "0.1"
    assert runs[0].data.tags["sbir.params_hash"] == "hash0"
    assert runs[0].data.tags["sbir.dataset_checksum"] == "sum0"
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking.tracking_uri()).get_metric_history(runs[0].info.run_id, "mse")
    assert [m.step for m in hist] == [0, 1, 2]


def test_local_mode_and_resume_policy(tmp_path):
    cfg = RayParams(num_workers=0)
    first = rt.run_training("smoke_local", regression_loop, {"epochs": 2}, cfg, "p1", storage_root=tmp_path)
    assert first.metrics["world_size"] == 1 and not first.resumed
    # same params, finished run: starts clean (not resumed)
    again = rt.run_training("smoke_local", regression_loop, {"epochs": 2}, cfg, "p1", storage_root=tmp_path)
    assert not again.resumed and again.metrics["resumed_from"] == 0
    # an explicit resume continues from the last checkpoint
    more = rt.run_training("smoke_local", regression_loop, {"epochs": 4}, cfg, "p1", resume="always",
                           storage_root=tmp_path)
    assert more.resumed and more.metrics["resumed_from"] == 2 and more.metrics["epoch"] == 3
    with pytest.raises(ValueError, match="other params"):
        rt.run_training("smoke_local", regression_loop, {"epochs": 4}, cfg, "p2", resume="always",
                        storage_root=tmp_path)


def test_non_finite_loss_names_term_and_step():
    with pytest.raises(rt.NonFiniteLossError, match=r"'photo_ce' is nan at step 7"):
        rt.check_finite({"ok": torch.tensor(1.0), "photo_ce": torch.tensor(float("nan"))}, 7)


def test_shard_indices_cover_epoch_once_per_rank():
    seen = torch.cat(list(rt.shard_indices(100, 10, epoch=0, seed=1)))
    assert len(seen) == 100 and len(set(seen.tolist())) == 100


JOIN_CHILD = """
import json, ray
from sbir.config import RayParams
from sbir.train import runtime as rt
from sbir.train.smoke import regression_loop
from pathlib import Path
params = RayParams(num_workers=1)
rt.ray_environment(params)
out = rt.run_training("smoke_joined", regression_loop, {"epochs": 1}, params, "d", storage_root=Path(%r))
print("RESULT", json.dumps({"gcs": ray.get_runtime_context().gcs_address, "world_size": out.metrics["world_size"]}))
"""


def test_a_stage_joins_the_shared_head_and_stop_ends_it(tmp_path):
    """What `make repro` does: one head (sbir.train.shared_ray), a stage process with Ray workers joins it
    through $SBIR_RAY_ADDRESS instead of starting its own Ray, and stop() ends the head's every process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sbir.train import shared_ray

    head = shared_ray.start()
    folder = Path(head[shared_ray.TOKEN_ENV]).parent
    try:
        assert oct(Path(head[shared_ray.TOKEN_ENV]).stat().st_mode & 0o777) == "0o600"
        proc = subprocess.run([sys.executable, "-c", JOIN_CHILD % str(tmp_path)], capture_output=True, text=True,
                              env={**os.environ, **head}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.split("RESULT ", 1)[1])
        assert result["world_size"] == 1
        assert result["gcs"].endswith(":" + head[shared_ray.ADDRESS_ENV].rsplit(":", 1)[1])  # the head's port
    finally:
        shared_ray.stop(head)
    assert not folder.exists() and not shared_ray._process_groups_naming(str(folder))



def test_make_repro_starts_a_head_only_when_a_stage_would_join_it(tmp_path, capsys):
    """`shared_ray start --params FILE` (the Makefile's call) starts nothing and prints nothing for params
    whose stages run in local mode (the default) or on a cluster: there a head would only cost its start."""
    import yaml

    from sbir.train import shared_ray

    def params(ray: dict) -> Path:
        path = tmp_path / f"params_{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump({"seed": 0, "ray": ray}))
        return path

    assert not shared_ray.needs_head(params({"num_workers": 0}))
    assert not shared_ray.needs_head(params({"num_workers": 2, "address": "10.0.0.1:6379"}))
    assert shared_ray.needs_head(params({"num_workers": 2}))
    assert not shared_ray.needs_head(REPO_PARAMS)  # the default pipeline: local mode
    shared_ray.main(["start", "--params", str(params({"num_workers": 0}))])
    assert capsys.readouterr().out == ""
