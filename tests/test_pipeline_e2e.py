"""End to end: `dvc repro` of the real dvc.yaml on a tiny copy of the repository (local-mode Ray),
logging to a real MLflow tracking server (every stage's run, metrics and artifacts read back over REST),
then the outputs' round trip through a DVC remote (a local folder): `dvc push`, a second `git clone`,
`dvc pull` alone, `dvc status` clean and every declared output byte-identical; then the data-free
guarantee: reconstruct and distill run with the dataset gone."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlflow_rest import download_artifact, list_artifacts, search_runs
from sbir.train import shared_ray

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


def declared_outputs(root: Path) -> dict[str, list[tuple[str, bool]]]:
    """Per stage of ``root``'s dvc.yaml: every path it declares under outs, metrics and plots, and whether
    DVC caches it (``cache: false`` ones are left to git)."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        entries = []
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                path, opts = (item, {}) if isinstance(item, str) else next(iter(item.items()))
                entries.append((path, (opts or {}).get("cache", True)))
        out[name] = entries
    return out


def _digests(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)) if f != path else "": hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_tracking_server(base: str, root: Path) -> None:
    """Over plain REST: one FINISHED run per stage of dvc.yaml, with its params, the numeric values of its
    metrics.json as metrics, and as artifacts its metrics.json (byte-identical), every declared output
    under outputs/<stage>/ and its log; all children of one FINISHED parent run for the repro."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    declared = declared_outputs(root)
    runs = search_runs(base, params["pipeline"])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("sbir.run_kind") == "repro"]
    assert len(parents) == 1, [t.get("mlflow.runName") for t in tags]
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    parent_metrics = {m["key"]: m["value"] for m in parent["data"].get("metrics", [])}
    stage_runs = {t["sbir.stage"]: (r, t) for r, t in zip(runs, tags) if "sbir.stage" in t}
    assert sorted(stage_runs) == sorted(declared) and len(stage_runs) == len(runs) - 1
    for stage, (run, tag) in stage_runs.items():
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED", stage
        assert tag["mlflow.parentRunId"] == parent["info"]["run_id"], stage
        got_params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        assert got_params["seed"] == str(params["seed"]) and got_params["ray.num_workers"] == "0", stage
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        local = root / "outputs" / stage / "metrics.json"
        numeric = {k: v for k, v in json.loads(local.read_text()).items() if isinstance(v, (int, float))}
        assert numeric, stage
        for key, value in numeric.items():
            key = key.replace("@", "_at_")
            assert metrics[key] == pytest.approx(float(value), rel=1e-3, abs=1e-4), (stage, key)  # the file rounds
            assert parent_metrics[f"{stage}/{key}"] == metrics[key], (stage, key)
        listed = list_artifacts(base, run_id)
        expected = {Path(p).relative_to(f"outputs/{stage}").parts[0] for p, _ in declared[stage]
                    if Path(p).is_relative_to(f"outputs/{stage}")}
        assert expected | {"metrics.json", "logs"} <= set(listed), (stage, sorted(listed))
        assert set(list_artifacts(base, run_id, "logs")) == {f"logs/{stage}.log"}, stage
        assert download_artifact(base, run_id, "metrics.json") == local.read_bytes(), stage


def check_remote_round_trip(root: Path, remote: Path, clone: Path, env: dict) -> None:
    """``root`` (a repro'd tiny repo) pushes to a local-folder DVC remote; a second clone gets every output
    with ``dvc pull`` alone: ``dvc status`` clean, every declared output byte-identical."""
    dvc, git = str(BIN / "dvc"), ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run([dvc, "remote", "add", "-d", "store", str(remote)], root, env)
    declared = declared_outputs(root)
    uncached = [p for entries in declared.values() for p, cached in entries if not cached]
    # dvc.lock, the remote in .dvc/config, and the `cache: false` metrics and plots (git's, under the
    # ignored outputs/): what a commit after `dvc repro` holds
    _run([*git, "add", "-A"], root, env)
    _run([*git, "add", "-f", *uncached], root, env)
    _run([*git, "commit", "-qm", "repro"], root, env)
    _run([dvc, "push"], root, env)
    assert json.loads(_run([dvc, "status", "--cloud", "--json"], root, env).stdout or "{}") == {}
    _run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    _run([dvc, "pull"], clone, env)
    status = _run([dvc, "status", "--json"], clone, env).stdout
    assert json.loads(status or "{}") == {}, status
    for stage, entries in declared.items():
        for path, _ in entries:
            here = _digests(root / path)
            assert here and _digests(clone / path) == here, (stage, path)


def test_dvc_repro_tiny_pipeline(tmp_path, mlflow_server):
    root = make_tiny_repo(tmp_path / "repo")
    env = {**_env(root), "SBIR_MLFLOW_URI": mlflow_server}  # the server, not _env's SBIR_MLFLOW_DIR
    # inside a shared head, as `make repro` runs it (the tiny stages run in local mode, so none joins it here;
    # tests/test_runtime.py checks that a stage with Ray workers does)
    head = shared_ray.start()
    try:
        proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, env={**env, **head}, capture_output=True,
                              text=True, timeout=900)
    finally:
        shared_ray.stop(head)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    head_folder = str(Path(head[shared_ray.TOKEN_ENV]).parent)
    assert not Path(head_folder).exists()  # stopped: its folder (token, session) is gone, and so is every process
    assert not shared_ray._process_groups_naming(head_folder)
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

    # tracking off the machine: everything is on the server (read back over REST), nothing in SBIR_MLFLOW_DIR
    started = time.perf_counter()
    assert not (root / "mlflow").exists()
    check_tracking_server(mlflow_server, root)
    # artefacts off the machine: dvc push to a remote, a second clone gets the outputs with dvc pull alone
    checked = time.perf_counter()
    check_remote_round_trip(root, tmp_path / "dvc-remote", tmp_path / "clone", env)
    print(f"tracking-server checks {checked - started:.1f} s, dvc remote round trip "
          f"{time.perf_counter() - checked:.1f} s")

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
