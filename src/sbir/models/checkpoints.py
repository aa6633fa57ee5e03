"""Build the project's networks and load the checkpoints the stages write.

The library layer for every consumer of a checkpoint (training stages, evaluation, ``sbir search``,
Tune validation): none of them imports a training module to read another stage's output.

| checkpoint | written by | loader |
|---|---|---|
| ``teachers.pt`` | teacher_pretrain | :func:`load_teachers` |
| ``students.pt`` | distill, upper_bound | :func:`load_students` |
| ``generator.pt`` | sketch_generator | :func:`load_generator` |
| ``checkpoints/<variant>.pt`` | fgsbir_joint | :func:`load_retrieval_checkpoint` |
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbir.config import BackboneParams, StudentParams, TeacherParams
from sbir.models.backbones import Classifier, EncoderPair
from sbir.models.sketch_generator import PhotoToSketchGenerator, SketchGeneratorConfig

PathLike = str | os.PathLike


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A stage checkpoint (a pickled dict of state dicts and params) on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- teachers
class TeacherSet(nn.Module):
    """The photo classifier, the sketch classifier and the modality (photo vs sketch) network."""

    def __init__(self, p: TeacherParams, num_classes: int) -> None:
        super().__init__()
        self.photo_teacher = Classifier(p.backbone, num_classes, p.photo_classes)
        self.sketch_teacher = Classifier(p.backbone, num_classes, p.sketch_classes)
        self.modality_net = Classifier(p.modality_backbone, 2)

    def known_classes(self) -> torch.Tensor:
        """The dataset classes at least one teacher was trained on (what the estimators may draw)."""
        return torch.nonzero(self.photo_teacher.known | self.sketch_teacher.known).flatten().cpu()


def load_teachers(path: PathLike, device: torch.device | str = "cpu") -> tuple[TeacherSet, dict[str, Any]]:
    """The teacher checkpoint written by teacher_pretrain; all three nets frozen in eval mode."""
    blob = read_checkpoint(path)
    teachers = TeacherSet(TeacherParams.model_validate(blob["params"]), blob["num_classes"])
    teachers.load_state_dict(blob["model"])
    teachers.eval().requires_grad_(False).to(device)
    return teachers, blob


# ----------------------------------------------------------------------------- students and F
def build_students(p: StudentParams, teachers: TeacherSet | None, teacher_params: dict | None) -> EncoderPair:
    """Photo + sketch encoders; backbones from the teachers' when ``p.init_from_teacher``."""
    students = EncoderPair(p.backbone, p.embed_dim, p.head)
    if p.init_from_teacher and teachers is not None:
        if teacher_params is not None and BackboneParams.model_validate(teacher_params["backbone"]) != p.backbone:
            raise ValueError("student.init_from_teacher needs the student backbone to equal "
                             f"teacher_pretrain.backbone ({teacher_params['backbone']} vs {p.backbone.model_dump()})")
        for enc, teacher in ((students.photo_encoder, teachers.photo_teacher),
                             (students.sketch_encoder, teachers.sketch_teacher)):
            enc.backbone.load_state_dict(teacher.backbone.state_dict())
            enc.normalise.load_state_dict(teacher.normalise.state_dict())
    elif teachers is not None and not students.photo_encoder.uses_fixed_normalisation:  # fresh backbone, but
        # still the normalisation its inputs will need (a pretrained one keeps what its weights expect)
        students.photo_encoder.normalise.load_state_dict(teachers.photo_teacher.normalise.state_dict())
        students.sketch_encoder.normalise.load_state_dict(teachers.sketch_teacher.normalise.state_dict())
    return students


def load_students(path: PathLike) -> tuple[EncoderPair, dict[str, Any]]:
    """The students written by distill or upper_bound, eval mode."""
    blob = read_checkpoint(path)
    sp = StudentParams.model_validate(blob["params"]["student"])
    students = EncoderPair(sp.backbone, sp.embed_dim, sp.head)
    students.load_state_dict(blob["students"])
    return students.eval(), blob


def build_retrieval_model(arch: dict[str, Any]) -> EncoderPair:
    """F from its architecture dict (``backbone``, ``embed_dim``, ``head``; ``image_size`` is F's input size)."""
    return EncoderPair(BackboneParams.model_validate(arch["backbone"]), int(arch["embed_dim"]), arch.get("head", "linear"))


def load_retrieval_checkpoint(path: PathLike) -> tuple[EncoderPair, dict[str, Any]]:
    """An F checkpoint written by fgsbir_joint (``checkpoints/<variant>.pt``), eval mode."""
    blob = read_checkpoint(path)
    model = build_retrieval_model(blob["arch"])
    model.load_state_dict(blob["model"])
    return model.eval(), blob


# ----------------------------------------------------------------------------- generator
def load_generator(path: PathLike, device: torch.device | str = "cpu") -> tuple[PhotoToSketchGenerator, dict[str, Any]]:
    """G from the checkpoint written by the sketch_generator stage (eval mode)."""
    blob = read_checkpoint(path)
    cfg = SketchGeneratorConfig(**{**blob["config"], "encoder_channels": tuple(blob["config"]["encoder_channels"])})
    g = PhotoToSketchGenerator(cfg)
    g.load_state_dict(blob["model"])
    return g.to(device).eval(), blob


def checkpoint_path(path: PathLike) -> Path:
    """``path`` as a Path, with a clear error when the stage that writes it has not run."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run the earlier stages first")
    return p
