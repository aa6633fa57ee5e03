"""Data-free reconstruction: train class-conditional photo and sketch estimators against the frozen
teachers (no training data is read), then write estimators.pt, a Parquet bank of reconstructed pairs
(bank.parquet) and a per-class grid (pairs.png) to outputs/reconstruct/."""
import _bootstrap  # noqa: F401

from sbir.dfsbir.reconstruct import run_reconstruct
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("reconstruct", run_reconstruct, __doc__)
