"""DVC experiments and plots on a tiny git copy of the repository: `dvc exp run -S key=value <target>`
runs the cheapest stages (prepare -> teacher_pretrain in local mode), `dvc exp show` lists the
experiment with its param and metrics, and `dvc plots show --json` renders the declared loss curve
from the stage's history.json (the full set of charts is checked by tests/test_pipeline_e2e.py)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from test_pipeline_e2e import BIN, _env, make_tiny_repo


def _dvc(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _find(node, key):
    """Every value of ``key`` anywhere in nested JSON (dvc exp show's layout differs between versions)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def test_dvc_exp_run_set_param_and_plots(tmp_path):
    root = make_tiny_repo(tmp_path / "repo", {"teacher_pretrain": {"epochs": 2}})
    _dvc(root, "exp", "run", "-n", "fewer-epochs", "-S", "teacher_pretrain.epochs=3", "teacher_pretrain")
    # the experiment ran with the new value, in the workspace
    history = json.loads((root / "outputs/teacher_pretrain/history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    shown = json.loads(_dvc(root, "exp", "show", "--json").stdout)
    names = list(_find(shown, "name"))
    assert "fewer-epochs" in names, names
    epochs = [v.get("epochs") for v in _find(shown, "teacher_pretrain") if isinstance(v, dict) and "epochs" in v]
    assert 3 in epochs and 2 in epochs, epochs  # the experiment and the baseline commit
    accs = list(_find(shown, "photo_teacher_test_acc"))
    assert accs and all(0.0 <= a <= 1.0 for a in accs if a is not None)
    # metrics and the declared plot render from the data files
    metrics = json.loads(_dvc(root, "metrics", "show", "--json").stdout)
    assert list(_find(metrics, "photo_teacher_test_acc"))
    plots = json.loads(_dvc(root, "plots", "show", "--json", "teacher_pretrain_loss").stdout)
    rows = plots["data"]["teacher_pretrain_loss"][0]["content"]["data"]["values"]
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2]
    assert {"photo_ce", "sketch_ce", "modality_ce"} <= {r.get("field") for r in rows} | set(rows[0])
    html = _dvc(root, "plots", "show", "-o", str(tmp_path / "plots")).stdout
    assert (tmp_path / "plots" / "index.html").stat().st_size > 1000, html
