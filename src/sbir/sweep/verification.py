"""``verify``: the best trial rerun through ``dvc repro`` in a temporary copy of the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sbir.config import load_params
from sbir.registry import STAGES
from sbir.sweep.apply import apply_overrides
from sbir.sweep.spec import SweepError, SweepSpec, repo_path
from sbir.sweep.upstream import upstream_checksums
from sbir.tracking import REPO_ROOT


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
        _copy_repository(repo, spec, sweep_dir)
        changes = apply_overrides(sweep_dir / "trial_overrides.txt", repo / spec.params)
        seconds = _dvc_repro(repo, spec.stages)
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


def _copy_repository(repo: Path, spec: SweepSpec, sweep_dir: Path) -> None:
    """Code, ``dvc.yaml``/``dvc.lock``, params, the dataset and the upstream stage outputs (checked unchanged
    since the sweep) copied into ``repo``."""
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


def _dvc_repro(repo: Path, stages: list[str]) -> float:
    """``git init`` + commit in the copy, then ``dvc repro -s -f <stage>`` per stage; returns the DVC seconds."""
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
    for stage in stages:  # -s: only this stage (its upstream is the copied pipeline output)
        proc = subprocess.run([dvc, "repro", "-s", "-f", stage], cwd=repo, env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro -s {stage} failed in {repo}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - start
