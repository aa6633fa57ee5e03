"""Ray's ``worker_process_setup_hook`` for the stages' Ray instances: what every Ray worker process runs
once it is connected. Kept apart from ``sbir.train.runtime`` and free of torch on purpose: the hook runs in
*every* worker process of the job, Ray's own helper actors included (Train controller, placement-group
cleaner, preemption watcher), and importing torch there cost each of them seconds (about 30 s per process
on the loaded 2-core machine: a 2-worker fit on a 2-node cluster took 170 s more to start its actors)."""
from __future__ import annotations

import logging
import os
from typing import Callable

# Ray Train V2 starts a detached PlacementGroupCleaner actor per fit; every second it asks Ray's State API
# whether the Train controller is still alive, so that it can remove the placement group if the controller
# dies. The State API is served by the Ray dashboard, which needs ray[default] (not installed; ray.init runs
# with include_dashboard=False), so every query fails and the cleaner logs this warning once a second for
# the whole fit (507 of 800 console lines of a `make repro`). Ray 2.60 has no switch to turn the cleaner or
# its query off (ray-project/ray#65443 discusses replacing it), so this one message of this one logger is
# dropped in Ray's worker processes (``worker_process_setup_hook``); the cleaner's other messages stay.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_STATE_API_WARNING = "Failed to query Ray Train Controller actor state"
# Ray Train's per-report INFO line ("Reporting training result N: ...", two per report and worker) comes
# from a logger that Ray names by its module's file path, outside the ``ray.train`` loggers that
# RunConfig's LoggingConfig levels, so it gets that level here.
REPORT_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")
# On a local instance nothing autoscales, yet every fit asks Ray's autoscaling coordinator actor for its
# workers' resources with a 5 s timeout; on a loaded machine the request times out and logs a warning
# with a 20-line traceback that ends "it's safe to ignore this error".
COORDINATOR_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


class _Drop(logging.Filter):
    """Drops the records of a logger that ``match``. A filter rather than a level: Ray Train's logging
    set-up, which runs after the hook, resets the levels of the ``ray.train`` loggers but keeps filters."""

    def __init__(self, match: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.match(record)


def _drop(logger: str, match: Callable[[logging.LogRecord], bool]) -> None:
    target = logging.getLogger(logger)
    if not any(isinstance(f, _Drop) for f in target.filters):
        target.addFilter(_Drop(match))


def setup_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every Ray worker process once it is connected."""
    import ray

    # Ray's State API client (the cleaner's) is given no address, so it looks for the Ray instances running
    # on this machine, and when there are several (two stages, tests, someone else's experiment) it raises
    # ConnectionError, which kills the cleaner's monitor thread with a 30-line traceback on the console. The
    # instance it means is this worker's own.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    _drop(CLEANER_LOGGER, lambda r: str(r.msg).startswith(CLEANER_STATE_API_WARNING))
    _drop(os.path.join(os.path.dirname(ray.__file__), *REPORT_LOGGER_FILE), lambda r: r.levelno < logging.WARNING)


def setup_local_ray_worker() -> None:
    """:func:`setup_ray_worker`, and on a local instance (nothing autoscales) no warnings from the
    autoscaling coordinator's client either (see above)."""
    setup_ray_worker()
    _drop(COORDINATOR_LOGGER, lambda r: r.levelno < logging.ERROR)
