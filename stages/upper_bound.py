"""Data-dependent upper bound: the same students and losses as distill, trained on the real training
photos and sketches instead of reconstructed pairs. Writes outputs/upper_bound/students.pt."""
import _bootstrap  # noqa: F401

from sbir.dfsbir.distill import run_distill
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("upper_bound", lambda ctx: run_distill(ctx, source="real"), __doc__, section="distill")
