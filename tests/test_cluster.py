"""The pipeline on a multi-node Ray cluster: two node processes on this machine (sbir.train.local_cluster,
Ray's own cluster utility), each with its own node id and CPUs. A stage's Ray Train workers land on
different nodes and checkpoint to the shared ``ray.storage_path``; a stage that loses the node of one of
its workers mid-run finishes from its last checkpoint on the node that is left.

Both nodes have 2 CPUs: SPREAD puts one worker on each, and after the loss of the second node both
workers fit on the head.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from sbir.stage import run_stage
from sbir.train import runtime as rt
from sbir.train.local_cluster import local_cluster, node_of

PIPELINE = "cluster-test"


@pytest.fixture(scope="module")
def cluster():
    # every report sleeps 1 s in the workers: room for the node kill between two checkpoints
    with local_cluster((2, 2), env={"SBIR_FAULT_INJECT": "report_sleep:1"}) as c:
        yield c


def _params(tmp_path: Path, dataset: Path, cluster, epochs: int) -> str:
    small = {"name": "small_cnn", "width": 8, "depth": 3}
    params = {"pipeline": PIPELINE, "seed": 0, "dataset_dir": str(dataset), "outputs_dir": str(tmp_path / "outputs"),
              "ray": {"num_workers": 2, "address": cluster.address, "placement_strategy": "SPREAD",
                      "storage_path": str(tmp_path / "shared"), "max_failures": 1},
              "teacher_pretrain": {"backbone": small, "modality_backbone": small, "epochs": epochs, "batch_size": 16},
              "distill": {"student": {"backbone": small, "embed_dim": 16}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def _node_ids(cluster) -> set[str]:
    return {n.node_id for n in [cluster.head_node, *cluster.worker_nodes]}


def test_stage_workers_run_on_different_nodes_and_checkpoint_to_shared_storage(cluster, tmp_path, tiny_dataset):
    metrics = run_stage("teacher_pretrain", ["--params", _params(tmp_path, tiny_dataset, cluster, 2), "--no-mlflow"])
    assert len(metrics["worker_nodes"]) == 2
    assert set(metrics["worker_nodes"]) == _node_ids(cluster)  # one worker on each node
    run_dir = tmp_path / "shared" / PIPELINE / "teacher_pretrain"
    assert list(run_dir.glob("checkpoint_*/state.pt")), "no checkpoint on the shared storage path"
    assert (tmp_path / "outputs" / "teacher_pretrain" / "teachers.pt").is_file()


def test_stage_that_loses_a_node_finishes_from_its_last_checkpoint(cluster, tmp_path, tiny_dataset):
    run_dir = tmp_path / "shared" / PIPELINE / "teacher_pretrain"
    head = cluster.head_node.node_id
    killed: dict = {}
    stage_ended = threading.Event()

    def kill_the_other_node() -> None:
        try:
            # no deadline of its own: worker start-up takes minutes on a loaded machine; the stage's end stops it
            while not (rt.checkpoint_position(run_dir) and len(rt.worker_nodes(run_dir)) == 2):
                if stage_ended.wait(0.1):
                    raise TimeoutError("the stage ended before its first checkpoint")
            killed["kept"] = rt.checkpoint_position(run_dir)
            other = next(w["node_id"] for w in rt.worker_nodes(run_dir) if w["node_id"] != head)
            cluster.remove_node(node_of(cluster, other), allow_graceful=False)
            killed["node_id"] = other
        except Exception as exc:  # reported by the assertions below
            killed["error"] = repr(exc)

    thread = threading.Thread(target=kill_the_other_node, daemon=True)
    thread.start()
    try:
        metrics = run_stage("teacher_pretrain", ["--params", _params(tmp_path, tiny_dataset, cluster, 8), "--no-mlflow"])
    finally:
        stage_ended.set()
        thread.join(timeout=60)
    assert "node_id" in killed, killed
    assert killed["node_id"] not in _node_ids(cluster)  # the node is gone for good
    # the worker group was restarted on the head node and continued from a checkpoint, not from epoch 0
    assert metrics["worker_nodes"] == [head, head]
    assert metrics["resumed_from"]["epoch"] >= killed["kept"]["epoch"] >= 0
    assert metrics["restores"][-1]["node_id"] == head
    # complete outputs, nothing half-written: the teachers load and were trained for every epoch
    out = tmp_path / "outputs" / "teacher_pretrain"
    assert not list(out.parent.glob("*.tmp*"))
    assert torch.load(out / "teachers.pt", map_location="cpu", weights_only=False)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(8))  # every epoch once, across the two worker groups


@pytest.mark.slow  # a sweep on a cluster: minutes of Ray start-up per trial on 2 cores (make test-all runs it)
def test_tune_sweep_places_trials_on_both_nodes(cluster, tmp_path, tiny_dataset):
    """Two concurrent trials that each ask for 1.5 CPUs: the head (2 CPUs) and the other node (2 CPUs) take
    one each. The results table has the single-node run's columns plus the node each trial ran on."""
    import pandas as pd

    from sbir.sweep import run_sweep

    if len(cluster.worker_nodes) == 0:  # the node-loss test removed it: bring a second node back
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
    params = _params(tmp_path, tiny_dataset, cluster, 1)
    run_stage("teacher_pretrain", ["--params", params, "--no-mlflow", "--set", "ray.num_workers=0"])
    spec = {"name": "cluster", "params": params, "stages": ["reconstruct", "distill"],
            "base_overrides": {"ray.num_workers": 0, "reconstruct.steps": 2, "reconstruct.bank_size": 32,
                               "reconstruct.batch_size": 16, "distill.rounds": 2, "distill.student_steps": 1,
                               "distill.batch_size": 16},
            "space": {"reconstruct.weights.semantic_ce": {"type": "loguniform", "low": 0.5, "high": 5.0}},
            "validation": "category", "validation_options": {"per_class": 4, "precision_ks": [4]},
            "objective": {"metric": "val/crossx_dfl/mAP@all", "mode": "max"},
            "num_samples": 2, "seed": 3, "max_concurrent_trials": 2, "trial_resources": {"cpu": 1.5}}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    summary = run_sweep(spec_path, tmp_path / "sweep")
    assert summary["num_completed"] == 2, summary
    df = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert set(df["node_id"]) == _node_ids(cluster)  # one trial on each node
    expected = {"trial_id", "status", "objective", "reconstruct.weights.semantic_ce", "iterations", "seconds",
                "mlflow_run_id", "node_id", "error"}
    assert expected <= set(df.columns) and df["objective"].between(0, 1).all()
