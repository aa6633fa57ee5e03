#!/usr/bin/env python
"""The default pipeline end to end: wall time, per-stage time and its split, console lines, memory.

    python benchmarks/repro_speed.py --label after [--command "make repro DVC_ARGS=--force"]
    python benchmarks/repro_speed.py --label before --root DIR --replay console.txt --memory mem.txt --wall S
    python benchmarks/repro_speed.py --label after --collect-only [--root DIR] [--compare A B]

Runs ``--command`` (default: ``make repro DVC_ARGS=--force``, i.e. every stage from a clean start; with Ray
workers in the params, one Ray instance that ``make`` keeps for the run) in this checkout under a 160x50 pseudo-terminal, as a user
would, while a thread samples the machine's used memory (MemTotal - MemAvailable) every 2 s. Or, with
``--replay``, it reads a run made by hand (its console text, e.g. from ``script``, its memory samples as
"<epoch seconds> <MiB>" lines, and its wall time). Then, from ``<root>/outputs/<stage>/`` it collects per
stage: the wall time, the fit time and where it went (``resources.json``:
``trainings[].time_split``: start-up, compute, reports, teardown, when the run recorded it), and the peak
of the machine's used memory while the stage ran. The console is counted as benchmarks/console_lines.py
counts it (lines outside progress bars), and the run's headline metrics (teachers, every method's
mAP@all, every fine-grained variant's Acc@1/10 and mean rank) go beside its times. Stored under
``runs[<label>]`` of the JSON file, so a "before" and an "after" sit side by side; the table printed
compares the first two labels, or ``--compare A B``. ``--collect-only`` re-reads the stages and metrics
of ``--root`` into an existing run without running anything.

Issue #15: <= 5 min for the whole run, <= 60 console lines outside progress bars.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from console_lines import console_lines, measure, run_in_pty  # noqa: E402


def used_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda k: float(info[k].split()[0])  # noqa: E731
    return (kib("MemTotal") - kib("MemAvailable")) / 1024


class MemorySampler(threading.Thread):
    def __init__(self, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.stopped = every, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.time(), used_mib()))
            self.stopped.wait(self.every)


def read_samples(path: Path) -> list[tuple[float, float]]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(float(t), float(m)) for t, m in rows]


def stage_rows(root: Path, samples: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per stage of root/dvc.yaml, in order: wall, fit, time split and the machine's memory peak."""
    rows = []
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]:
        folder = root / "outputs" / stage
        res = json.loads((folder / "resources.json").read_text()) if (folder / "resources.json").is_file() else {}
        sm = json.loads((folder / "stage_metrics.json").read_text()) if (folder / "stage_metrics.json").is_file() else {}
        row: dict[str, Any] = {"stage": stage, "wall_seconds": res.get("wall_seconds", sm.get("stage_seconds"))}
        trainings = res.get("trainings") or []  # every Ray Train fit of the stage, with its time split
        if trainings:
            row["fit_seconds"] = round(sum(t.get("train_seconds") or 0 for t in trainings), 2)
            row["precision"] = sorted({t.get("precision", "fp32") for t in trainings})
            splits = [t["time_split"] for t in trainings if t.get("time_split")]
            if splits:
                row["time_split"] = {k: round(sum(s[k] for s in splits), 2) for k in splits[0]}
        if res and row["wall_seconds"]:
            end = (folder / "resources.json").stat().st_mtime  # written as the stage ends
            during = [m for t, m in samples if end - row["wall_seconds"] - 2 <= t <= end + 2]
            row["machine_peak_used_mib"] = round(max(during)) if during else None
        rows.append(row)
    return rows


HEADLINE_KEYS = ("mAP@all", "acc@1", "acc@10", "mean_rank", "_test_acc", "acc_pseudo")


def headline_metrics(root: Path) -> dict[str, Any]:
    """What the run computed, beside its time: the teachers' test accuracies, every method's mAP@all
    (evaluate), the sketch teacher's class accuracy on G's pseudo sketches (pseudo_pairs) and every
    variant's Acc@1 / Acc@10 / mean rank, G's sketches as queries included (fg_evaluate), from the stages'
    metrics.json."""
    out: dict[str, Any] = {}
    for stage in ("teacher_pretrain", "evaluate", "pseudo_pairs", "fg_evaluate"):
        path = root / "outputs" / stage / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            out[stage] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k.endswith(HEADLINE_KEYS)}
    return out


def table(runs: dict[str, Any], labels: list[str] | None = None) -> str:
    labels = labels or list(runs)[:2]
    stages = [r["stage"] for r in runs[labels[0]]["stages"]]
    by = {lab: {r["stage"]: r for r in runs[lab]["stages"]} for lab in labels}
    head = "| stage | " + " | ".join(f"{lab} wall (s) | {lab} start-up / compute / reports / teardown" for lab in labels) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(labels))]

    def split(r: dict) -> str:
        s = r.get("time_split")
        return " / ".join(str(s[k]) for k in ("start_up", "compute", "reports", "teardown")) if s else "-"

    for st in stages:
        cells = [f"{by[lab].get(st, {}).get('wall_seconds', '-')} | {split(by[lab].get(st, {}))}" for lab in labels]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines.append("| **whole run (wall)** | " + " | ".join(f"{runs[lab]['wall_seconds']} | console lines "
                                                           f"{runs[lab]['console']['lines_outside_progress_bars']}, "
                                                           f"peak used {runs[lab]['machine_peak_used_mib']} MiB"
                                                           for lab in labels) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--command", default="make repro DVC_ARGS=--force")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository the run happened in")
    parser.add_argument("--replay", type=Path, help="console text of a run made by hand (no run here)")
    parser.add_argument("--memory", type=Path, help="with --replay: its memory samples")
    parser.add_argument("--wall", type=float, help="with --replay: its wall seconds")
    parser.add_argument("--note", default="", help="what else ran on the machine, or any caveat")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/repro_speed.json")
    parser.add_argument("--compare", nargs=2, metavar="LABEL", help="the two runs the printed table compares "
                                                                      "(default: the file's first two)")
    parser.add_argument("--collect-only", action="store_true",
                        help="no run: re-read the stages and metrics of --root into the existing run --label "
                             "(its wall time and console count stay)")
    args = parser.parse_args()
    if args.collect_only:
        record = json.loads(args.out.read_text())
        run = record["runs"][args.label]
        peaks = {r["stage"]: r.get("machine_peak_used_mib") for r in run["stages"]}  # sampled during the run
        run["stages"] = [{**r, "machine_peak_used_mib": peaks.get(r["stage"])} for r in stage_rows(args.root, [])]
        run["metrics"] = headline_metrics(args.root)
        args.out.write_text(json.dumps(record, indent=2))
        print(table(record["runs"], args.compare))
        return
    if args.replay:
        text, status, wall = args.replay.read_text(errors="replace"), None, args.wall
        samples = read_samples(args.memory) if args.memory else []
        command = "(replayed)"
    else:
        sampler = MemorySampler()
        sampler.start()
        start = time.time()
        status, text = run_in_pty(shlex.split(args.command), args.root, dict(os.environ), timeout=4 * 3600)
        wall = round(time.time() - start, 1)
        sampler.stopped.set()
        samples, command = sampler.samples, args.command
    counts = measure(text)
    run = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": command, "exit_status": status,
           "wall_seconds": wall, "note": args.note, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "load_average_end": list(os.getloadavg()),
           "machine_peak_used_mib": round(max(m for _, m in samples)) if samples else None,
           "console": {"lines_outside_progress_bars": counts["total"]["lines_outside_progress_bars"],
                       "per_stage": counts["per_stage"], "most_repeated": counts["total"]["most_repeated"][:8]},
           "stages": stage_rows(args.root, samples), "metrics": headline_metrics(args.root)}
    record = json.loads(args.out.read_text()) if args.out.is_file() else {
        "what": "the default pipeline end to end (benchmarks/repro_speed.py)", "runs": {}}
    record["runs"][args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(table(record["runs"], args.compare))


if __name__ == "__main__":
    main()
