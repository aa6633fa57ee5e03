"""Semi-supervised FG-SBIR, step 1: pretrain the photo-to-sketch generator G (sketch-rnn VAE with
2-D attention over the photo) on the labelled sketch-photo pairs, on Ray Train. Writes
outputs/sketch_generator/generator.pt, metrics.json, curves.png and samples.png."""
import _bootstrap  # noqa: F401

from sbir.fgsbir.generator_train import run_sketch_generator
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("sketch_generator", run_sketch_generator, __doc__, section="sketch_generator")
