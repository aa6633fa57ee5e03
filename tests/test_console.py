"""A quiet console (issue #15, item 5): a training stage on real Ray workers prints its start line, its
progress bars and its end line, nothing else; the full record goes to the stage's log file and its MLflow
run; a failing stage still says what failed, and where its log is.

The stage runs under a pseudo-terminal, as in a user's console (benchmarks/console_lines.py's runner,
line counter and noise patterns). Measured on the shared 2-core machine: ~100 s (2 Ray workers), ~25 s
(local mode).
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import console_lines  # noqa: E402  (benchmarks/ is not a package)


def _teacher_pretrain(tmp_path: Path, dataset: Path, workers: int, env: dict[str, str]) -> tuple[int, str, list[str]]:
    """Run a tiny teacher_pretrain in ``tmp_path`` (so the end line shows the log's path relative to it,
    short enough not to wrap); returns (exit status, raw console text, console lines outside bars)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(dataset_dir=str(dataset), outputs_dir=str(tmp_path / "outputs"))
    params["ray"]["num_workers"] = workers
    params["teacher_pretrain"].update(epochs=2, batch_size=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**env, "SBIR_RAY_RESULTS": str(tmp_path / "ray"), "SBIR_LOG_DIR": str(tmp_path / "logs")}
    status, text = console_lines.run_in_pty([sys.executable, "-m", "sbir", "run", "teacher_pretrain", "--params",
                                             str(tmp_path / "params.yaml")], tmp_path, env, timeout=900)
    return status, text, [ln for ln in console_lines.console_lines(text) if not console_lines.is_progress_bar(ln)]


def test_training_stage_on_ray_workers_prints_a_start_and_an_end_line(tmp_path, tiny_dataset, monkeypatch):
    import os

    from mlflow.tracking import MlflowClient

    from sbir import tracking

    monkeypatch.setenv("SBIR_MLFLOW_DIR", str(tmp_path / "mlflow"))
    status, text, lines = _teacher_pretrain(tmp_path, tiny_dataset, workers=2, env=dict(os.environ))
    assert status == 0, text[-4000:]
    shown = "\n".join(lines)
    assert len(lines) == 2, shown
    assert lines[0].startswith("[teacher_pretrain] start "), shown
    assert lines[1].startswith("[teacher_pretrain] done ") and "photo_teacher_test_acc" in lines[1], shown
    noise = {name: ln for ln in lines for name, rx in console_lines.NOISE.items() if rx.search(ln)}
    assert not noise, noise
    bars = [ln for ln in console_lines.console_lines(text) if console_lines.is_progress_bar(ln)]
    assert any("teachers" in b for b in bars), f"no progress bar reached the console: {bars}"

    # the log file has the whole record: both lines, the full metrics, where Ray's own logs are
    assert "(log: logs/embedded-default/teacher_pretrain.log)" in lines[1]
    text = (tmp_path / "logs" / "embedded-default" / "teacher_pretrain.log").read_text()
    assert lines[0] in text and lines[1] in text
    assert '"modality_net_test_acc":' in text and "Ray session" in text
    # ... and so has the stage's MLflow run
    run = tracking.find_runs("embedded-default", "teacher_pretrain")[0]
    artifacts = MlflowClient(tracking.tracking_uri()).list_artifacts(run.info.run_id, "logs")
    assert [a.path for a in artifacts] == ["logs/teacher_pretrain.log"]


def test_failing_stage_names_the_error_and_its_log(tmp_path, tiny_dataset):
    """Local mode, a loss that turns NaN: the console has the start line, a failure line with the log's path
    and the one-line error last; the log has the traceback."""
    import os

    env = dict(os.environ, SBIR_FAULT_INJECT="nan:sketch_ce@1", SBIR_NO_MLFLOW="1")
    status, text, lines = _teacher_pretrain(tmp_path, tiny_dataset, workers=0, env=env)
    assert status == 3, text[-4000:]
    shown = "\n".join(lines)
    assert len(lines) == 3 and lines[0].startswith("[teacher_pretrain] start "), shown
    assert lines[1].startswith("[teacher_pretrain] failed "), shown
    assert "(log: logs/embedded-default/teacher_pretrain.log)" in lines[1], shown
    assert lines[2].startswith("[teacher_pretrain] error: ") and "loss term 'sketch_ce' is nan" in lines[2], shown
    assert "Traceback" not in text
    record = (tmp_path / "logs" / "embedded-default" / "teacher_pretrain.log").read_text()
    assert "Traceback (most recent call last)" in record and "NonFiniteLossError" in record
