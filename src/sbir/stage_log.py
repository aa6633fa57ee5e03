"""A stage's console and its log file.

While a stage runs (:func:`stage_log`), the console gets one line when it starts, its progress bars, the
warnings and errors on stderr, and one line when it ends (the time, its key metrics and where the log
is); the log file gets all of that plus whatever goes to stdout (tables, the full metrics, the Ray workers'
prints) and every log record from INFO up. The log is ``logs/<pipeline>/<stage>.log`` in the repository
(``$SBIR_LOG_DIR/<pipeline>/<stage>.log`` when set), rewritten by each run; :mod:`sbir.stage` also logs it
to the stage's MLflow run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

LOG_DIR_ENV = "SBIR_LOG_DIR"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ACTIVE: StageLog | None = None


def log_path(pipeline: str, stage: str, directory: Path | None = None) -> Path:
    """``directory/<stage>.log``; by default ``logs/<pipeline>/<stage>.log`` ($SBIR_LOG_DIR for logs/)."""
    from sbir.tracking import REPO_ROOT

    directory = directory or Path(os.environ.get(LOG_DIR_ENV, REPO_ROOT / "logs")) / pipeline
    return (directory / f"{stage}.log").resolve()


class _LogLines:
    """A text stream into the log file that keeps what a terminal would show: whole lines, the last draw
    of a line redrawn with carriage returns (a progress bar), no colour codes, no blank lines."""

    def __init__(self, file: TextIO):
        self._file, self._partial, self._lock = file, "", threading.Lock()  # Ray prints from its own thread

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                draws = [d.rstrip() for d in _ANSI.sub("", line).split("\r") if d.strip()]
                if draws:
                    self._file.write(draws[-1] + "\n")
        return len(text)

    def flush(self) -> None:
        self._file.flush()

    def isatty(self) -> bool:
        return False


class _Tee:
    """stderr while a stage runs: the console and the log file, but for carriage-return redraws (progress
    bars, whose every redraw would otherwise become a line of the log)."""

    def __init__(self, console: TextIO, log: _LogLines):
        self._console, self._log = console, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self._log.write(text)
        return self._console.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._console.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the console's (tqdm asks)
        return getattr(self._console, name)


@dataclass
class StageLog:
    stage: str
    path: Path
    console: TextIO  # the terminal's stdout
    errors: TextIO  # the terminal's stderr
    log: _LogLines
    started: float = field(default_factory=time.time)
    on_close: list[Callable[[Path], None]] = field(default_factory=list)  # e.g. log the file to MLflow

    def say(self, message: str, error: bool = False) -> None:
        """One line on the console (stderr when ``error``) and in the log."""
        print(message, file=self.errors if error else self.console, flush=True)
        self.log.write(message + "\n")

    def note(self, message: str) -> None:
        """Text for the log file only."""
        self.log.write(message.rstrip("\n") + "\n")

    def shown_path(self) -> str:
        """The log's path as the end line shows it: relative to the working directory when inside it."""
        try:
            return str(self.path.relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)

    def done(self, metrics: Mapping[str, Any], key_metrics: Sequence[str]) -> None:
        """The end line: time, seconds, the stage's key metrics and the log's path."""
        shown = ", ".join(f"{k} {_short(metrics[k])}" for k in key_metrics if k in metrics)
        self.say(f"[{self.stage}] done {time.strftime('%H:%M:%S')} in {time.time() - self.started:.1f} s"
                 + (f": {shown}" if shown else "") + f" (log: {self.shown_path()})")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def announce(message: str) -> None:
    """A line for the console and the running stage's log (plain print outside a stage)."""
    if _ACTIVE is not None:
        _ACTIVE.say(message)
    else:
        print(message, flush=True)


@contextlib.contextmanager
def stage_log(pipeline: str, stage: str, directory: Path | None = None) -> Iterator[StageLog]:
    """Run a stage with its console and log file (see the module's doc; ``directory``: see
    :func:`log_path`); the caller prints the end line (:meth:`StageLog.done`), a failure gets its own
    line and its traceback in the log."""
    global _ACTIVE
    path = log_path(pipeline, stage, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", buffering=1) as file, _log_records(_LogLines(file)) as lines:
        log = StageLog(stage, path, sys.stdout, sys.stderr, lines)
        previous, _ACTIVE = _ACTIVE, log
        log.say(f"[{stage}] start {time.strftime('%H:%M:%S')}, pipeline {pipeline}")
        try:
            with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(_Tee(sys.stderr, lines)):
                yield log
        except SystemExit as exc:
            if exc.code not in (0, None):
                log.note(traceback.format_exc())
            # a clean exit mid-stage: Ray Tune stopping a trial (an ASHA prune ends the trial's report call)
            log.say(f"[{stage}] stopped {time.strftime('%H:%M:%S')} after {time.time() - log.started:.1f} s "
                    f"(exit {exc.code}; log: {log.shown_path()})", error=exc.code not in (0, None))
            raise
        except BaseException as exc:
            log.note(traceback.format_exc())
            log.say(f"[{stage}] failed {time.strftime('%H:%M:%S')} after {time.time() - log.started:.1f} s: "
                    f"{type(exc).__name__} (log: {log.shown_path()})", error=True)
            raise
        finally:
            _ACTIVE = previous
            for callback in log.on_close:
                try:
                    callback(path)
                except Exception as exc:  # a failed copy of the log must not hide the stage's own outcome
                    log.say(f"[{stage}] warning: could not copy the log {path}: {exc}", error=True)


@contextlib.contextmanager
def _log_records(lines: _LogLines) -> Iterator[_LogLines]:
    """Every log record from INFO up into the log file; from WARNING up on the console too (a handler on
    the root logger hides Python's last-resort console handler, so this one stands in for it)."""
    root = logging.getLogger()
    to_file = logging.StreamHandler(lines)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(to_console)
    # MLflow's own console handler would print its INFO lines (store creation, migrations); its documented
    # switch, read when mlflow is first imported (inside the stage)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        yield lines
    finally:
        root.removeHandler(to_file)
        root.removeHandler(to_console)
        root.setLevel(level)
