"""Params of the semi-supervised fine-grained SBIR stages (METHOD.md, Part 2).

One pydantic model per ``params.yaml`` section: ``sketch_generator``, ``pseudo_pairs``,
``fgsbir_joint``, ``fg_evaluate``. They are registered as fields of :class:`sbir.config.Root`.

This module deliberately does not import :mod:`sbir.config` (``sbir.config`` imports it to build
``Root``; importing back would be circular). :class:`FGParams` repeats the project's base settings:
unknown keys are errors.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FGParams(BaseModel):
    """Base of the fine-grained sections: unknown keys are errors (same as ``sbir.config.Params``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------- sketch_generator
class GeneratorParams(FGParams):
    """Photo-to-sketch generator G (sketch-rnn VAE with 2-D attention), pretrained on labelled pairs."""

    encoder_channels: list[int] = Field([16, 32, 64], min_length=1,
                                        description="channels of the photo encoder's conv blocks")
    feature_stride: int = Field(4, ge=1, description="encoder down-sampling (power of two): 32 px -> 8x8 attention "
                                                     "map (stride 8 -> 4x4 halves the time per step)")
    encoder_init: Literal["scratch", "photo_teacher", "imagenet"] = Field(
        "photo_teacher", description="G's photo encoder: conv blocks of encoder_channels trained from scratch; the "
                               "layers of teacher_pretrain's photo teacher up to feature_stride (small_cnn: the "
                               "first 1 + log2(feature_stride) blocks; efficientnet_lite0: stem and stages; needs "
                               "that stage), which already tell the classes apart; or imagenet: EfficientNet-Lite0's "
                               "stem and stages with the packaged ImageNet weights (no teacher needed)")
    freeze_encoder: bool = Field(True, description="photo_teacher / imagenet encoder: keep its weights and "
                                                   "BatchNorm statistics fixed")
    global_context: Literal["none", "photo_teacher"] = Field(
        "none", description="photo_teacher: the whole frozen photo teacher's pooled features join the latent's input "
                            "(the early blocks that G attends to tell local shape but hardly the class; the "
                            "teacher's last layer tells which object to draw). Needs the teacher_pretrain stage")
    latent_dim: int = Field(32, ge=1, description="size of the Gaussian latent z")
    decoder_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the decoder's LSTM input and output head "
                                   "in the VAE loss (training only; sampling and REINFORCE's log-likelihood never "
                                   "drop): G overfits the few hundred labelled pairs")
    decoder_hidden: int = Field(128, ge=8, description="LSTM decoder hidden size")
    attention_dim: int = Field(64, ge=4, description="additive attention size")
    num_mixtures: int = Field(10, ge=1, description="M: bivariate Gaussians of the offset mixture")
    max_len: int = Field(48, ge=4, description="stroke-5 rows per sketch incl. the end row (longer sketches "
                                                "are truncated after RDP simplification)")
    rdp_epsilon: float = Field(5.0, ge=0, description="RDP tolerance in stroke units (the data's 256-unit frame); "
                                                      "0 keeps every point")
    kl_weight: float = Field(0.5, ge=0, description="final KL weight")
    kl_weight_start: float = Field(0.01, ge=0, description="KL weight at step 0 (linear anneal)")
    kl_anneal_steps: int = Field(300, ge=0, description="steps of the linear KL anneal")
    kl_floor: float = Field(0.2, ge=0, description="KL is floored at this value (free bits)")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0: off)")
    steps: int = Field(600, ge=1, description="optimiser steps")
    batch_size: int = Field(32, ge=2, description="pairs per step and Ray worker")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, gt=0, le=1, description="cosine decay from lr to lr * min_lr_ratio")
    eval_pairs: int = Field(128, ge=0, description="test pairs whose VAE loss is logged (0: none)")
    log_every: int = Field(100, ge=1, description="steps between reports (each report is a ~1 s barrier)")
    history_every: int = Field(25, ge=1, description="steps between curve points (an all-reduce, no report)")
    preview_temperature: float = Field(0.4, gt=0, description="temperature of the samples.png sketches")
    preview_pen_temperature: float | None = Field(None, gt=0, description="temperature of the pen-state logits alone (null: the offsets' temperature, as sketch-rnn). 1.0 keeps the stop decision calibrated (tempering it makes samples run to max_len) but measured lower semi-supervised accuracy on the embedded default")
    num_preview: int = Field(8, ge=1, description="photos shown in samples.png")


# ----------------------------------------------------------------------------- pseudo_pairs
class PseudoPairsParams(FGParams):
    """G draws one sketch per unlabelled train photo (inference only: no Ray job, see pseudo_pairs.py)."""

    temperature: float = Field(0.4, gt=0, description="sampling temperature (mixture and sigma; pen too "
                                                       "when pen_temperature is null)")
    pen_temperature: float | None = Field(None, gt=0, description="temperature of the pen-state logits alone (null: the offsets' temperature, as sketch-rnn). 1.0 keeps the stop decision calibrated (tempering it makes samples run to max_len) but measured lower semi-supervised accuracy on the embedded default")
    greedy: bool = Field(False, description="most likely mixture mean / pen state instead of sampling")
    candidates: int = Field(1, ge=1, description="sketches G samples per photo; the one the teachers agree on "
                            "most is kept (the photo teacher's class distribution scored by the sketch teacher's "
                            "log-probabilities; no labels). 1: G's single sample. Needs the teacher_pretrain stage")
    batch_size: int = Field(256, ge=1, description="photos decoded at once")
    line_width: float = Field(1.0, gt=0, description="rasterisation line width in output pixels (the "
                                                     "embedded dataset renders real sketches at 1.0)")
    render_size: int | None = Field(None, ge=8, description="rendered size; null = the dataset's sketch size")
    num_preview: int = Field(12, ge=1, description="rows of pairs.png")
    teacher_check: bool = Field(True, description="classify the pseudo sketches (and the real train sketches, "
                                "for reference) with teacher_pretrain's sketch teacher: is G's drawing "
                                "recognisable as its photo's class? Needs the teacher_pretrain stage")

    @model_validator(mode="after")
    def _candidates_need_sampling(self) -> "PseudoPairsParams":
        if self.greedy and self.candidates > 1:
            raise ValueError("pseudo_pairs.candidates > 1 needs sampling: greedy decoding draws the same sketch "
                             "every time (set greedy: false or candidates: 1)")
        return self


# ----------------------------------------------------------------------------- fgsbir_joint
class DiscriminatorParams(FGParams):
    """D: a small CNN on the (sketch, photo) pair; real = labelled pair, fake = generated pair."""

    width: int = Field(32, ge=4, description="channels of the first conv block (doubling)")
    lr: float = Field(1e-3, gt=0)
    steps_per_round: int = Field(1, ge=0, description="D steps per F step")
    warmup_steps: int = Field(200, ge=0, description="D-only steps before the first F step of a semi variant")
    mismatched_fakes: bool = Field(True, description="also show D real sketches with a wrong photo as fakes, "
                                                     "so it judges the pair, not only the drawing style")
    weight_reference: Literal["pseudo", "labelled"] = Field(
        "labelled", description="pseudo-pair weight = D probability / batch mean of D over the pseudo pairs "
                                "(pseudo: mean weight 1) or over the batch's labelled pairs (labelled: pseudo "
                                "pairs D finds as real as labelled ones weigh 1, obvious fakes little)")
    weight_clip: float = Field(2.0, ge=0, description="pseudo-pair weights are clipped at this value")
    augment_shift: int = Field(2, ge=0, description="D's training pairs are shifted by up to this many pixels "
                                                    "(sketch and photo independently), so it cannot memorise the "
                                                    "labelled pairs pixel by pixel; 0: off")


class PolicyGradientParams(FGParams):
    """REINFORCE updates of G, alternating with F/D updates."""

    every: int = Field(4, ge=1, description="one G step per this many F steps")
    batch_size: int = Field(32, ge=2, description="photos per G step and worker")
    lr: float = Field(1e-4, gt=0, description="G learning rate in the joint phase")
    temperature: float = Field(0.4, gt=0, description="sampling temperature (also used by log_prob)")
    pen_temperature: float | None = Field(None, gt=0, description="temperature of the pen-state logits alone (null: the offsets' temperature, as sketch-rnn). 1.0 keeps the stop decision calibrated (tempering it makes samples run to max_len) but measured lower semi-supervised accuracy on the embedded default")
    reward: Literal["neg_triplet", "inverse_rank"] = Field(
        "neg_triplet", description="retrieval reward under F: minus the mean triplet hinge over the batch "
                                   "gallery, or 1/rank of the true photo in the batch gallery")
    discriminator_weight: float = Field(0.1, ge=0, description="lambda of the + lambda * log D reward term")
    baseline: Literal["greedy", "moving_average"] = Field(
        "greedy", description="the reward baseline: self-critical (the reward of G's greedy sketch of the same "
                              "photo: a per-photo baseline, no lag) or a moving average of the batch reward")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="moving-average baseline decay")
    photos: Literal["all", "unlabelled"] = Field(
        "all", description="the photos G draws in its REINFORCE steps: every train photo (the paper: labelled and "
                           "unlabelled) or only the unlabelled ones")
    vae_weight: float = Field(1.0, ge=0, description="supervised VAE loss on labelled pairs, added to each G step")
    refresh_pool: bool = Field(True, description="the sketches G draws replace those photos' pseudo sketches")
    refresh_if_better: bool = Field(False, description="with refresh_pool: a new sketch replaces its photo's pseudo "
                                    "sketch only when the teachers agree on its class more (the score that picks "
                                    "among pseudo_pairs.candidates), so single samples do not overwrite a best-of-K "
                                    "pool. Needs the teacher_pretrain stage")


class FGLossWeights(FGParams):
    labelled_triplet: float = Field(1.0, ge=0, description="triplet loss on labelled pairs")
    pseudo_triplet: float = Field(0.5, ge=0, description="D-weighted triplet loss on pseudo pairs")
    consistency: float = Field(0.1, ge=0, description="KL to the frozen supervised_pretrain model on pseudo pairs "
                                                       "(at 1.0 it held F back to that weaker teacher)")


Variant = Literal["supervised", "semi", "full"]
Ablation = Literal["no_weighting", "no_consistency", "no_policy_gradient", "no_pseudo_triplet", "oracle_sketches"]


class FGJointParams(FGParams):
    """Fine-grained retrieval model F (photo + sketch encoder) in three variants, one Ray fit.

    Every reported model trains ``supervised_steps`` steps at ``lr`` then ``joint_steps`` at
    ``joint_lr`` (equal budgets, so semi vs supervised measures the unlabelled data, not more steps):

    * ``supervised``: triplet on the labelled pairs; its first phase (``supervised_pretrain``) is the
      frozen teacher of the consistency loss and the starting point of ``semi``;
    * ``semi``: labelled triplet + D-weighted pseudo-pair triplet + consistency, with REINFORCE
      updates of G, for ``joint_steps`` steps from ``supervised_pretrain``;
    * ``full``: the upper bound, triplet on every train sketch with a photo_id.

    ``ablations`` add variants of ``semi`` with one part switched off (``no_weighting``: uniform
    pseudo-pair weights; ``no_consistency``; ``no_policy_gradient``: G frozen, pool fixed;
    ``no_pseudo_triplet``) and ``oracle_sketches``: semi with the unlabelled photos' *real* sketches
    as the pseudo pool and no G (a diagnostic: the ceiling of a perfect generator; needs sketches of
    unlabelled photos that keep their photo_id).
    """

    init: Literal["data_free", "scratch"] = Field(
        "data_free", description="data_free: both encoders start from the distilled students; scratch: "
                                 "random init with the same architecture (distill.student)")
    students_path: str | None = Field(None, description="students checkpoint; null = <outputs_dir>/distill/students.pt")
    image_size: int | None = Field(None, ge=8, description="F's input size (photos and sketches are resized); null = "
                                                          "the dataset's photo size. With init data_free use the size "
                                                          "the students were distilled at (teacher_pretrain.image_size)")
    variants: list[Variant] = Field(["supervised", "semi", "full"], min_length=1)
    ablations: list[Ablation] = Field([], description="extra semi variants with one part off (see the class doc)")
    supervised_steps: int = Field(100, ge=1, description="first phase (at lr) of every variant: *_pretrain")
    joint_steps: int = Field(100, ge=1, description="second phase (at joint_lr): supervised and full continue, semi starts from supervised_pretrain")
    batch_size: int = Field(32, ge=2, description="labelled anchors per F step and Ray worker (each worker's "
                                                   "batch is its own in-batch gallery)")
    pseudo_batch_size: int = Field(32, ge=2, description="pseudo-pair anchors per F step and worker")
    lr: float = Field(1e-3, gt=0, description="F learning rate of the first phase")
    joint_lr: float = Field(3e-4, gt=0, description="F learning rate of the second phase (all variants)")
    weight_decay: float = Field(5e-4, ge=0)
    margin: float = Field(0.2, ge=0, description="triplet margin on squared L2 distance of unit embeddings")
    negatives: Literal["in_batch", "sampled"] = Field(
        "in_batch", description="in_batch: every other photo of the batch is a negative (batch-all mean over "
                                "violating ones); sampled: only the one sampled negative per anchor")
    same_class_negative_prob: float = Field(0.5, ge=0, le=1, description="share of negatives drawn from the "
                                                                         "anchor's class (hard-ish)")
    augment_shift: int = Field(2, ge=0, description="random shift (pad + crop) in pixels, sketches and photos "
                                                    "independently; 0 = off")
    consistency_temperature: float = Field(0.1, gt=0, description="tau of the similarity softmax (cosine / tau)")
    weights: FGLossWeights = FGLossWeights()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    policy_gradient: PolicyGradientParams = PolicyGradientParams()
    log_every: int = Field(100, ge=1, description="steps between reports (each a ~1 s barrier)")
    history_every: int = Field(20, ge=1, description="steps between curve points (an all-reduce, no report)")

    @model_validator(mode="after")
    def _semi_needs_supervised(self) -> "FGJointParams":
        if ("semi" in self.variants or self.ablations) and "supervised" not in self.variants:
            raise ValueError("variants: 'semi' and the ablations start from (and distil) the 'supervised' "
                             "model, so 'supervised' must be listed too")
        return self


# ----------------------------------------------------------------------------- fg_evaluate
class FGEvaluateParams(FGParams):
    ks: list[int] = Field([1, 5, 10], min_length=1, description="Acc@K levels")
    batch_size: int = Field(256, ge=1)
    num_retrieval_examples: int = Field(8, ge=1, description="queries in the top-k retrieval grid")
    top_k_shown: int = Field(5, ge=1, description="retrievals per query in the grid")
    max_rank_shown: int = Field(50, ge=1, description="rank histogram: ranks above go to one bin")
    generated_queries: bool = Field(True, description="also query with G's sketch of every test photo (the "
                                    "sketch_generator's G, and semi's G after policy gradient when it exists): "
                                    "does a generated sketch retrieve its own photo? (ranked by each F)")
    generated_temperature: float = Field(0.4, gt=0, description="sampling temperature of those sketches")
