"""Semi-supervised FG-SBIR, step 4: test sketches query test photos; rank of the true photo (ties
count against the query) and Acc@1/5/10 for every model fgsbir_joint wrote. Writes
outputs/fg_evaluate/metrics.json, results_table.md, embeddings/*.npy, rank_histogram.png and
retrievals_<model>.png."""
import _bootstrap  # noqa: F401

from sbir.fgsbir.evaluate import run_fg_evaluate
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("fg_evaluate", run_fg_evaluate, __doc__, section="fg_evaluate")
