"""CrossX-DFL distillation: train the photo and sketch students on reconstructed pairs only, alternating
k estimator steps (with the bounded adversarial term) and m student steps that replay the sample bank.
Writes outputs/distill/students.pt, metrics.json and curves.png."""
import _bootstrap  # noqa: F401

from sbir.dfsbir.distill import run_distill
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("distill", run_distill, __doc__, section="distill")
