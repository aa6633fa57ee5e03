"""The stage resource monitor counts the whole process tree (Ray's raylet and workers are children)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from sbir.resources import ResourceMonitor


def test_monitor_counts_child_processes_and_writes_json(tmp_path):
    # a child holding ~200 MiB for a second: the tree's peak must include it, the parent's own must not
    code = "import time; b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    with ResourceMonitor(interval=0.1, pss_interval=0.3) as mon:
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait(timeout=60)
        time.sleep(0.2)
    rep = mon.report
    assert rep.peak_processes >= 2
    assert rep.peak_rss_mib - rep.peak_self_rss_mib > 150
    assert rep.peak_pss_mib is not None and rep.peak_pss_mib > 150
    assert rep.wall_seconds >= 1.5 and rep.cpu_count and len(rep.load_average_start) == 3
    data = json.loads(mon.write(tmp_path / "resources.json").read_text())
    assert data["peak_rss_mib"] == rep.peak_rss_mib and data["samples"] >= 10
    assert mon.stop() is rep  # idempotent
