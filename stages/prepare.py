"""Generate the embedded procedural dataset (photos + stroke sketches from a seed) into dataset_dir
as Parquet, and write a preview grid (outputs/prepare/preview.png)."""
import _bootstrap  # noqa: F401  (makes `sbir` importable from a plain checkout)

from sbir.data.prepare import run_prepare
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("prepare", run_prepare, __doc__)
