"""A small resource monitor for stages: wall time and peak memory of the stage's whole process tree.

A stage's work does not all happen in its own process: ``ray.init`` starts the GCS server and the raylet
as children of the stage process, and Ray Train's workers are children of the raylet. So the monitor
samples the resident set size (RSS) of the process *tree* (the stage process and all its descendants)
in a background thread and keeps the peak of the sum.

psutil (a maintained library) does the process-tree walk and the per-process RSS; the monitor itself
is just the sampling thread. The sum of RSS counts pages shared between processes (the torch libraries
mapped into every worker, Ray's shared-memory object store) once per process, so it overstates the
physical memory in use: read it as an upper bound, comparable between runs on one machine. The monitor
also samples the proportional set size (PSS: shared pages split between the processes sharing them, so
the sum is the tree's real share of physical memory), but less often (``pss_interval``, default 10 s):
reading it makes the kernel walk every page table (~30 ms per torch process here), too costly to do
twice a second on 2 cores, so ``peak_pss_mib`` can miss short peaks.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

MIB = 1024 * 1024


@dataclass
class ResourceReport:
    wall_seconds: float
    peak_rss_mib: float  # peak over samples of the summed RSS of the process tree
    peak_self_rss_mib: float  # peak RSS of the stage process alone
    peak_pss_mib: float | None  # peak summed PSS over the (sparser) PSS samples; None if none was taken
    peak_processes: int  # most processes seen in the tree at one sample
    samples: int
    interval_seconds: float
    cpu_count: int | None
    cpu_count_physical: int | None
    load_average_start: list[float]
    load_average_end: list[float]
    cpu_user_seconds: float  # CPU time of the tree's processes seen by the monitor (children counted while alive)
    cpu_system_seconds: float
    hostname: str = field(default_factory=platform.node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def _pss(pid: int) -> int:
    """Proportional set size in bytes from /proc/<pid>/smaps_rollup (0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class ResourceMonitor:
    """Sample the RSS of a process tree every ``interval`` seconds until :meth:`stop`.

    Use as a context manager::

        with ResourceMonitor() as mon:
            work()
        mon.report.to_dict()
    """

    def __init__(self, pid: int | None = None, interval: float = 0.5, pss_interval: float = 10.0) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.pss_interval = pss_interval
        self._next_pss = 0.0
        self._peak_pss: int | None = None
        self.report: ResourceReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._peak_self = 0
        self._peak_procs = 0
        self._samples = 0
        # last seen CPU times per process (pid, create_time) -> (user, system): children that exit between
        # samples lose at most one interval of CPU time
        self._cpu: dict[tuple[int, float], tuple[float, float]] = {}

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total, n = 0, 0
        want_pss = self.pss_interval > 0 and time.time() >= self._next_pss
        pss_total = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
            except psutil.Error:  # exited between the listing and the read
                continue
            total += rss
            n += 1
            if want_pss:
                pss_total += _pss(proc.pid)
            self._cpu[key] = (cpu.user, cpu.system)
            if proc.pid == self.root.pid:
                self._peak_self = max(self._peak_self, rss)
        self._peak = max(self._peak, total)
        if want_pss:
            self._peak_pss = max(self._peak_pss or 0, pss_total)
            self._next_pss = time.time() + self.pss_interval
        self._peak_procs = max(self._peak_procs, n)
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "ResourceMonitor":
        self._t0 = time.time()
        self._load0 = _load_average()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="sbir-resource-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ResourceReport:
        """Stop sampling and build the report (idempotent: a second call returns the first report)."""
        if self.report is not None:
            return self.report
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)
        self._sample()
        user = sum(u for u, _ in self._cpu.values())
        system = sum(s for _, s in self._cpu.values())
        self.report = ResourceReport(
            wall_seconds=round(time.time() - self._t0, 2), peak_rss_mib=round(self._peak / MIB, 1),
            peak_self_rss_mib=round(self._peak_self / MIB, 1),
            peak_pss_mib=None if self._peak_pss is None else round(self._peak_pss / MIB, 1),
            peak_processes=self._peak_procs,
            samples=self._samples, interval_seconds=self.interval, cpu_count=os.cpu_count(),
            cpu_count_physical=psutil.cpu_count(logical=False), load_average_start=self._load0,
            load_average_end=_load_average(), cpu_user_seconds=round(user, 2), cpu_system_seconds=round(system, 2))
        return self.report

    def __enter__(self) -> "ResourceMonitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (stops the monitor first if it is still running)."""
        if self.report is None:
            self.stop()
        path = Path(path)
        path.write_text(json.dumps(self.report.to_dict(), indent=2))
        return path
