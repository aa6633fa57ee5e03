"""A finished sweep's results: one row per trial, the best trial, results.csv, the plot and the override files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from sbir.config import load_params, set_dotted
from sbir.sweep.spec import LogUniformDim, SweepSpec, format_override, repo_path


def collect_results(spec: SweepSpec, out: Path, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: status (completed / pruned / failed), objective, swept values, metrics.

    The trial's own ``summary.json`` is the record of completion (Tune's last result can be a stage report
    that reached Tune after the trial's final one: TuneReportCallback forwards through a queue)."""
    import re

    rows = []
    for result in grid:
        config = (result.config or {}).get("swept", {})
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id")
        if not trial_id and result.path:
            m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(result.path).name)
            trial_id = m.group(1) if m else Path(result.path).name
        summary_file = out / "trials" / str(trial_id) / "summary.json"
        trial_summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if result.error is not None:
            status = "failed"
        elif trial_summary.get("status") == "completed":
            status = "completed"
        else:
            status = "pruned"  # stopped by ASHA before its final report
        final = trial_summary.get("metrics", {}) if status == "completed" else {}
        objective = final.get(spec.objective.metric)
        row: dict[str, Any] = {"trial_id": trial_id, "status": status,
                               "objective": float(objective) if objective is not None else float("nan")}
        row.update({k: config.get(k, trial_summary.get("swept", {}).get(k)) for k in spec.space})
        row.update({"iterations": metrics.get("training_iteration"),
                    "seconds": trial_summary.get("seconds", round(float(metrics.get("time_total_s", float("nan"))), 1)),
                    "mlflow_run_id": trial_summary.get("mlflow_run_id"), "node_id": trial_summary.get("node_id"),
                    "error": _short_error(result.error)})
        row.update({k: v for k, v in final.items() if k.startswith("val/")})
        rows.append(row)
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows


def _short_error(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def best_row(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "completed" and math.isfinite(r["objective"])]
    if not done:
        return None
    sign = 1 if spec.objective.mode == "max" else -1
    # ties: the first trial in id order (deterministic)
    return max(done, key=lambda r: (sign * r["objective"], -rows.index(r)))


def write_results(spec: SweepSpec, out: Path, rows: list[dict[str, Any]], root: Any, seconds: float) -> dict[str, Any]:
    """results.csv, objective_vs_params.png, best_params.yaml, best_overrides.txt, trial_overrides.txt."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    plot_objective(spec, df, out / "objective_vs_params.png")
    counts = {s: int((df["status"] == s).sum()) for s in ("completed", "pruned", "failed")}
    summary: dict[str, Any] = {"sweep": spec.name, "objective": spec.objective.metric, "mode": spec.objective.mode,
                               "validation": spec.validation, "num_trials": len(rows),
                               **{f"num_{k}": v for k, v in counts.items()}, "sweep_seconds": round(seconds, 1),
                               "out_dir": str(out)}
    best = best_row(spec, rows)
    if best is None:
        summary["best_trial_id"] = None
        print(f"[sweep] no trial completed ({counts}); see {out / 'results.csv'}", flush=True)
        return summary
    best_values = {k: best[k] for k in spec.space}
    # check the override is valid params before writing it
    load_params(repo_path(spec.params), {**spec.base_overrides, **best_values})
    nested: dict[str, Any] = {}
    for k, v in best_values.items():
        set_dotted(nested, k, v)
    header = (f"# best of sweep {spec.name}: trial {best['trial_id']}, {spec.objective.metric} = "
              f"{best['objective']:.6g} ({spec.objective.mode}); validation: {spec.validation} (train split)\n"
              f"# only the swept keys; the trial also used the base overrides in trial_overrides.txt\n")
    (out / "best_params.yaml").write_text(header + yaml.safe_dump(nested, sort_keys=False))
    (out / "best_overrides.txt").write_text("".join(f"-S {format_override(k, v)}\n" for k, v in best_values.items()))
    (out / "trial_overrides.txt").write_text("".join(f"-S {format_override(k, v)}\n"
                                                     for k, v in {**spec.base_overrides, **best_values}.items()))
    summary.update(best_trial_id=best["trial_id"], best_objective=best["objective"], best_params=best_values)
    print(f"[sweep] {counts['completed']} completed, {counts['pruned']} pruned, {counts['failed']} failed; best "
          f"{spec.objective.metric} = {best['objective']:.4f} (trial {best['trial_id']}): {best_values}", flush=True)
    return summary


def plot_objective(spec: SweepSpec, df: Any, path: Path) -> None:
    """One panel per swept key: the objective of every completed trial against the key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    done = df[df["status"] == "completed"]
    best = best_row(spec, df.to_dict("records"))
    for ax, key in zip(axes[0], keys):
        dim = spec.space[key]
        values = done[key].tolist()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            x = values
            if isinstance(dim, LogUniformDim):
                from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ScalarFormatter())  # 0.2, 0.5, 1, 2, 5 rather than 2x10^-1
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:  # categorical: positions in the order of the spec's values
            labels = [json.dumps(v) for v in getattr(dim, "values", sorted(set(map(str, values))))]
            x = [labels.index(json.dumps(v)) if json.dumps(v) in labels else -1 for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.scatter(x, done["objective"], c="tab:blue", label="trial")
        if best is not None:
            bx = best[key] if numeric else [json.dumps(v) for v in getattr(dim, "values", [])].index(json.dumps(best[key]))
            ax.scatter([bx], [best["objective"]], c="tab:red", marker="*", s=160, label="best")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(spec.objective.metric, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    n_other = int((df["status"] != "completed").sum())
    fig.suptitle(f"sweep {spec.name}: {len(done)} completed trials" + (f" ({n_other} pruned/failed not shown)"
                                                                       if n_other else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
