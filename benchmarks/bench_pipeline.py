#!/usr/bin/env python
"""Wall time and peak memory of each stage of the last `dvc repro`.

    python benchmarks/bench_pipeline.py [--root REPO] [--dvc-yaml dvc.yaml] [--outputs outputs] [--out JSON]

It runs nothing: every stage writes ``outputs/<stage>/resources.json`` (``sbir.resources``: wall seconds,
peak RSS of the stage's process tree, i.e. the stage process plus the Ray raylet and workers it starts,
CPU count, load average) next to ``stage_metrics.json``; this script collects them in the order of
``dvc.yaml``, prints a table and writes ``benchmarks/results/pipeline.json``. Run it after ``make repro``.
A stage without outputs is reported as ``missing``; one whose outputs predate the monitor as
``no_resources`` (its ``stage_seconds`` only): nothing is silently dropped.

Peak RSS sums the RSS of every process in the tree, so shared pages (torch libraries in each worker,
Ray's shared-memory object store) count once per process: an upper bound, comparable between runs.
``peak_pss_mib`` (proportional set size, shared pages split) is the tree's real share of memory, sampled
every 10 s only, so it can miss short peaks.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def collect(root: Path = REPO, dvc_yaml: str = "dvc.yaml", outputs: str = "outputs") -> dict[str, Any]:
    """Per-stage figures of the last run of each stage of ``root/dvc_yaml`` (outputs under ``root/outputs``)."""
    root = Path(root)
    spec_path = root / dvc_yaml
    try:
        stages = list(yaml.safe_load(spec_path.read_text())["stages"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise SystemExit(f"{spec_path}: cannot read the stage list ({exc})")
    rows: list[dict[str, Any]] = []
    for stage in stages:
        out = root / outputs / stage
        row: dict[str, Any] = {"stage": stage}
        res_path, met_path = out / "resources.json", out / "stage_metrics.json"
        metrics = json.loads(met_path.read_text()) if met_path.is_file() else None
        if res_path.is_file():
            res = json.loads(res_path.read_text())
            row.update(status="ok", wall_seconds=res["wall_seconds"], peak_rss_mib=res["peak_rss_mib"],
                       peak_self_rss_mib=res.get("peak_self_rss_mib"), peak_pss_mib=res.get("peak_pss_mib"),
                       peak_processes=res.get("peak_processes"),
                       cpu_seconds=round(res.get("cpu_user_seconds", 0) + res.get("cpu_system_seconds", 0), 1),
                       cpu_count=res.get("cpu_count"), load_average_start=res.get("load_average_start"),
                       load_average_end=res.get("load_average_end"),
                       finished_at=dt.datetime.fromtimestamp(res_path.stat().st_mtime).isoformat(timespec="seconds"))
            trainings = res.get("trainings") or []
            if trainings:
                row["train_seconds"] = round(sum(t.get("train_seconds") or 0 for t in trainings), 1)
                row["resumed"] = any(t.get("resumed") for t in trainings)
        elif metrics is not None:
            row.update(status="no_resources", wall_seconds=metrics.get("stage_seconds"))
        else:
            row.update(status="missing")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "root": str(root), "dvc_yaml": dvc_yaml, "stages": rows,
        "total_wall_seconds": round(sum(r["wall_seconds"] or 0 for r in rows if r.get("wall_seconds")), 1),
        "max_peak_rss_mib": max((r["peak_rss_mib"] for r in ok), default=None),
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "no_resources", "missing")},
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{'stage':<18} {'status':<13} {'wall s':>8} {'train s':>8} {'peak RSS MiB':>13} {'peak PSS MiB':>13} {'procs':>6} "
             f"{'load avg (start)':>17}"]
    for r in report["stages"]:
        load = r.get("load_average_start") or []
        lines.append(f"{r['stage']:<18} {r['status']:<13} {r.get('wall_seconds') or '':>8} "
                     f"{r.get('train_seconds') or '':>8} {r.get('peak_rss_mib') or '':>13} {r.get('peak_pss_mib') or '':>13} "
                     f"{r.get('peak_processes') or '':>6} {(' '.join(map(str, load))):>17}")
    lines.append(f"total wall {report['total_wall_seconds']} s; largest peak RSS {report['max_peak_rss_mib']} MiB; "
                 f"stages {report['counts']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO, help="repository (default: this checkout)")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="pipeline file relative to --root (default dvc.yaml)")
    p.add_argument("--outputs", default="outputs", help="outputs folder relative to --root (default outputs)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json",
                   help="result JSON (default benchmarks/results/pipeline.json)")
    args = p.parse_args(argv)
    report = collect(args.root, args.dvc_yaml, args.outputs)
    print(render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
