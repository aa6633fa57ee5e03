"""The stage registry: the one list of the pipeline's stages.

``dvc.yaml`` (``cmd: python -m sbir run <stage>``), the real-data pipelines, ``sbir.sweep``, the
benchmarks and the tests all take a stage from here; ``tests/test_registry.py`` fails when
``dvc.yaml`` and this list disagree. A new stage is one :class:`StageSpec` line below, its
``run_<stage>(ctx) -> metrics`` function, a params section (``sbir.config``) and a ``dvc.yaml`` entry.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class StageSpec:
    name: str
    target: str  # "module:function", the stage body ``fn(ctx, **kwargs) -> metrics``; imported on use
    sections: tuple[str, ...]  # params sections the stage reads; the first is its own (shown with --help)
    summary: str  # what it does and writes (``sbir run <stage> --help``)
    trains: bool = False  # runs a Ray Train job (benchmarks time these)
    shared: tuple[str, ...] = ("seed", "ray")  # top-level params it reads besides its sections
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # fixed keyword arguments of ``target``
    key_metrics: tuple[str, ...] = ()  # those of its metrics the end line shows, when present (all: its log)

    @property
    def section(self) -> str:
        return self.sections[0]

    def function(self) -> Callable[..., Mapping[str, Any]]:
        module, name = self.target.split(":")
        fn = getattr(importlib.import_module(module), name)
        return functools.partial(fn, **self.kwargs) if self.kwargs else fn

    @property
    def params(self) -> list[str]:
        """The ``params:`` of this stage's dvc.yaml entry: shared keys, then its sections."""
        return [*self.shared, *self.sections]


_STAGES = (
    StageSpec("prepare", "sbir.data.prepare:run_prepare", ("prepare",),
              "Generate the embedded procedural dataset (photos + stroke sketches from a seed) into dataset_dir "
              "as Parquet, and write a preview grid (outputs/prepare/preview.png).", shared=("seed", "dataset_dir"),
              key_metrics=("photos", "sketches")),
    StageSpec("teacher_pretrain", "sbir.dfsbir.teacher:run_teacher_pretrain", ("teacher_pretrain",),
              "Train the photo classifier (photos only), the sketch classifier (sketches only) and the modality "
              "network (photo vs sketch) as one Ray Train job. Writes teachers.pt, metrics.json, curves.png.",
              trains=True, key_metrics=("photo_teacher_test_acc", "sketch_teacher_test_acc")),
    StageSpec("reconstruct", "sbir.dfsbir.reconstruct:run_reconstruct", ("reconstruct",),
              "Data-free: train the photo and sketch estimators from the frozen teachers only (no dataset is "
              "read) and write estimators.pt, a Parquet bank of reconstructed pairs and pairs.png.",
              trains=True, key_metrics=("final_total_loss", "bank_pair_agreement")),
    StageSpec("distill", "sbir.dfsbir.distill:run_distill", ("distill", "reconstruct"),
              "Data-free: CrossX-DFL students (photo + sketch encoders) from the teachers, the estimators and "
              "the sample bank only, alternating estimator and student steps. Writes students.pt.",
              trains=True, key_metrics=("final_student_total",)),
    StageSpec("upper_bound", "sbir.dfsbir.upper_bound:run_upper_bound", ("upper_bound",),
              "The data-dependent upper bound: the students' architecture with every layer trained on the real "
              "training photos and sketches (labels, augmentation) until a held-out validation mAP@all is flat. "
              "Writes outputs/upper_bound/students.pt (the best validation point).",
              trains=True, key_metrics=("best_val_mAP@all", "final_student_total")),
    StageSpec("evaluate", "sbir.dfsbir.evaluate:run_evaluate", ("evaluate",),
              "Category-level evaluation: test sketches query test photos (cosine); mAP@all, mAP@k, P@k for "
              "chance, classifier-only, CrossX-DFL and the upper bound; embeddings, PR curves, retrievals.",
              shared=(), key_metrics=("crossx_dfl/mAP@all", "classifier_only_best/mAP@all")),
    StageSpec("sketch_generator", "sbir.fgsbir.generator_train:run_sketch_generator", ("sketch_generator",),
              "Semi-supervised FG-SBIR, step 1: the photo-to-sketch generator G (sketch-rnn VAE with 2-D "
              "attention) trained on the labelled pairs. Writes generator.pt and samples.png.",
              trains=True, key_metrics=("eval_total",)),
    StageSpec("pseudo_pairs", "sbir.fgsbir.pseudo_pairs:run_pseudo_pairs", ("pseudo_pairs",),
              "Semi-supervised FG-SBIR, step 2: G draws one sketch per unlabelled train photo (inference, no "
              "Ray job). Writes pseudo_pairs.parquet and pairs.png.", shared=("seed",),
              key_metrics=("num_pseudo_pairs", "mean_log_likelihood")),
    StageSpec("fgsbir_joint", "sbir.fgsbir.joint:run_fgsbir_joint",
              ("fgsbir_joint", "distill.student", "sketch_generator.rdp_epsilon", "pseudo_pairs.line_width"),
              "Semi-supervised FG-SBIR, step 3: the retrieval model F in three variants (supervised-only, "
              "semi-supervised with discriminator-weighted pseudo pairs, consistency and REINFORCE updates of "
              "G, fully supervised) in one Ray Train fit. Writes checkpoints/<variant>.pt.",
              trains=True, key_metrics=("semi/final_total", "supervised/final_total")),
    StageSpec("fg_evaluate", "sbir.fgsbir.evaluate:run_fg_evaluate", ("fg_evaluate", "pseudo_pairs.line_width"),
              "Fine-grained evaluation: each test sketch queries the test photos for its own photo; Acc@k, "
              "ranks, rank histogram and retrieval grids per variant.", shared=(),
              key_metrics=("semi/acc@1", "supervised/acc@1", "full/acc@1")),
)

STAGES: dict[str, StageSpec] = {s.name: s for s in _STAGES}
TRAINING_STAGES: list[str] = [s.name for s in _STAGES if s.trains]


def get_stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}") from None


def stages_markdown() -> str:
    """stages/README.md: the registry as a table (``sbir stages --markdown``; a test keeps the file current)."""
    lines = ["# Stages", "",
             "The pipeline's stages are registered in `src/sbir/registry.py` and run by one entry point,",
             "`python -m sbir run <stage>` (what `dvc.yaml` calls; `--help` on each). This table is generated by",
             "`python -m sbir stages --markdown > stages/README.md`; `tests/test_registry.py` checks it is current.", "",
             "| stage | params | Ray Train | what it does | code |", "|---|---|---|---|---|"]
    for s in STAGES.values():
        module, fn = s.target.split(":")
        code = f"`src/{module.replace('.', '/')}.py` `{fn}`" + (f" ({', '.join(f'{k}={v}' for k, v in s.kwargs.items())})"
                                                          if s.kwargs else "")
        lines.append(f"| `{s.name}` | {', '.join(f'`{p}`' for p in s.params)} | {'yes' if s.trains else ''} | "
                     f"{s.summary} | {code} |")
    return "\n".join(lines) + "\n"
