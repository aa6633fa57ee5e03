"""One Ray instance for a whole `dvc repro`: started once, joined by every training stage, stopped at the end.

A stage that starts its own Ray pays for it every time (a new GCS, raylet and Ray's helper processes;
``benchmarks/ray_fixed_costs.py`` measures what a stage saves by joining instead). ``make repro`` runs::

    eval "$(python -m sbir.train.shared_ray start)"   # exports SBIR_RAY_ADDRESS and the head's token path
    dvc repro ...
    python -m sbir.train.shared_ray stop              # (a shell trap: also when dvc fails)

and each stage whose ``ray.address`` is null joins ``$SBIR_RAY_ADDRESS`` (see
:func:`sbir.train.runtime.ensure_ray`) as it would its own local instance; ``ray.address`` in params (a
real cluster) still wins. The head is started with ``--node-ip-address 127.0.0.1``, a token of its own
(Ray's token authentication, a fresh token per head in a folder only this user can read) and the
environment a stage gives its own instance. Without ``make`` (a bare ``dvc repro``) nothing changes:
every stage starts its own instance.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADDRESS_ENV = "SBIR_RAY_ADDRESS"
TOKEN_ENV = "RAY_AUTH_TOKEN_PATH"  # read by Ray itself
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    # the `ray` script next to this interpreter (a venv's bin), else the one on PATH
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


# Every Ray instance the stages use (see runtime.ray_environment, which sets them for a stage's own instance).
RAY_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train V2 turns a worker's print() into a log record on the worker's stderr; with the patch off a
    # print stays on stdout, which the stage sends to its log file, and stderr (the console) keeps warnings
    # and errors.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# An instance on this machine only (a stage's own, or the shared head of one `make repro`).
LOCAL_RAY_ENV = {
    # It lives on one node that is never drained, so Ray Train's preemption watcher (an actor per fit that
    # polls for node drains, and whose start logs a core_worker error line about its own restart policy)
    # has nothing to watch.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Token authentication stays on (Ray's default for a new local instance) but is set explicitly, which
    # silences the warning Ray logs when the mode is implicit.
    "RAY_AUTH_MODE": "token",
}


def head_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The shared head's environment: what a stage sets for its own local instance. Ray's helper processes
    (Train controller, cleaner) inherit the head's environment, not the joining stage's."""
    env = dict(os.environ if base is None else base)
    for key, value in {**RAY_ENV, **LOCAL_RAY_ENV, "RAY_USAGE_STATS_ENABLED": "0"}.items():
        env.setdefault(key, value)
    return env


def start(num_cpus: int | None = None) -> dict[str, str]:
    """Start a head on this machine. Returns the environment a joining stage needs: the address
    (``127.0.0.1:<port>``) and the path of the head's own authentication token (Ray's token mode, a new
    token per head, in a folder only this user can read)."""
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix=f"sbir-ray-{port}-"))
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # the joining driver must be in token mode too (Ray reads it at import), with this head's token
    joined = {ADDRESS_ENV: f"{HOST}:{port}", TOKEN_ENV: str(token), "RAY_AUTH_MODE": "token"}
    # --temp-dir in the head's own folder: its session files and every process it starts name that folder,
    # so stop() ends exactly this head, not another Ray instance of the machine (tests, another user)
    cmd = [_ray_cli(), "start", "--head", f"--node-ip-address={HOST}", f"--port={port}", f"--temp-dir={folder}",
           f"--num-cpus={num_cpus or os.cpu_count() or 1}", "--include-dashboard=false", "--disable-usage-stats"]
    # a session of its own: the head's daemons inherit its process group, which stop() signals as a whole
    done = subprocess.run(cmd, env=head_environment({**os.environ, **joined}), capture_output=True, text=True,
                          start_new_session=True)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return joined


def stop(environ: dict[str, str] | None = None, grace_seconds: float = 5.0) -> int:
    """Stop the head whose token path ``environ`` (default: this process's environment) names, then remove
    its folder. `ray start` puts the head's processes (GCS, raylet, Ray's helpers and the workers) in a
    process group of their own; the group is found through the processes whose command line names the
    head's folder, asked to stop (SIGTERM) and killed after ``grace_seconds``. Returns the number of groups."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV)
    if not token or not Path(token).parent.name.startswith("sbir-ray-"):
        return 0
    folder = Path(token).parent
    groups = _process_groups_naming(str(folder)) - {os.getpgid(0)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_seconds
        while sig == signal.SIGTERM and time.time() < deadline and _alive(groups):
            time.sleep(0.2)
    shutil.rmtree(folder, ignore_errors=True)
    return len(groups)


def _process_groups_naming(text: str) -> set[int]:
    groups = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                groups.add(os.getpgid(int(proc.name)))
        except OSError:
            continue
    return groups


def _alive(groups: set[int]) -> bool:
    for group in groups:
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            continue
    return False


def needs_head(params_path: Path) -> bool:
    """Whether a pipeline with these params has a stage that would join the head: not when every training
    stage runs in Ray Train's local mode (``ray.num_workers: 0``: no ``ray.init``) or on a cluster
    (``ray.address`` set: the stages join that instead)."""
    from sbir.config import load_params

    ray = load_params(params_path).ray  # the project's loader: a bad file stops `make repro` with its message
    return ray.num_workers > 0 and not ray.address


def shared_address() -> str | None:
    """The shared instance a stage should join, if ``make repro`` started one."""
    return os.environ.get(ADDRESS_ENV) or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sbir.train.shared_ray",
                                     description="Start (prints its address) or stop the Ray head that the stages "
                                                 f"of one `dvc repro` join through ${ADDRESS_ENV}.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the head (default: all cores)")
    parser.add_argument("--params", type=Path, default=None,
                        help="start: the pipeline's params file; start nothing (print nothing) when its stages run "
                             "in local mode (ray.num_workers: 0) or on a cluster (ray.address)")
    args = parser.parse_args(argv)
    if args.action == "start" and args.params is not None and not needs_head(args.params):
        return
    if args.action == "start":  # shell lines for `eval` (the Makefile)
        print(" ".join(f"export {k}={shlex.quote(v)};" for k, v in start(args.num_cpus).items()))
    else:
        stop()


if __name__ == "__main__":
    main()
