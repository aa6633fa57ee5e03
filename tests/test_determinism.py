"""Determinism on CPU: the same params and seed give bit-identical results.

Two real stages (teacher_pretrain, then the data-free reconstruct from those teachers) each run twice
from scratch in local mode; every metric except wall-clock timings, every loss in the history, every
weight and the reconstructed sample bank must be *exactly* equal. What is and is not deterministic on
GPUs and with several workers: docs/reliability.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sbir.stage import run_stage

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("seconds", "stage_seconds", "train_seconds", "epoch_seconds", "seconds_per_step", "bank_seconds")


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not any(k.endswith(t) for t in TIMING_KEYS)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b or (a != a and b != b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _run_pipeline(tmp_path: Path, name: str, dataset: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = tmp_path / name
    params.update(dataset_dir=str(dataset), outputs_dir=str(out), pipeline=f"determinism-{name}")
    params["ray"]["num_workers"] = 0
    params["teacher_pretrain"].update(epochs=2, batch_size=32)
    params["reconstruct"].update(steps=4, batch_size=16, log_every=2, bank_size=32)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    argv = ["--params", str(path), "--no-mlflow", "--restart"]
    run_stage("teacher_pretrain", argv=argv)
    run_stage("reconstruct", argv=argv)
    return out


def test_same_params_and_seed_give_identical_results_on_cpu(tmp_path, tiny_dataset):
    a = _run_pipeline(tmp_path, "a", tiny_dataset)
    b = _run_pipeline(tmp_path, "b", tiny_dataset)
    for stage, files in {"teacher_pretrain": ["metrics.json", "history.json"],
                         "reconstruct": ["metrics.json", "history.json"]}.items():
        for f in files:
            ja, jb = (json.loads((d / stage / f).read_text()) for d in (a, b))
            assert _untimed(ja) == _untimed(jb), f"{stage}/{f} differs"
    ta = torch.load(a / "teacher_pretrain/teachers.pt", map_location="cpu", weights_only=False)
    tb = torch.load(b / "teacher_pretrain/teachers.pt", map_location="cpu", weights_only=False)
    _assert_same_tensors(ta["model"], tb["model"], "teachers")
    _assert_same_tensors(ta["optimizer"], tb["optimizer"], "teacher optimizer")
    ea = torch.load(a / "reconstruct/estimators.pt", map_location="cpu", weights_only=False)
    eb = torch.load(b / "reconstruct/estimators.pt", map_location="cpu", weights_only=False)
    _assert_same_tensors(ea["estimators"], eb["estimators"], "estimators")
    import pyarrow.parquet as pq

    assert pq.read_table(a / "reconstruct/bank.parquet").equals(pq.read_table(b / "reconstruct/bank.parquet"))
    # the check has teeth: a different seed changes the weights
    assert any(not torch.equal(v, ta["model"][k]) for k, v in _other_seed(tmp_path, tiny_dataset).items()
               if v.is_floating_point())


def _other_seed(tmp_path: Path, dataset: Path) -> dict:
    params = yaml.safe_load((tmp_path / "a.yaml").read_text())
    params.update(seed=1, outputs_dir=str(tmp_path / "seed1"), pipeline="determinism-seed1")
    path = tmp_path / "seed1.yaml"
    path.write_text(yaml.safe_dump(params))
    run_stage("teacher_pretrain", argv=["--params", str(path), "--no-mlflow", "--restart"])
    return torch.load(tmp_path / "seed1/teacher_pretrain/teachers.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_two_ray_workers_are_deterministic_on_cpu(tmp_path):
    """gloo all-reduce of two CPU workers: the same result twice (real Ray workers, ~1 min)."""
    from sbir.config import RayParams
    from sbir.train import runtime as rt
    from sbir.train.smoke import regression_loop

    def seeded_loop(config: dict) -> None:
        # the smoke loop does not seed its model's init (the stages do: torch.manual_seed(seed)); without
        # this, rank 0's random init differs per process and so do the results
        torch.manual_seed(0)
        regression_loop(config)

    outs = [rt.run_training("det2", seeded_loop, {"epochs": 2}, RayParams(num_workers=2, max_failures=0),
                            params_digest="det", resume="never", storage_root=tmp_path / str(i)) for i in range(2)]
    assert outs[0].metrics["world_size"] == 2
    assert _untimed(outs[0].metrics) == _untimed(outs[1].metrics)
    _assert_same_tensors(outs[0].state["model"], outs[1].state["model"], "model")
