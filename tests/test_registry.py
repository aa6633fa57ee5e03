"""The stage registry is the one list of stages: dvc.yaml, the real-data pipelines, stages/README.md and
the command line must agree with it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sbir.cli import build_parser
from sbir.registry import STAGES, get_stage, stages_markdown

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*/dvc.yaml"))


def _dvc_stages(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["stages"]


def test_default_dvc_yaml_runs_every_registered_stage_in_registry_order():
    stages = _dvc_stages(REPO / "dvc.yaml")
    assert list(stages) == list(STAGES)
    for name, entry in stages.items():
        assert entry["cmd"] == f"python -m sbir run {name}", name
        assert entry["params"] == STAGES[name].params, name


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.parent.name)
def test_real_data_pipelines_call_registered_stages_with_their_params(path):
    params_file = f"pipelines/{path.parent.name}/params.yaml"
    for name, entry in _dvc_stages(path).items():
        if entry["cmd"].startswith(("python -m sbir ingest", "python -m sbir compose")):  # data set-up, not stages
            continue
        assert entry["cmd"] == f"python -m sbir run {name} --params ${{P}}", (path, name)
        assert entry["params"] == [{params_file: STAGES[name].params}], (path, name)


def test_no_stage_scripts_left():
    assert not list((REPO / "stages").glob("*.py"))


def test_stages_readme_is_generated_from_the_registry():
    assert (REPO / "stages" / "README.md").read_text() == stages_markdown(), \
        "regenerate: python -m sbir stages --markdown > stages/README.md"


def test_every_stage_body_imports_and_every_section_exists():
    from sbir.config import Root, section_value

    root = Root()
    for spec in STAGES.values():
        assert callable(spec.function())
        for section in spec.sections:
            section_value(root, section)  # raises AttributeError for a section the params lack


def test_cli_has_a_run_subcommand_per_stage_and_unknown_stages_fail():
    parser = build_parser()
    for name in STAGES:
        args = parser.parse_args(["run", name, "--no-mlflow", "--set", "seed=1"])
        assert args.stage == name and args.overrides == ["seed=1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "no_such_stage"])
    with pytest.raises(KeyError, match="unknown stage"):
        get_stage("no_such_stage")


def test_stage_help_says_what_the_stage_does_and_which_params_it_reads():
    out = subprocess.run([sys.executable, "-m", "sbir", "run", "distill", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "CrossX-DFL students" in text and "'distill'" in text and "--resume" in text


def test_embedded_full_is_the_default_pipeline_with_science_budgets():
    """pipelines/embedded-full runs the default dvc.yaml's stages (generated from it, so the two cannot
    drift) with the science budgets; its params differ from the default's only in the names, the
    precision and the step budgets that issue #15 cut for the 5-minute default."""
    script = REPO / "pipelines" / "embedded-full" / "make_dvc_yaml.py"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    from sbir.config import flatten, load_params

    default = flatten(load_params(REPO / "params.yaml"))
    full = flatten(load_params(REPO / "pipelines" / "embedded-full" / "params.yaml"))
    differ = {k for k in default if default[k] != full[k]}
    assert {"pipeline", "dataset_dir", "outputs_dir"} <= differ
    assert differ <= {"pipeline", "dataset_dir", "outputs_dir", "ray.precision", "teacher_pretrain.epochs",
                      "reconstruct.steps", "distill.rounds", "upper_bound.max_steps", "sketch_generator.steps",
                      "fgsbir_joint.supervised_steps", "fgsbir_joint.joint_steps"}, differ
    assert full["ray.precision"] == "fp32"  # the benchmarks' tables were measured in fp32
    for key in differ - {"pipeline", "dataset_dir", "outputs_dir", "ray.precision"}:
        assert full[key] >= default[key], key  # the default only ever cuts
