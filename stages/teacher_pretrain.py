"""Train the photo classifier (photos only), the sketch classifier (sketches only) and the modality
guidance network (photo vs sketch) as one Ray Train job. Writes outputs/teacher_pretrain/teachers.pt
(model, optimizer, scheduler, epoch, params), metrics.json and curves.png."""
import _bootstrap  # noqa: F401

from sbir.dfsbir.teacher import run_teacher_pretrain
from sbir.stage import stage_main

if __name__ == "__main__":
    stage_main("teacher_pretrain", run_teacher_pretrain, __doc__)
