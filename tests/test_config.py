import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sbir.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_validate():
    root = load_params(REPO / "params.yaml")
    assert root.ray.num_workers >= 0 and root.prepare.num_classes >= 12


def _write(tmp_path, data):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_named(tmp_path):
    with pytest.raises(ParamsError, match=r"teacher_pretrain.epochz"):
        load_params(_write(tmp_path, {"teacher_pretrain": {"epochz": 3}}))
    with pytest.raises(ParamsError, match=r"unknown top-level key\(s\) \['teachr'\]"):
        load_params(_write(tmp_path, {"teachr": {}}))


def test_wrong_type_and_range_named(tmp_path):
    with pytest.raises(ParamsError, match=r"reconstruct.batch_size.*got 'big'"):
        load_params(_write(tmp_path, {"reconstruct": {"batch_size": "big"}}))
    with pytest.raises(ParamsError, match=r"distill.replay_fraction"):
        load_params(_write(tmp_path, {"distill": {"replay_fraction": 1.5}}))


def test_overrides_apply(tmp_path):
    root = load_params(_write(tmp_path, {}), {"ray.num_workers": 0, "distill.weights.proxy": 0.5})
    assert root.ray.num_workers == 0 and root.distill.weights.proxy == 0.5


def test_stage_cli_reports_bad_params_without_traceback(tmp_path):
    bad = _write(tmp_path, {"prepare": {"num_classes": "many"}})
    proc = subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), "--params", str(bad), "--no-mlflow"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "prepare.num_classes" in proc.stderr and "Traceback" not in proc.stderr


def test_stage_help_explains():
    proc = subprocess.run([sys.executable, str(REPO / "stages/distill.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--resume" in proc.stdout and "reconstructed pairs" in proc.stdout
