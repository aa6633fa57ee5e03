#!/usr/bin/env python
"""How much `dvc repro` prints: console lines outside progress bars, per stage, and the known noise.

    python benchmarks/console_lines.py [--label after] [--workers 2] [--raw console.txt]
                                       [--replay console.txt] [--out benchmarks/results/console_lines.json]

Runs `dvc repro` of the tiny pipeline (``make_tiny_repo`` of tests/test_pipeline_e2e.py: the real
dvc.yaml and src/ on tiny params) in a temporary copy, under a 160x50 pseudo-terminal as a user's
console would be, with ``--workers`` real Ray Train workers (default 2, as params.yaml; 0 is local mode,
where Ray prints next to nothing). The output is replayed on a terminal emulator (pyte), so what is
counted is what stays on the screen: a bar redrawn in place is one line, dvc's transient bars vanish,
a line wider than the terminal counts twice. It splits the console at dvc's ``Running stage '<name>':``
lines and counts for each stage the lines that are not progress bars, how many lines match each known
noise pattern, and the most repeated lines (digits masked). The result is stored under ``runs[<label>]`` of the JSON file, so a "before" and an "after"
run sit side by side. Issue #15 asks for at most 60 lines outside progress bars on a clean run.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import pyte

REPO = Path(__file__).resolve().parents[1]
COLUMNS, ROWS = 160, 50  # the terminal the runs are shown on
# a tqdm bar: "desc:  40%|####      | 4/10 [00:01<00:02,  2.9it/s]" (tqdm_ray's: "| 4.00/10.0 [...]"), or
# without a total "desc: 4it [00:01, ...]"
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*[\d.]+[kMG]?/[\d.]+[kMG]? \[|\d+it \[\d+:\d+")
# what issue #15 listed, and what else Ray prints on a stage of this pipeline
NOISE = {
    "placement_group_cleaner": re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller"),
    "token_authentication": re.compile(r"token[- ]auth", re.I),
    "core_worker": re.compile(r"core_worker"),
    "numpy_not_writable": re.compile(r"not writable|non-writable", re.I),
    "ray_train_info": re.compile(r"\bINFO\b.*(ray|train)|Ray Train|Train run|Attempting to start training",
                                 re.I),
    "ray_started": re.compile(r"Started a local Ray instance|View the dashboard"),
    "ray_worker_prefix": re.compile(r"^\((RayTrainWorker|TrainController|PlacementGroupCleaner|\w+) pid="),
    "traceback": re.compile(r"Traceback \(most recent call last\)"),
    "warning": re.compile(r"warn", re.I),
}


def console_lines(text: str, columns: int = COLUMNS) -> list[str]:
    """The non-blank lines a terminal ``columns`` wide shows after ``text``, scrolled-off ones included:
    pyte's VT100 emulation applies carriage-return redraws, cursor moves and erased lines (dvc's and
    tqdm's bars), and wraps long lines as the terminal would."""
    screen = pyte.HistoryScreen(columns, ROWS, history=10**6, ratio=0.5)
    screen.set_mode(pyte.modes.LNM)  # a bare "\n" (text not from a pty) also returns the carriage
    pyte.Stream(screen).feed(text)
    rows = ["".join(line[x].data for x in range(columns)) for line in screen.history.top] + screen.display
    return [row.rstrip() for row in rows if row.strip()]


def is_progress_bar(line: str) -> bool:
    return bool(PROGRESS_BAR.search(line))


def summarise(lines: list[str], top: int = 8) -> dict[str, Any]:
    """Counts of one stretch of console: lines outside progress bars, bars, noise patterns, top repeats."""
    text_lines = [ln for ln in lines if not is_progress_bar(ln)]
    noise = {name: sum(bool(rx.search(ln)) for ln in text_lines) for name, rx in NOISE.items()}
    masked = collections.Counter(re.sub(r"\d+", "N", ln.strip())[:160] for ln in text_lines)
    return {"lines_outside_progress_bars": len(text_lines), "progress_bar_lines": len(lines) - len(text_lines),
            "noise": {k: v for k, v in noise.items() if v}, "most_repeated": masked.most_common(top)}


def split_by_stage(lines: list[str]) -> dict[str, list[str]]:
    """Console lines per stage (dvc's ``Running stage 'x':`` starts one); lines before the first: ``dvc``."""
    parts: dict[str, list[str]] = {"dvc": []}
    current = "dvc"
    for ln in lines:
        m = re.match(r"Running stage '([\w-]+)'", ln.strip())
        if m:
            current = m.group(1)
            parts.setdefault(current, [])
        parts[current].append(ln)
    return parts


def run_in_pty(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as stdout and stderr (what a user sees); returns (status, text)."""
    master, slave = pty.openpty()
    # a terminal's size: a new pty has 0 columns, and tqdm (and dvc) draw nothing at width 0
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, end = [], time.time() + timeout
    try:
        while time.time() < end:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def run_tiny_pipeline(workers: int, timeout: float = 3600) -> tuple[int, str, float]:
    """`dvc repro` of a tiny copy of this repository under a pty: (exit status, console text, seconds)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_pipeline_e2e import _env, make_tiny_repo

    with tempfile.TemporaryDirectory(prefix="console_lines_") as tmp:
        root = make_tiny_repo(Path(tmp) / "repo", {"ray": {"num_workers": workers}})
        start = time.time()
        status, text = run_in_pty([str(Path(sys.executable).parent / "dvc"), "repro"], root, _env(root), timeout)
        return status, text, time.time() - start


def measure(text: str) -> dict[str, Any]:
    """The counts of one console (see the module's doc)."""
    lines = console_lines(text)
    stages = {name: summarise(part) for name, part in split_by_stage(lines).items()}
    return {"total": summarise(lines, top=15),
            "per_stage": {k: v["lines_outside_progress_bars"] for k, v in stages.items()}, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="current", help="key of this run in the JSON file (e.g. before, after)")
    ap.add_argument("--workers", type=int, default=2, help="ray.num_workers of the tiny pipeline (default 2)")
    ap.add_argument("--raw", type=Path, default=None, help="also keep the raw console text here")
    ap.add_argument("--replay", type=Path, default=None, help="count a console kept with --raw instead of running")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/console_lines.json")
    args = ap.parse_args(argv)
    if args.replay:
        status, seconds, text = None, None, args.replay.open(newline="").read()
    else:
        status, text, seconds = run_tiny_pipeline(args.workers)
        if args.raw:
            args.raw.write_text(text, newline="")
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "workers": args.workers,
              "exit_status": status, "seconds": seconds and round(seconds, 1), "columns": COLUMNS, **measure(text)}
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report["what"] = ("console lines outside progress bars of `dvc repro` of the tiny pipeline on a 160-column "
                      "terminal (benchmarks/console_lines.py); issue #15 asks for <= 60 on a clean run")
    report.setdefault("runs", {})[args.label] = result
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"exit status {status}, {result['seconds']} s; lines outside progress bars: "
          f"{result['total']['lines_outside_progress_bars']} (noise: {result['total']['noise']})")
    for stage, n in result["per_stage"].items():
        print(f"  {stage:<18} {n}")
    return 0 if status in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
