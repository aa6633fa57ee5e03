#!/usr/bin/env python
"""Two `dvc repro` runs of a tiny copy of the pipeline, and screenshots of the MLflow UI comparing them
(docs/img/mlflow-repros.png, docs/img/mlflow-compare.png in the README).

    .venv/bin/python benchmarks/mlflow_two_repros.py [--work DIR] [--skip-repro] [--out-dir docs/img]

1. Copies dvc.yaml, src/ and params.yaml into ``--work`` (default: a folder under /tmp) with tiny params
   (4 classes, a few steps per stage, local-mode Ray), its own git repository and its own MLflow store.
2. ``dvc repro evaluate`` (prepare -> teacher_pretrain -> reconstruct -> distill, upper_bound -> evaluate),
   then ``distill.rounds`` 4 -> 8 and ``dvc repro evaluate`` again (dvc reruns distill and evaluate only).
   Each repro's stage runs hang under one parent run (sbir.tracking groups them).
3. Starts ``mlflow server`` on 127.0.0.1 over that store and takes the screenshots with the system
   Chromium: the runs table in the model-training view (parents expanded), and the chart view of the
   two parent runs (CrossX-DFL mAP@all side by side). Prints the two parents' mAP@all per method.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

TINY = {
    "ray": {"num_workers": 0},
    "prepare": {"num_classes": 4, "train_instances_per_class": 24, "test_instances_per_class": 8},
    "teacher_pretrain": {"epochs": 2, "batch_size": 32},
    "reconstruct": {"steps": 4, "batch_size": 16, "log_every": 2, "bank_size": 64,
                    "synthesis": "alternation"},  # distill.rounds (changed between the repros) counts here
    "distill": {"rounds": 4, "student_steps": 2, "batch_size": 16, "log_every": 2},
    "upper_bound": {"max_steps": 4, "eval_every": 2},
    "evaluate": {"map_ks": [20], "precision_ks": [10, 20]},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _env(root: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SBIR_MLFLOW_DIR": str(root / "mlflow"),
            "SBIR_RAY_RESULTS": str(root / "ray_results"), "PYTHONPATH": str(root / "src")}


def make_copy(root: Path) -> None:
    root.mkdir(parents=True)
    for item in ("dvc.yaml", "src", ".dvc", ".dvcignore", ".gitignore"):
        src = REPO / item
        (shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
         if src.is_dir() else shutil.copy(src, root / item))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, json.loads(json.dumps(TINY)))))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, check=True, env=_env(root))


def repro(root: Path) -> None:
    t0 = time.time()
    proc = subprocess.run([str(BIN / "dvc"), "repro", "evaluate"], cwd=root, env=_env(root), capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"dvc repro evaluate: {time.time() - t0:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    sys.exit("mlflow server did not start")


def _close_assistant(page) -> None:
    """The MLflow UI opens its assistant panel beside the page on a first visit: close it."""
    close = page.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def screenshots(root: Path, base: str, out_dir: Path) -> None:
    os.environ["SBIR_MLFLOW_DIR"] = str(root / "mlflow")
    from sbir import tracking
    from sbir.app.browser import chromium_page

    experiment = yaml.safe_load((root / "params.yaml").read_text()).get("pipeline", "embedded-default")
    parents = tracking.repro_runs(experiment)
    for p in parents:
        print(p.info.run_name, {k: round(v, 4) for k, v in sorted(p.data.metrics.items())
                                if k.startswith("evaluate/") and k.endswith("mAP_at_all")})
    with chromium_page(viewport=(1400, 860)) as page:
        page.goto(tracking.experiment_ui_url(experiment, base))
        page.wait_for_selector("text=dvc repro evaluate", timeout=180_000)
        _close_assistant(page)
        for toggle in page.locator("button[data-component-id*='runnamecellrenderer']").all():
            toggle.click()  # expand a repro's parent row: its stage runs appear under it
            page.wait_for_timeout(300)
        page.wait_for_selector("text=teacher_pretrain", timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out_dir / "mlflow-repros.png"))
        # the two parents side by side: the chart view of the parent runs, CrossX-DFL mAP@all
        only_parents = urllib.parse.quote(f"tags.`{tracking.RUN_KIND_TAG}` = 'repro'")
        page.goto(tracking.experiment_ui_url(experiment, base) + f"&searchFilter={only_parents}")
        page.wait_for_selector("text=dvc repro evaluate", timeout=180_000)
        _close_assistant(page)
        page.locator("label:has(input[name='runs-view-mode'][value='CHART'])").click()
        page.fill("input[placeholder='Search metric charts']", "evaluate/crossx_dfl/mAP_at_all")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out_dir / "mlflow-compare.png"))
    print(f"screenshots in {out_dir}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sbir-two-repros")
    ap.add_argument("--skip-repro", action="store_true", help="reuse --work's runs; only take the screenshots")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    args = ap.parse_args(argv)
    root = args.work.resolve()
    if not args.skip_repro:
        if root.exists():
            shutil.rmtree(root)
        make_copy(root)
        repro(root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["distill"]["rounds"] = 8
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        repro(root)
    server, base = start_mlflow(root)
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        screenshots(root, base, args.out_dir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
