"""What every DVC stage entry point shares: argument parsing, params validation, the MLflow run,
Ray training via :mod:`sbir.train.runtime`, and atomic output folders.

A stage file in ``stages/`` is a few lines::

    from sbir.stage import stage_main
    from sbir.dfsbir.teacher import run_teacher_pretrain
    if __name__ == "__main__":
        stage_main("teacher_pretrain", run_teacher_pretrain, __doc__)

``run_fn(ctx) -> dict`` does the work and returns the stage's headline metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from sbir.config import ParamsError, Root, flatten, load_params, params_hash
from sbir.tracking import REPO_ROOT, RunHandle, stage_run


@dataclass
class StageContext:
    stage: str
    params: Root
    params_path: Path
    out_dir: Path  # the stage's final output folder (written atomically via ``tmp_out``)
    tmp_out: Path  # write here; renamed to out_dir when the stage succeeds
    run: RunHandle | None
    resume: Literal["auto", "always", "never"]
    args: argparse.Namespace
    timings: dict[str, float] = field(default_factory=dict)

    def path(self, p: str | os.PathLike) -> Path:
        """A params path made absolute against the repository root (Ray workers change cwd)."""
        p = Path(p)
        return p if p.is_absolute() else (REPO_ROOT / p).resolve()

    def stage_dir(self, stage: str) -> Path:
        """Output folder of another stage."""
        return self.path(self.params.outputs_dir) / stage

    def params_digest(self, section: Any) -> str:
        return params_hash({"section": section.model_dump(mode="json") if hasattr(section, "model_dump") else section,
                            "seed": self.params.seed, "dataset": self.params.dataset_dir})

    def log_artifacts(self) -> None:
        if self.run is not None:
            self.run.log_artifact(self.tmp_out)


def build_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"stages/{stage}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Params come from params.yaml (section '%s' and the shared 'ray', 'seed', 'dataset_dir'); "
               "override any of them with --set key=value (dotted keys, YAML values)." % stage)
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set ray.num_workers=0 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stage's previous run from its last checkpoint (fails if there is none "
                             "or it used other params). Without it an unfinished run with the same params is "
                             "continued and anything else starts clean.")
    parser.add_argument("--restart", action="store_true", help="ignore any earlier checkpoint and start clean")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return parser


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_stage(stage: str, run_fn: Callable[[StageContext], Mapping[str, Any]], argv: list[str] | None = None,
              doc: str | None = None, section: str | None = None, extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
              out_name: str | None = None) -> dict[str, Any]:
    """Parse args, validate params, open the MLflow run, call ``run_fn`` and publish its outputs atomically."""
    parser = build_parser(stage, doc)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    params_path = Path(args.params).resolve()
    root = load_params(params_path, parse_overrides(args.overrides))
    from sbir.train.runtime import set_pipeline

    set_pipeline(root.pipeline)
    out_dir = (REPO_ROOT / root.outputs_dir / (out_name or stage)) if not Path(root.outputs_dir).is_absolute() \
        else Path(root.outputs_dir) / (out_name or stage)
    tmp_out = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    resume: Literal["auto", "always", "never"] = "always" if args.resume else ("never" if args.restart else "auto")
    sec = getattr(root, section or stage, None) if hasattr(root, section or stage) else root.extra_sections.get(section or stage)
    digest = params_hash({"section": sec.model_dump(mode="json") if hasattr(sec, "model_dump") else sec,
                          "seed": root.seed, "ray": root.ray.model_dump(mode="json")})
    ctx_kwargs = dict(stage=stage, params=root, params_path=params_path, out_dir=out_dir, tmp_out=tmp_out,
                      resume=resume, args=args)
    from sbir.resources import ResourceMonitor
    from sbir.train.runtime import TRAINING_LOG

    n_trainings = len(TRAINING_LOG)
    # wall time and peak RSS of this process and its children (Ray's raylet and workers): resources.json;
    # the monitor stops when the block ends, also when the stage fails (no sampling thread left behind)
    with ResourceMonitor() as monitor:
        metrics = _run(stage, run_fn, root, sec, section or stage, digest, args, ctx_kwargs)
    trainings = TRAINING_LOG[n_trainings:]
    if trainings:
        # "resumed from epoch N": which checkpoint each Ray Train fit of this stage continued from
        metrics.setdefault("resumed_from", trainings[0]["resumed_from"] if len(trainings) == 1
                           else [t["resumed_from"] for t in trainings])
    (tmp_out / "stage_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    res = monitor.report.to_dict()
    res.update(stage=stage, trainings=trainings)
    (tmp_out / "resources.json").write_text(json.dumps(res, indent=2, default=str))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_out, out_dir)
    print(f"[{stage}] done in {metrics['stage_seconds']} s -> {out_dir}")
    print(json.dumps(metrics, indent=2, default=str))
    return metrics


def _run(stage: str, run_fn: Callable[[StageContext], Mapping[str, Any]], root: Root, sec: Any, section: str,
         digest: str, args: argparse.Namespace, ctx_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call the stage function, inside an MLflow run unless tracking is off; returns its metrics."""
    start = time.time()
    if args.no_mlflow or os.environ.get("SBIR_NO_MLFLOW") == "1":
        metrics = dict(run_fn(StageContext(run=None, **ctx_kwargs)))
    else:
        flat = {"seed": root.seed, "dataset_dir": root.dataset_dir, **flatten(root.ray, "ray.")}
        if sec is not None:
            flat.update(flatten(sec, f"{section}."))
        with stage_run(root.pipeline, stage, flat, digest, _dataset_checksum(root)) as run:
            ctx = StageContext(run=run, **ctx_kwargs)
            metrics = dict(run_fn(ctx))
            metrics.setdefault("stage_seconds", round(time.time() - start, 1))
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            ctx.log_artifacts()
    metrics.setdefault("stage_seconds", round(time.time() - start, 1))
    return metrics


def _dataset_checksum(root: Root) -> str | None:
    manifest = REPO_ROOT / root.dataset_dir / "manifest.json" if not Path(root.dataset_dir).is_absolute() \
        else Path(root.dataset_dir) / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("checksum")
    except (OSError, ValueError):
        return None


def stage_main(stage: str, run_fn: Callable[[StageContext], Mapping[str, Any]], doc: str | None = None, **kw: Any) -> None:
    """CLI wrapper: clear one-line errors for bad params or inputs instead of deep tracebacks."""
    from sbir.data.format import DatasetFormatError
    from sbir.train.runtime import NonFiniteLossError

    try:
        run_stage(stage, run_fn, doc=doc, **kw)
    except (ParamsError, DatasetFormatError, FileNotFoundError) as exc:
        print(f"[{stage}] error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as exc:  # deterministic: Ray's retries hit it again; say what and where
        print(f"[{stage}] error: {one_line(exc)}", file=sys.stderr)
        sys.exit(3)


def one_line(exc: BaseException) -> str:
    """An error message on one line (pydantic lists one problem per line: join them)."""
    return "; ".join(part.strip() for part in str(exc).splitlines() if part.strip()).replace(": invalid params;",
                                                                                               ": invalid params:")
