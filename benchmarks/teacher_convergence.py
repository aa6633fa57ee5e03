"""Teachers to convergence: test accuracy against epochs for several epoch budgets.

Each budget is its own run of ``teacher_pretrain`` (the one-cycle schedule spans the whole budget, so
a 12-epoch run is not the first half of a 24-epoch one), in-process, seed 0, from the repository's
params. ``--history E=PATH`` reuses the ``history.json`` an earlier run of budget E wrote instead of
running it. Writes ``benchmarks/results/teacher_convergence.json`` and a figure beside it.

    python benchmarks/teacher_convergence.py --epochs 12 24 36
    python benchmarks/teacher_convergence.py --epochs 12 24 --history 12=outputs/teacher_pretrain/history.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_PARAMS = REPO / "pipelines" / "embedded-full" / "params.yaml"  # the science budgets (the default cuts them)
sys.path.insert(0, str(REPO / "src"))

CURVES = ("photo_teacher_test_acc", "sketch_teacher_test_acc")


def run_budget(epochs: int, params: str, overrides: list[str]) -> list[dict]:
    from sbir.stage import run_stage

    with tempfile.TemporaryDirectory(prefix=f"teachers-{epochs}-") as tmp:
        os.environ["SBIR_RAY_RESULTS"] = str(Path(tmp) / "ray")
        sets = [f"teacher_pretrain.epochs={epochs}", f"outputs_dir={tmp}", "ray.num_workers=0", *overrides]
        run_stage("teacher_pretrain", ["--params", params, "--no-mlflow", "--restart"]
                  + [x for s in sets for x in ("--set", s)])
        return json.loads((Path(tmp) / "teacher_pretrain" / "history.json").read_text())


def plot(runs: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for epochs, history in runs.items():
        for key, style in zip(CURVES, ("-", "--")):
            ax.plot([h["epoch"] + 1 for h in history], [h[key] for h in history], style,
                    label=f"{key.split('_')[0]} teacher, {epochs}-epoch schedule")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--history", action="append", default=[], metavar="E=PATH",
                    help="history.json of an earlier run of budget E (repeatable)")
    ap.add_argument("--params", default=str(FULL_PARAMS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/teacher_convergence.json"))
    args = ap.parse_args(argv)
    given = {int(k): Path(v) for k, v in (h.split("=", 1) for h in args.history)}
    runs = {e: json.loads(given[e].read_text()) if e in given else run_budget(e, args.params, args.overrides)
            for e in args.epochs}
    final = {e: {k: round(h[-1][k], 4) for k in CURVES} for e, h in runs.items()}
    for e, accs in final.items():
        print(f"{e:3d} epochs: " + ", ".join(f"{k} {v}" for k, v in accs.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"final": final, "sources": {e: str(given.get(e, "run here")) for e in runs},
              "curves": {e: [{k: h[k] for k in ("epoch", *CURVES)} for h in hist] for e, hist in runs.items()}}
    out.write_text(json.dumps(result, indent=2))
    plot(runs, out.with_suffix(".png"))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
