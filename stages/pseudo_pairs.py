"""Semi-supervised FG-SBIR, step 2: the sketch generator draws one sketch for every unlabelled train
photo (batched inference, no Ray job). Writes outputs/pseudo_pairs/pseudo_pairs.parquet (photo_id,
stroke-3, rendered PNG, log-likelihood; the discriminator score is filled by fgsbir_joint),
metrics.json and pairs.png."""
import _bootstrap  # noqa: F401

from sbir.fgsbir.pseudo_pairs import run_pseudo_pairs
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("pseudo_pairs", run_pseudo_pairs, __doc__, section="pseudo_pairs")
