"""``python -m sbir.sweep``: run / apply / verify / validate."""
from __future__ import annotations

import argparse
import json
import sys

from sbir.config import ParamsError, load_params
from sbir.sweep.apply import apply_overrides
from sbir.sweep.run import run_sweep
from sbir.sweep.spec import SweepError, repo_path
from sbir.sweep.verification import verify


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("run", "apply", "verify", "validate")
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv = ["run"] + argv
    parser = argparse.ArgumentParser(
        prog="python -m sbir.sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ray Tune sweeps over the pipeline's params (docs/sweeps.md).\n\n"
                    "  python -m sbir.sweep pipelines/sweeps/estimator_weights.yaml\n"
                    "  python -m sbir.sweep apply ray_results/sweeps/estimator_weights/best_params.yaml\n"
                    "  python -m sbir.sweep verify ray_results/sweeps/estimator_weights")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a sweep spec (the default command: a .yaml path alone runs it)",
                           description="Run a Ray Tune sweep: one trial = the spec's stages with sampled params, "
                                       "scored on a train-split validation set; one parent MLflow run with a child "
                                       "run per trial; results.csv, objective_vs_params.png, best_params.yaml, "
                                       "best_overrides.txt and trial_overrides.txt in the sweep folder.")
    p_run.add_argument("spec", help="sweep spec, e.g. pipelines/sweeps/estimator_weights.yaml")
    p_run.add_argument("--out", help="sweep folder (default: ray_results/sweeps/<name>; replaced if it exists)")
    p_run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="an extra base override for every trial, e.g. --set ray.use_gpu=true (repeatable)")
    p_run.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    p_apply = sub.add_parser("apply", help="merge best_params.yaml / best_overrides.txt into a params file",
                             description="Merge an override file into params.yaml (comments kept), after validating "
                                         "the result. Then `dvc repro` runs the best config.")
    p_apply.add_argument("file", help="best_params.yaml or best_overrides.txt")
    p_apply.add_argument("--params", default="params.yaml", help="params file to edit (default: params.yaml)")
    p_apply.add_argument("--dry-run", action="store_true", help="show the changes without writing")
    p_verify = sub.add_parser("verify", help="rerun the best trial through dvc repro in a temp copy and compare",
                              description=verify.__doc__)
    p_verify.add_argument("sweep_dir")
    p_verify.add_argument("--keep", action="store_true", help="keep the temporary repository copy")
    p_val = sub.add_parser("validate", help="score an outputs folder with a sweep's validation",
                           description="The objective's validation metrics for an outputs folder.")
    p_val.add_argument("--kind", choices=["category", "fine_grained"], required=True)
    p_val.add_argument("--outputs-dir", default="outputs")
    p_val.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from sbir.stage import parse_overrides

            summary = run_sweep(args.spec, args.out, use_mlflow=not args.no_mlflow,
                                extra_overrides=parse_overrides(args.overrides))
            print(json.dumps(summary, indent=2, default=str))
        elif args.command == "apply":
            changes = apply_overrides(args.file, args.params, args.dry_run)
            verb = "would change" if args.dry_run else "changed"
            print(f"{args.params}: {verb} {len(changes)} key(s)")
            for k, (old, new) in changes.items():
                print(f"  {k}: {old!r} -> {new!r}")
        elif args.command == "verify":
            print(json.dumps(verify(args.sweep_dir, keep=args.keep), indent=2, default=str))
        else:
            from sbir.tune_validation import run_validation

            root = load_params(repo_path(args.params))
            print(json.dumps(run_validation(args.kind, repo_path(root.dataset_dir), repo_path(args.outputs_dir),
                                            torch_threads=root.ray.torch_threads_per_worker), indent=2))
    except (SweepError, ParamsError, FileNotFoundError) as exc:
        print(f"[sweep] error: {exc}", file=sys.stderr)
        return 2
    return 0
