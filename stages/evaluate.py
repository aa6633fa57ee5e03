"""Category-level evaluation: test sketches query test photos (cosine). Table of mAP@all, mAP@200, P@100,
P@200 for chance, classifier-only, CrossX-DFL and the upper bound; embeddings (.npy), PR curves,
top-10 retrieval grid. Writes outputs/evaluate/."""
import _bootstrap  # noqa: F401

from sbir.dfsbir.evaluate import run_evaluate
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("evaluate", run_evaluate, __doc__)
