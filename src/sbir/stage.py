"""Running one registered stage: params, the MLflow run, Ray training and atomic outputs in one place.

``python -m sbir run <stage>`` (what ``dvc.yaml`` calls) and tests both come through
:func:`run_stage`; the stage body registered in :mod:`sbir.registry` gets a :class:`StageContext` and
returns its headline metrics::

    def run_teacher_pretrain(ctx: StageContext) -> dict:
        outcome = ctx.train(teacher_loop, {"params": ctx.params.teacher_pretrain, ...})
        ...
        return ctx.write_training_outputs(history, metrics, curves=[...])
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from sbir.config import ParamsError, Root, flatten, load_params, params_hash, section_value
from sbir.registry import StageSpec, get_stage
from sbir.stage_log import StageLog, stage_log
from sbir.tracking import REPO_ROOT, RunHandle, stage_run

Resume = Literal["auto", "always", "never"]


@dataclass
class StageContext:
    stage: str
    params: Root
    out_dir: Path  # the stage's final output folder (written atomically via ``tmp_out``)
    tmp_out: Path  # write here; renamed to out_dir when the stage succeeds
    run: RunHandle | None
    resume: Resume
    digest: str  # the one params digest of this stage: its sections, seed and dataset (resume + MLflow tag)

    def path(self, p: str | os.PathLike) -> Path:
        """A params path made absolute against the repository root (Ray workers change cwd)."""
        p = Path(p)
        return p if p.is_absolute() else (REPO_ROOT / p).resolve()

    def stage_dir(self, stage: str) -> Path:
        """Output folder of another stage."""
        return self.path(self.params.outputs_dir) / stage

    def input(self, stage: str, name: str) -> Path:
        """A file another stage wrote, with a clear error when that stage has not run."""
        path = self.stage_dir(stage) / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the {stage} stage first")
        return path

    def train(self, loop: Callable[[dict], None], config: Mapping[str, Any]):
        """Run ``loop`` as this stage's Ray Train job (see :func:`sbir.train.runtime.run_training`). The
        loop's config also gets ``ray`` (the RayParams: its precision, pin_memory and decode_workers,
        see :mod:`sbir.train.precision`)."""
        from sbir.train import precision
        from sbir.train import runtime as rt

        ray = precision.resolve(self.params.ray)  # auto -> bf16 or fp32 for this machine, once for all workers
        precision.check_before_start(ray)  # fp16 without a GPU: one clear error before Ray starts
        return rt.run_training(self.stage, loop, {"ray": ray, **config}, ray, self.digest,
                               resume=self.resume, mlflow_run=self.run)

    def write_json(self, name: str, data: Any) -> Path:
        path = self.tmp_out / name
        path.write_text(json.dumps(data, indent=2))
        return path

    def write_training_outputs(self, history: list[dict[str, Any]], metrics: dict[str, Any],
                               curves: Sequence[str] | None = None, title: str | None = None,
                               xlabel: str = "log interval") -> dict[str, Any]:
        """The tail every training stage shares: history.json (the data of ``dvc plots``), curves.png of
        the ``curves`` keys (default: every numeric key but the position and timing ones) and metrics.json."""
        from sbir.plots import plot_loss_curves

        self.write_json("history.json", history)
        keys = list(curves) if curves is not None else [k for k in history[-1] if k not in _NOT_CURVES]
        plot_loss_curves({k: [h.get(k, float("nan")) for h in history] for k in keys}, self.tmp_out / "curves.png",
                         title=title or self.stage, xlabel=xlabel)
        self.write_json("metrics.json", metrics)
        return metrics


_NOT_CURVES = {"epoch", "step", "round", "epoch_seconds", "seconds_per_round", "seconds_per_step", "lr"}


# ----------------------------------------------------------------------------- command line
def add_stage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set ray.num_workers=0 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stage's previous run from its last checkpoint (fails if there is none "
                             "or it used other params). Without it an unfinished run with the same params is "
                             "continued and anything else starts clean.")
    parser.add_argument("--restart", action="store_true", help="ignore any earlier checkpoint and start clean")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def stage_parser(spec: StageSpec, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``sbir run <stage>`` (on ``parser`` when given, e.g. a subparser)."""
    parser = parser or argparse.ArgumentParser(prog=f"sbir run {spec.name}")
    parser.description = textwrap.fill(spec.summary, 100)
    parser.epilog = (f"Params come from params.yaml (section '{spec.section}'"
                     + (f", also {', '.join(repr(s) for s in spec.sections[1:])}" if len(spec.sections) > 1 else "")
                     + (f" and the shared {', '.join(repr(s) for s in spec.shared)}" if spec.shared else "")
                     + "); override any of them with --set key=value (dotted keys, YAML values).")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_stage_options(parser)
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


# ----------------------------------------------------------------------------- running a stage
def run_stage(stage: str, argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Validate params, open the stage's log and MLflow run, call the registered stage body and publish
    its outputs atomically (``<stage>.tmp`` renamed on success). Returns the stage's metrics."""
    spec = get_stage(stage)
    args = args or stage_parser(spec).parse_args(argv)
    root = load_params(Path(args.params).resolve(), parse_overrides(args.overrides))
    from sbir.train import runtime as rt

    rt.set_pipeline(root.pipeline)
    hooks = rt.active_hooks()  # a stage inside another Ray job (a sweep trial) logs into that job's folder
    log_dir = hooks.storage_root / "logs" if hooks and hooks.storage_root else None
    with stage_log(root.pipeline, stage, log_dir) as log:
        metrics = _run_logged(spec, root, args, log)
        log.note(f"outputs: {_context_out_dir(spec, root)}\n" + json.dumps(metrics, indent=2, default=str))
        log.done(metrics, spec.key_metrics)
    return metrics


def _run_logged(spec: StageSpec, root: Root, args: argparse.Namespace, log: StageLog) -> dict[str, Any]:
    from sbir.resources import ResourceMonitor
    from sbir.train.runtime import TRAINING_LOG

    ctx = _context(spec, root, args)
    n_trainings = len(TRAINING_LOG)
    # wall time and peak RSS of this process and its children (Ray's raylet and workers): resources.json;
    # the monitor stops when the block ends, also when the stage fails (no sampling thread left behind)
    with ResourceMonitor() as monitor:
        tracked = not (args.no_mlflow or os.environ.get("SBIR_NO_MLFLOW") == "1")
        metrics = _call_stage(spec, ctx, tracked, log)
    trainings = TRAINING_LOG[n_trainings:]
    for key, value in _training_record(trainings).items():
        metrics.setdefault(key, value)
    ctx.write_json("stage_metrics.json", json.loads(json.dumps(metrics, default=str)))
    ctx.write_json("resources.json", json.loads(json.dumps({**monitor.report.to_dict(), "stage": spec.name,
                                                            "trainings": trainings}, default=str)))
    if ctx.out_dir.exists():
        shutil.rmtree(ctx.out_dir)
    os.replace(ctx.tmp_out, ctx.out_dir)
    return metrics


def _training_record(trainings: list[dict[str, Any]]) -> dict[str, Any]:
    """What the stage's metrics say of its Ray Train fits: ``resumed_from`` (the checkpoint each fit continued
    from: at start after an interruption, or mid-fit after a lost worker or node restarted the worker group),
    ``worker_nodes`` (the Ray node id of each worker, rank order) and ``restores`` (every checkpoint restore)."""
    if not trainings:
        return {}

    def one_or_list(values: list[Any]) -> Any:
        return values[0] if len(values) == 1 else values

    def continued_from(t: dict[str, Any]) -> Any:
        restored = t.get("restores") or []
        return t["resumed_from"] or (restored[-1]["resumed_from"] if restored else None)

    record = {"resumed_from": one_or_list([continued_from(t) for t in trainings])}
    nodes = [[w["node_id"] for w in t.get("worker_nodes") or []] for t in trainings]
    if any(nodes):
        record["worker_nodes"] = one_or_list(nodes)
    restores = [r for t in trainings for r in t.get("restores") or []]
    if restores:
        record["restores"] = restores
    return record


def stage_digest(spec: StageSpec, root: Root) -> str:
    payload: dict[str, Any] = {"stage": spec.name, "seed": root.seed, "dataset": root.dataset_dir,
                               "sections": {s: section_value(root, s) for s in spec.sections}}
    from sbir.train.precision import resolve  # (imports torch: not at module level)

    precision = resolve(root.ray).precision if spec.trains else "fp32"  # auto: what this machine runs
    if precision != "fp32":
        # the precision changes what a training stage learns: a run in another precision is not resumed
        # (only when not fp32, so the digests of fp32 runs stay those from before the key existed)
        payload["precision"] = precision
    return params_hash(payload)


def _context_out_dir(spec: StageSpec, root: Root) -> Path:
    outputs = Path(root.outputs_dir)
    return (outputs if outputs.is_absolute() else REPO_ROOT / outputs) / spec.name


def _context(spec: StageSpec, root: Root, args: argparse.Namespace) -> StageContext:
    out_dir = _context_out_dir(spec, root)
    tmp_out = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    resume: Resume = "always" if args.resume else ("never" if args.restart else "auto")
    return StageContext(stage=spec.name, params=root, out_dir=out_dir, tmp_out=tmp_out, run=None, resume=resume,
                        digest=stage_digest(spec, root))


def _call_stage(spec: StageSpec, ctx: StageContext, tracked: bool, log: StageLog) -> dict[str, Any]:
    """Call the stage body, inside an MLflow run unless tracking is off (the run also gets the stage's log
    file, once it is complete: when the stage has ended, well or not); returns its metrics."""
    start = time.time()
    if not tracked:
        metrics = dict(spec.function()(ctx))
    else:
        root = ctx.params
        flat = {"seed": root.seed, "dataset_dir": root.dataset_dir, **flatten(root.ray, "ray.")}
        for s in spec.sections:
            flat.update(flatten(section_value(root, s), f"{s}."))
        with stage_run(root.pipeline, spec.name, flat, ctx.digest, _dataset_checksum(ctx)) as run:
            ctx.run = run
            log.on_close.append(functools.partial(run.log_artifact, artifact_path="logs"))
            metrics = dict(spec.function()(ctx))
            metrics.setdefault("stage_seconds", round(time.time() - start, 1))
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.log_artifact(ctx.tmp_out)
    metrics.setdefault("stage_seconds", round(time.time() - start, 1))
    return metrics


def _dataset_checksum(ctx: StageContext) -> str | None:
    try:
        return json.loads((ctx.path(ctx.params.dataset_dir) / "manifest.json").read_text()).get("checksum")
    except (OSError, ValueError):
        return None


def stage_main(stage: str, args: argparse.Namespace) -> int:
    """``sbir run <stage>``: one clear line for bad params or inputs instead of a deep traceback."""
    from sbir.data.format import DatasetFormatError
    from sbir.train.runtime import NonFiniteLossError

    try:
        run_stage(stage, args=args)
    except (ParamsError, DatasetFormatError, FileNotFoundError) as exc:
        print(f"[{stage}] error: {one_line(exc)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:  # deterministic: Ray's retries hit it again; say what and where
        print(f"[{stage}] error: {one_line(exc)}", file=sys.stderr)
        return 3
    return 0


def one_line(exc: BaseException) -> str:
    """An error message on one line (pydantic lists one problem per line: join them)."""
    return "; ".join(part.strip() for part in str(exc).splitlines() if part.strip()).replace(": invalid params;",
                                                                                               ": invalid params:")
