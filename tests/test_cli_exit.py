"""``sbir`` / ``python -m sbir`` end through ``sbir.cli.quick_exit`` (no interpreter teardown): what a normal
exit does that matters must still happen, and the exit status must be the command's."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered stdout, as in a pipe
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_quick_exit_runs_atexit_handlers_and_flushes_buffered_output(tmp_path):
    done = _python("""
        import atexit, sys
        from sbir.cli import quick_exit
        atexit.register(lambda: open("handler_ran", "w").close())
        sys.stdout.write("buffered, not yet flushed")
        quick_exit(3)
        """, tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, not yet flushed"
    assert (tmp_path / "handler_ran").is_file()


def test_quick_exit_waits_for_a_running_non_daemon_thread(tmp_path):
    """A thread a normal exit would wait for (a writer finishing a file) is waited for: a normal exit then."""
    done = _python("""
        import threading, time
        from sbir.cli import quick_exit
        def late_writer():
            time.sleep(0.5)
            open("written_late", "w").close()
        threading.Thread(target=late_writer).start()
        quick_exit(0)
        """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "written_late").is_file()


def test_python_dash_m_sbir_keeps_the_commands_exit_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "sbir", "stages"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "reconstruct" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sbir", "run", "evaluate", "--params", str(tmp_path / "missing.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


def test_quick_exit_leaves_a_profilers_output_to_a_normal_exit(tmp_path):
    """``python -m cProfile -o F -m sbir ...`` writes F after the program returns: a quick exit would lose it."""
    script = tmp_path / "stage_like.py"
    script.write_text("from sbir.cli import quick_exit\nquick_exit(0)\n")
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "out.prof"), str(script)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.prof").stat().st_size > 0
