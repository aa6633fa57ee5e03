"""End to end: `dvc repro` of the real dvc.yaml on a tiny copy of the repository (local-mode Ray),
then the data-free guarantee: reconstruct and distill run with the dataset gone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "ray": {"num_workers": 0},
    "prepare": {"num_classes": 4, "train_instances_per_class": 24, "test_instances_per_class": 8},
    "teacher_pretrain": {"epochs": 2, "batch_size": 32},
    "reconstruct": {"steps": 4, "batch_size": 16, "log_every": 2, "bank_size": 64},
    "distill": {"rounds": 4, "student_steps": 2, "batch_size": 16, "log_every": 2},
    "upper_bound": {"max_steps": 4, "eval_every": 2},
    "evaluate": {"map_ks": [20], "precision_ks": [10, 20]},
    "sketch_generator": {"steps": 4, "batch_size": 8, "log_every": 2, "eval_pairs": 8, "num_preview": 4},
    "fgsbir_joint": {"supervised_steps": 4, "joint_steps": 4, "batch_size": 8, "pseudo_batch_size": 8, "log_every": 2,
                     "discriminator": {"warmup_steps": 2}, "policy_gradient": {"every": 2, "batch_size": 4}},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def make_tiny_repo(dst: Path, overrides: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    for item in ("dvc.yaml", "src", ".dvc", ".dvcignore", ".gitignore"):
        src = REPO / item
        (shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
         if src.is_dir() else shutil.copy(src, dst / item))
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), _merge(json.loads(json.dumps(TINY)), overrides or {}))
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    env = _env(dst)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["SBIR_MLFLOW_DIR"] = str(root / "mlflow")
    env["SBIR_RAY_RESULTS"] = str(root / "ray_results")
    env["SBIR_LOG_DIR"] = str(root / "logs")
    env["PYTHONPATH"] = str(root / "src")  # the copy's library, not the checkout's
    return env


def test_dvc_repro_tiny_pipeline(tmp_path):
    root = make_tiny_repo(tmp_path / "repo")
    env = _env(root)
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    metrics = json.loads((root / "outputs/evaluate/metrics.json").read_text())
    for method in ("chance", "classifier_only", "crossx_dfl", "upper_bound"):
        for key in ("mAP@all", "mAP@20", "P@10", "P@20"):
            assert 0.0 <= metrics[f"{method}/{key}"] <= 1.0
    assert (root / "outputs/evaluate/embeddings/crossx_dfl_query.npy").is_file()
    assert (root / "outputs/evaluate/retrievals.png").stat().st_size > 0
    assert (root / "outputs/reconstruct/pairs.png").stat().st_size > 0
    teacher = json.loads((root / "outputs/teacher_pretrain/metrics.json").read_text())
    assert {"photo_teacher_test_acc", "sketch_teacher_test_acc", "modality_net_test_acc"} <= set(teacher)
    # dvc sees everything up to date; metrics are readable by dvc
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    shown = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=root, env=env, capture_output=True,
                           text=True)
    assert "crossx_dfl/mAP@all" in shown.stdout
    # one MLflow run per stage
    code = ("from sbir import tracking; import json; "
            "print(json.dumps(sorted(r.data.tags['sbir.stage'] for r in tracking.find_runs('embedded-default'))))")
    stages = json.loads(subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                                       text=True, check=True).stdout)
    assert stages == sorted(["prepare", "teacher_pretrain", "reconstruct", "distill", "upper_bound", "evaluate",
                             "sketch_generator", "pseudo_pairs", "fgsbir_joint", "fg_evaluate"])
    fg = json.loads((root / "outputs/fg_evaluate/metrics.json").read_text())
    for model in ("supervised", "semi", "full"):
        assert 0.0 <= fg[f"{model}/acc@1"] <= fg[f"{model}/acc@10"] <= 1.0

    # the data-free guarantee: with the dataset gone, reconstruct and distill still run
    shutil.move(root / "data", tmp_path / "data_away")
    for stage in ("reconstruct", "distill"):
        proc = subprocess.run([sys.executable, "-m", "sbir", "run", stage, "--restart", "--no-mlflow"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # ... and a stage that does read data says clearly what is missing
    proc = subprocess.run([sys.executable, "-m", "sbir", "run", "teacher_pretrain", "--no-mlflow"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr

    # dvc plots (engineer B): every chart of dvc.yaml's top-level plots renders from its data file, with rows
    plots = subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr[-3000:]
    shown_plots = json.loads(plots.stdout)
    assert not shown_plots.get("errors"), shown_plots["errors"]
    for name, field in (("teacher_pretrain_loss", "photo_ce"), ("reconstruct_loss", "total"),
                        ("distill_loss", "student_total"), ("sketch_generator_loss", "eval_total"),
                        ("fgsbir_joint_loss", "semi"), ("pr_curve", "crossx_dfl"), ("fg_rank_histogram", "semi")):
        rows = shown_plots["data"][name][0]["content"]["data"]["values"]
        assert rows and all(field in r for r in rows), (name, rows[:2])
    pr = json.loads((root / "outputs/evaluate/pr_by_method.json").read_text())
    assert len(pr) == 101 and all(0.0 <= r["crossx_dfl"] <= 1.0 for r in pr)
    hist = json.loads((root / "outputs/fg_evaluate/rank_histogram.json").read_text())
    assert sum(r["semi"] for r in hist) == fg["num_queries"]  # every query in exactly one bin
