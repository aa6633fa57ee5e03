"""Bad params stop every stage before any work: a bad key, a wrong type or an out-of-range value, in the
params file or in a ``--set`` override, gives a one-line error naming the file and the key, exit status 2,
no output folder, no Ray start.

The entry point runs in-process (``sbir.cli.main(["run", stage, ...])``, the real ``stage_main`` path with
its argument parsing and error handling), which keeps the ~40 cases to seconds; one case runs as a real
subprocess (``python -m sbir run``) to time the CLI end to end.
"""
from __future__ import annotations

import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml

from sbir.cli import main as sbir_main
from sbir.config import ParamsError, Root, load_params
from sbir.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
# stage name -> the params section it owns (the first of the sections it reads)
STAGE_SECTIONS = {name: spec.section for name, spec in STAGES.items()}
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
SECTIONS = sorted(k for k, v in PARAMS.items() if isinstance(v, dict))


def _constrained_field(section: str) -> tuple[str, type, float, str]:
    """A numeric field of the section with a lower bound: (key, type, bound, 'ge'|'gt')."""
    model = Root.model_fields[section].annotation
    for name, field in model.model_fields.items():
        ann = field.annotation
        if ann not in (int, float) and not (typing.get_origin(ann) in (typing.Union, types.UnionType)
                                            and int in typing.get_args(ann)):
            continue
        for meta in field.metadata:
            if isinstance(meta, annotated_types.Ge):
                return name, int if int in (ann, *typing.get_args(ann)) else float, meta.ge, "ge"
            if isinstance(meta, annotated_types.Gt):
                return name, int if int in (ann, *typing.get_args(ann)) else float, meta.gt, "gt"
    raise AssertionError(f"section {section!r} has no bounded numeric field to test")


def _bad_cases(section: str) -> dict[str, tuple[str, object]]:
    """case -> (dotted key, bad value)."""
    key, typ, bound, kind = _constrained_field(section)
    low = bound - 1 if kind == "ge" else bound
    return {"unknown_key": (f"{section}.no_such_key", 1),
            "wrong_type": (f"{section}.{key}", "not-a-number"),
            "out_of_range": (f"{section}.{key}", typ(low))}


def _write_params(tmp_path: Path, dotted: str | None = None, value: object = None) -> Path:
    data = yaml.safe_load(yaml.safe_dump(PARAMS))
    data["outputs_dir"] = str(tmp_path / "outputs")
    if dotted is not None:
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "bad_params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a stage gets past validation: no Ray start, no training."""
    import ray

    from sbir.train import runtime

    def boom(*a, **k):
        raise AssertionError("work started although the params were invalid")

    monkeypatch.setattr(runtime, "run_training", boom)
    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setenv("SBIR_NO_MLFLOW", "1")


def _run_entry_point(command: str, argv: list[str], capsys) -> tuple[int, str, float]:
    """``sbir run <stage> ARGV`` (or ``sbir ingest ARGV``) in-process: (exit code, stderr, seconds)."""
    t0 = time.time()
    try:
        code = sbir_main((["ingest"] if command == "ingest" else ["run", command]) + argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err, time.time() - t0


def test_every_stage_section_is_a_params_section():
    assert set(STAGE_SECTIONS.values()) <= set(SECTIONS)


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "out_of_range"])
@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_stage_rejects_bad_params_file(stage, case, tmp_path, capsys, no_work):
    section = STAGE_SECTIONS[stage]
    dotted, value = _bad_cases(section)[case]
    params = _write_params(tmp_path, dotted, value)
    code, err, seconds = _run_entry_point(stage, ["--params", str(params), "--no-mlflow"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert str(params) in lines[0] and dotted in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists()  # nothing written, not even the .tmp folder
    assert seconds < 5, f"validation took {seconds:.1f} s"


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_stage_rejects_bad_override(stage, tmp_path, capsys, no_work):
    section = STAGE_SECTIONS[stage]
    key, _, _, _ = _constrained_field(section)
    params = _write_params(tmp_path)
    code, err, _ = _run_entry_point(stage, ["--params", str(params), "--no-mlflow", "--set",
                                            f"{section}.{key}=not-a-number"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert str(params) in lines[0] and f"{section}.{key}" in lines[0]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "out_of_range"])
@pytest.mark.parametrize("section", SECTIONS)
def test_every_params_section_validates(section, case, tmp_path):
    dotted, value = _bad_cases(section)[case]
    params = _write_params(tmp_path, dotted, value)
    with pytest.raises(ParamsError) as info:
        load_params(params)
    assert str(params) in str(info.value) and dotted in str(info.value)


def test_ingest_entry_point_rejects_bad_options(tmp_path, capsys, no_work):
    out = tmp_path / "ingested"
    base = ["--root", str(tmp_path), "--out", str(out)]
    cases = {"--format": ["--format", "no_such_format", *base],
             "--image-size": ["--format", "sketchy", *base, "--image-size", "big"],
             "--test-share": ["--format", "sketchy", *base, "--test-share", "1.5"]}
    for option, argv in cases.items():
        code, err, seconds = _run_entry_point("ingest", argv, capsys)
        assert code == 2, (option, err)
        last = [ln for ln in err.splitlines() if ln.strip()][-1]
        assert option in last and "Traceback" not in err, (option, err)
        assert not out.exists() and seconds < 5


def test_cli_subprocess_fails_fast_on_bad_ray_section(tmp_path):
    """The whole CLI in a fresh interpreter (imports included) stops in seconds, before Ray."""
    params = _write_params(tmp_path)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "sbir", "run", "reconstruct", "--params", str(params),
                           "--no-mlflow", "--set", "ray.num_workers=-1"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    seconds = time.time() - t0
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ray.num_workers" in lines[0] and str(params) in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists()
    assert seconds < 60, seconds  # generous: the machine is shared; measured ~5 s
