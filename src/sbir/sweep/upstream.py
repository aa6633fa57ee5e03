"""The pipeline's outputs a sweep's trials read but do not run: linked into each trial, checksummed once."""
from __future__ import annotations

import hashlib
from pathlib import Path

from sbir.registry import STAGES


def link_upstream(base_outputs: Path, trial_outputs: Path, run_stages: list[str]) -> list[str]:
    """Link the pipeline's outputs of the stages a trial does not run into its outputs dir (read only)."""
    trial_outputs.mkdir(parents=True, exist_ok=True)
    linked = []
    for stage in STAGES:
        src, dst = base_outputs / stage, trial_outputs / stage
        if stage in run_stages or not src.is_dir() or dst.exists() or dst.is_symlink():
            continue
        dst.symlink_to(src.resolve(), target_is_directory=True)
        linked.append(stage)
    return linked


def upstream_checksums(base_outputs: Path, run_stages: list[str]) -> dict[str, str]:
    """sha256 of every file of the upstream stage outputs a sweep links (``verify`` checks they did not change)."""
    out = {}
    for stage in STAGES:
        d = base_outputs / stage
        if stage in run_stages or not d.is_dir():
            continue
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            out[str(f.relative_to(base_outputs))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out
