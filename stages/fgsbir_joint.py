"""Semi-supervised FG-SBIR, step 3: the fine-grained retrieval model F (photo + sketch encoder,
triplet loss), initialised from the data-free students, in three variants in one Ray Train fit:
supervised-only (labelled pairs), semi-supervised (labelled + discriminator-weighted pseudo pairs
+ consistency to the frozen supervised model + REINFORCE updates of the generator) and the fully
supervised upper bound (every train pair). Writes outputs/fgsbir_joint/checkpoints/<variant>.pt,
pseudo_scores.parquet, metrics.json and curves.png."""
import _bootstrap  # noqa: F401

from sbir.fgsbir.joint import run_fgsbir_joint
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("fgsbir_joint", run_fgsbir_joint, __doc__, section="fgsbir_joint")
