import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sbir.config import ParamsError, Root, load_params

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
    with pytest.raises(ParamsError, match=r"teachr: Extra inputs are not permitted"):
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
    proc = subprocess.run([sys.executable, "-m", "sbir", "run", "prepare", "--params", str(bad), "--no-mlflow"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "prepare.num_classes" in proc.stderr and "Traceback" not in proc.stderr


def test_stage_help_explains():
    proc = subprocess.run([sys.executable, "-m", "sbir", "run", "upper_bound", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "--resume" in text and "real training photos" in text


def _leaves(data, prefix=""):
    """{'a.b.c': value} for every leaf of nested mappings."""
    if isinstance(data, dict):
        return {k: v for key, sub in data.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def test_model_defaults_equal_params_yaml():
    """Defaults are defined once: every key of params.yaml has the model's default value (so a stage run
    with a partial params file behaves as the shipped one), and the models know no key params.yaml lacks."""
    shipped = _leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    defaults = _leaves(Root().model_dump(mode="json"))
    differ = {k: (defaults.get(k, "<missing>"), v) for k, v in shipped.items() if defaults.get(k, "<missing>") != v}
    assert not differ, f"model default != params.yaml (default, yaml): {differ}"
    assert set(defaults) == set(shipped), sorted(set(defaults) ^ set(shipped))
