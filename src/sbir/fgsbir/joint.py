"""fgsbir_joint: the fine-grained retrieval model F in three variants, one Ray Train fit.

F is an :class:`~sbir.models.backbones.EncoderPair` (photo encoder + sketch encoder, L2-normalised
embeddings), initialised from the distilled data-free students (``init: data_free``) or at random
with the same architecture (``init: scratch``). Triplet loss: sketch anchor, its photo positive, a
negative photo drawn from the anchor's class with probability ``same_class_negative_prob`` (hard-ish)
and uniformly otherwise; squared L2 distance of unit vectors, margin ``margin``. With ``negatives:
in_batch`` (default) every other photo of the batch (the other positives and all sampled negatives)
is a negative too, averaged over the violating ones (batch-all): on the embedded data it learns in
300 steps what the single sampled negative reaches in more than 600.

Variants, run one after the other inside the same loop (one Ray start-up for all). Every reported
model gets the same budget: ``supervised_steps`` steps at ``lr`` (a ``*_pretrain`` model), then
``joint_steps`` steps at ``joint_lr``:

1. ``supervised``: triplet on the labelled pairs, negatives among all train photos (the unlabelled
   photos are there for every variant: only ``semi`` pairs them with sketches);
   ``supervised_pretrain`` (its first phase) is the frozen teacher of the consistency loss and the
   starting point of ``semi``.
2. ``full`` (upper bound): triplet on every train sketch with a photo_id, negatives among all photos.
3. ``semi`` (ours), from ``supervised_pretrain``, alternating
   * D steps: D scores (sketch, photo); real = a labelled pair, fake = a pseudo pair (and, with
     ``mismatched_fakes``, a real sketch with a wrong photo);
   * F steps: labelled triplet + pseudo-pair triplet weighted by D's probability normalised over
     the batch (mean 1, clipped at ``weight_clip``) + consistency: KL(teacher || student) of the
     sketch-to-photo similarity softmax (cosine / tau) over the batch's pseudo-pair gallery, the
     teacher being the frozen ``supervised_pretrain`` model;
   * every ``policy_gradient.every`` F steps a G step: G draws sketches for a batch of train photos
     (labelled and unlabelled, as the paper; ``policy_gradient.photos``), they are rasterised (the
     same rasteriser as the data), and G is updated by REINFORCE with reward = retrieval reward
     under F + lambda * log D, minus a baseline: self-critical (the reward of G's greedy sketch of
     the same photo) or a moving average, plus the supervised VAE loss on labelled pairs; the new
     sketches of unlabelled photos replace their pseudo sketches in the pool (each worker refreshes
     its own copy of the pool).
4. ``ablations``: semi with one part switched off, and ``oracle_sketches``: semi whose pseudo pool
   holds the unlabelled photos' *real* sketches (no G): what the rest of the method makes of perfect
   pseudo sketches, i.e. the ceiling a better generator could reach.

Checkpoints: every report carries the finished variants' models and the running variant's full
state, so a restarted worker resumes inside the running variant.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from sbir.config import StudentParams
from sbir.data.datasets import fine_grained_pairs, load_image_set
from sbir.data.format import open_dataset
from sbir.fgsbir.generator_train import IntervalMeans, StrokeBank, paired_strokes, photo_input, render_sketches
from sbir.fgsbir.losses import (consistency_loss, discriminator_loss, discriminator_weights, retrieval_reward,
                                sample_negatives, triplet_loss)
from sbir.fgsbir.params import FGJointParams
from sbir.fgsbir.pseudo_pairs import class_agreement
from sbir.models.backbones import EncoderPair, channel_stats, channels_last, resize, to_float
from sbir.models.checkpoints import (build_retrieval_model, checkpoint_path, load_generator, load_students,
                                     load_teachers)
from sbir.models.sketch_generator import MovingAverageBaseline, reinforce_loss
from sbir.train import runtime as rt
from sbir.train.precision import LoopDevice


# ----------------------------------------------------------------------------- augmentation
def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (replicate-pad and crop), per image. No flips: a flip of
    one side of a fine-grained pair changes which instance it shows."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows.to(x.device))
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols.to(x.device))


# ----------------------------------------------------------------------------- the discriminator
class PairDiscriminator(nn.Module):
    """D(sketch, photo) -> logit (real labelled pair vs generated / mismatched pair).

    Input: the sketch's ink (1 channel) stacked on the photo (3 channels), both in [-1, 1]; three
    stride-2 conv blocks, global average pool, linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 4
        for i in range(3):
            c = width * 2 ** i
            layers += [nn.Conv2d(c_in, c, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.features = channels_last(nn.Sequential(*layers))
        self.head = nn.Linear(c_in, 1)

    def forward(self, sketches: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
        """sketches float (B,1 or 3,H,W) in [0,1] (white paper = 1), photos float (B,3,H',W') -> (B,) logits."""
        ink = 1.0 - sketches[:, :1]
        if ink.shape[-1] != photos.shape[-1]:
            ink = resize(ink, photos.shape[-1])
        x = torch.cat([ink, photos], dim=1) * 2 - 1
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)).squeeze(1)


# ----------------------------------------------------------------------------- F at step 0
def initial_model(init: str, photos_u8: torch.Tensor, sketches_u8: torch.Tensor, *, image_size: int | None = None,
                  students_path: str | Path | None = None, student: StudentParams | None = None
                  ) -> tuple[EncoderPair, dict[str, Any]]:
    """F at step 0: the distilled students at ``students_path`` (``init`` data_free) or a random init of
    the ``student`` architecture (scratch). ``arch['image_size']``: the size F's inputs are resized to
    (``image_size``, default the dataset's photo size)."""
    size = int(image_size or photos_u8.shape[-1])
    if init == "data_free":
        students, blob = load_students(students_path)
        sp = blob["params"]["student"]
        arch = {"backbone": sp["backbone"], "embed_dim": sp["embed_dim"], "head": sp.get("head", "linear"),
                "image_size": size}
        return students.train(), arch
    arch = {"backbone": student.backbone.model_dump(mode="json"), "embed_dim": student.embed_dim,
            "head": student.head, "image_size": size}
    model = build_retrieval_model(arch)
    model.photo_encoder.normalise.set_stats(*channel_stats(photos_u8))
    model.sketch_encoder.normalise.set_stats(*channel_stats(sketches_u8.expand(-1, 3, -1, -1)))
    return model, arch


# ----------------------------------------------------------------------------- the joint loop
@dataclass
class VariantSpec:
    name: str
    kind: str  # "supervised" | "full" | "semi"
    start_from: str | None  # a finished variant's model, or None for the initial model
    steps: int
    weighting: bool = True
    consistency: bool = True
    policy_gradient: bool = True
    pseudo_triplet: bool = True
    oracle: bool = False  # pseudo pool = the unlabelled photos' real sketches (a diagnostic, no G)


def variant_specs(p: FGJointParams) -> list[VariantSpec]:
    """The runs of one fit, in order. Every reported model gets the same step budget
    (``supervised_steps`` at ``lr``, then ``joint_steps`` at ``joint_lr``): ``supervised`` and ``full``
    continue their own ``*_pretrain`` model on their own pairs, ``semi`` (and its ablations) continue
    ``supervised_pretrain`` with the unlabelled photos. So semi vs supervised measures the unlabelled
    data, not extra training steps."""
    specs: list[VariantSpec] = []
    if "supervised" in p.variants:
        specs += [VariantSpec("supervised_pretrain", "supervised", None, p.supervised_steps),
                  VariantSpec("supervised", "supervised", "supervised_pretrain", p.joint_steps)]
    if "full" in p.variants:
        specs += [VariantSpec("full_pretrain", "full", None, p.supervised_steps),
                  VariantSpec("full", "full", "full_pretrain", p.joint_steps)]
    if "semi" in p.variants:
        specs.append(VariantSpec("semi", "semi", "supervised_pretrain", p.joint_steps))
    flags = {"no_weighting": "weighting", "no_consistency": "consistency",
             "no_policy_gradient": "policy_gradient", "no_pseudo_triplet": "pseudo_triplet"}
    for a in p.ablations:
        if a == "oracle_sketches":
            specs.append(VariantSpec(f"semi_{a}", "semi", "supervised_pretrain", p.joint_steps, policy_gradient=False,
                                     oracle=True))
        else:
            specs.append(VariantSpec(f"semi_{a}", "semi", "supervised_pretrain", p.joint_steps, **{flags[a]: False}))
    return specs


class JointData:
    """The train photos and sketches, the pair indices and the pseudo-pair pool, on every worker."""

    def __init__(self, dataset_dir: str, pseudo_path: str | None = None, workers: int = 0) -> None:
        from sbir.fgsbir.pseudo_pairs import read_pseudo_pairs

        ds = open_dataset(dataset_dir)
        self.photos = load_image_set(ds, "photos", ["train"], workers=workers)
        self.sketches = load_image_set(ds, "sketches", ["train"], workers=workers)
        self.lab_s, self.lab_p = fine_grained_pairs(self.sketches, self.photos, labelled_only=True)
        self.all_s, self.all_p = fine_grained_pairs(self.sketches, self.photos, labelled_only=False)
        if len(self.lab_s) == 0:
            raise ValueError(f"{ds.root}: no labelled train pair")
        self.labels = self.photos.labels
        self.all_photos = torch.arange(len(self.photos))
        self.sketch_size = int(self.sketches.images.shape[-1])
        self.pool_rows = torch.zeros(0, dtype=torch.long)
        self.pool_images = torch.zeros((0, 1, self.sketch_size, self.sketch_size), dtype=torch.uint8)
        if pseudo_path:
            pseudo = read_pseudo_pairs(pseudo_path)
            row = {pid: i for i, pid in enumerate(self.photos.ids)}
            keep = [i for i, pid in enumerate(pseudo["photo_ids"]) if pid in row]
            self.pool_rows = torch.tensor([row[pseudo["photo_ids"][i]] for i in keep], dtype=torch.long)
            self.pool_images = pseudo["images"][keep].clone()
            self.pool_ids = [pseudo["photo_ids"][i] for i in keep]
            self.pool_loglik = pseudo["log_likelihood"][keep]

    def oracle_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(photo rows, sketch images): one real sketch per unlabelled photo (needs sketches that keep
        their photo_id), the pseudo pool of ``oracle_sketches``."""
        unl = ~self.photos.labelled[self.all_p]
        first: dict[int, int] = {}
        for s_row, p_row in zip(self.all_s[unl].tolist(), self.all_p[unl].tolist()):
            first.setdefault(p_row, s_row)
        if not first:
            raise ValueError("oracle_sketches needs sketches of unlabelled train photos with their photo_id")
        return (torch.tensor(list(first), dtype=torch.long),
                self.sketches.images[torch.tensor(list(first.values()), dtype=torch.long)].clone())


def _draw(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices in [0, n) (with repeats only when k > n)."""
    if k <= n:
        return torch.randperm(n, generator=gen)[:k]
    return torch.randint(0, n, (k,), generator=gen)


def _f(x_u8: torch.Tensor, shift: int, gen: torch.Generator | None, dev: LoopDevice,
       size: int | None = None) -> torch.Tensor:
    """uint8 images -> float [0,1], 3 channels, resized to ``size``, randomly shifted when ``gen`` is given,
    on ``dev``'s device."""
    x = to_float(x_u8)
    if size is not None:
        x = resize(x, size)
    if gen is not None and shift > 0:
        x = random_shift(x, shift, gen)
    return dev.to(x)


class VariantRun:
    """One variant's models, optimisers and step, with a state dict for checkpoints."""

    def __init__(self, spec: VariantSpec, p: FGJointParams, model: EncoderPair, data: JointData, config: dict,
                 device, image_size: int) -> None:
        self.spec, self.p, self.data, self.device, self.size = spec, p, data, device, image_size
        self.dev = LoopDevice.from_config(config, device)  # the loop autocasts the steps (train_variant)
        self.line_width = float(config.get("line_width", 1.0))  # as pseudo_pairs renders
        self.model = model.to(device).train()
        lr = p.joint_lr if spec.start_from is not None else p.lr
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=p.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.teacher = self.disc = self.gen = self.baseline = self.opt_d = self.opt_g = None
        self.teachers = self.pool_agreement = None  # class teachers and their pool scores (refresh_if_better)
        self.pool, self.pool_rows = data.pool_images.clone(), data.pool_rows
        if spec.oracle:
            self.pool_rows, self.pool = data.oracle_pool()
        if spec.kind == "semi":
            if len(self.pool_rows) == 0:
                raise ValueError("the semi variant needs pseudo pairs (run the pseudo_pairs stage)")
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.disc = PairDiscriminator(p.discriminator.width).to(device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=p.discriminator.lr, betas=(0.5, 0.999))
            if spec.policy_gradient:
                self._init_generator(config)

    def _init_generator(self, config: dict) -> None:
        """G (from the sketch_generator stage), its optimiser and baseline, and the labelled pairs of its
        supervised VAE loss."""
        self.gen, _ = load_generator(config["generator_path"], self.device)
        self.gen.train()
        self.opt_g = torch.optim.Adam([w for w in self.gen.parameters() if w.requires_grad], lr=self.p.policy_gradient.lr)
        self.baseline = MovingAverageBaseline(self.p.policy_gradient.baseline_decay)
        sk = load_image_set(open_dataset(config["dataset_dir"]), "sketches", ["train"], with_strokes=True,
                            workers=self.dev.decode_workers)
        self.vae_photo_rows, strokes = paired_strokes(sk, self.data.lab_s, self.data.lab_p, config["rdp_epsilon"])
        self.vae_bank = StrokeBank(strokes, self.gen.config.max_len)
        pg = self.p.policy_gradient
        if pg.refresh_pool and pg.refresh_if_better:
            self.teachers = load_teachers(config["teachers_path"])
            self.pool_agreement = class_agreement(*self.teachers, self.data.photos.images[self.pool_rows], self.pool)

    # -- checkpoint
    def _checkpointed(self) -> dict[str, Any]:
        """The objects with a state dict, by checkpoint key (D's side and G's side only when they exist)."""
        out: dict[str, Any] = {"model": self.model, "optimizer": self.opt}
        if self.disc is not None:
            out.update(disc=self.disc, opt_d=self.opt_d, teacher=self.teacher)
        if self.gen is not None:
            out.update(gen=self.gen, opt_g=self.opt_g, baseline=self.baseline)
        return out

    def state_dict(self) -> dict[str, Any]:
        out = {k: v.state_dict() for k, v in self._checkpointed().items()}
        out.update(step=self.step, history=self.history)
        if self.disc is not None:
            out["pool"] = self.pool
        if self.pool_agreement is not None:
            out["pool_agreement"] = self.pool_agreement
        return out

    def load_state_dict(self, s: dict[str, Any]) -> None:
        for k, v in self._checkpointed().items():
            v.load_state_dict(s[k])
        self.step, self.history = s["step"], s["history"]
        if self.disc is not None:
            self.pool = s["pool"]
        if self.pool_agreement is not None:
            self.pool_agreement = s["pool_agreement"]

    def finished(self) -> dict[str, Any]:
        """What a finished variant keeps in the checkpoints: F, its curve, and the semi variants' D and G."""
        out = {"model": self.model.state_dict(), "history": self.history, "steps": self.spec.steps,
               "kind": self.spec.kind, "start_from": self.spec.start_from}
        if self.disc is not None:
            out["disc"] = self.disc.state_dict()
        if self.gen is not None:
            out["gen"] = self.gen.state_dict()
        return out

    def broadcast(self) -> None:
        for m in (self.model, self.disc, self.gen):
            if m is not None:
                rt.broadcast_module(m)

    # -- steps
    def triplet_batch(self, s_images: torch.Tensor, p_rows: torch.Tensor, neg_pool: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Sketch embeddings (B), the gallery embeddings (the B positives, then one sampled negative per
        anchor), the repeat mask (B, 2B) and the float inputs (sketches, gallery photos)."""
        d, p = self.data, self.p
        n_rows = sample_negatives(p_rows, d.labels, neg_pool, p.same_class_negative_prob, gen)
        g_rows = torch.cat([p_rows, n_rows])
        same = (p_rows.unsqueeze(1) == g_rows.unsqueeze(0)).to(self.device)
        xs = _f(s_images, p.augment_shift, gen, self.dev, self.size)
        xg = _f(d.photos.images[g_rows], p.augment_shift, gen, self.dev, self.size)
        return self.model.sketch_encoder(xs), self.model.photo_encoder(xg), same, xs, xg

    def d_logits(self, sketches_u8: torch.Tensor, photos_u8: torch.Tensor,
                 gen: torch.Generator | None = None) -> torch.Tensor:
        """D on (sketch, photo) pairs at native size; shifted by up to ``discriminator.augment_shift``
        pixels when ``gen`` is given (D's own training steps), never when D weighs or rewards."""
        shift = self.p.discriminator.augment_shift
        return self.disc(_f(sketches_u8, shift, gen, self.dev), _f(photos_u8, shift, gen, self.dev))

    def f_step(self, gen: torch.Generator, b_lab: int, b_pse: int) -> dict[str, float]:
        """One F step (after D's steps in a semi variant): labelled triplet [+ pseudo triplet + consistency]."""
        d, p, spec = self.data, self.p, self.spec
        # one negative pool (all train photos) for every variant, so they differ only in their positives
        neg_pool = d.all_photos
        pairs_s, pairs_p = (d.all_s, d.all_p) if spec.kind == "full" else (d.lab_s, d.lab_p)
        li = _draw(len(pairs_s), b_lab, gen)
        s_rows, p_rows = pairs_s[li], pairs_p[li]
        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        if spec.kind == "semi":
            ui = _draw(len(self.pool_rows), b_pse, gen)
            pu = self.pool_rows[ui]
            su_img = self.pool[ui]
            stats.update(self.d_step(s_rows, p_rows, su_img, pu, neg_pool, gen))
        e_s, e_g, same, _, _ = self.triplet_batch(d.sketches.images[s_rows], p_rows, neg_pool, gen)
        terms["labelled_triplet"] = triplet_loss(e_s, e_g, p.margin, negatives=p.negatives, same=same)
        total = p.weights.labelled_triplet * terms["labelled_triplet"]
        if spec.kind == "semi":
            total = self.pseudo_terms(total, terms, stats, s_rows, p_rows, su_img, pu, gen)
        terms["total"] = total
        rt.check_finite(terms, self.step, f"fgsbir_joint/{spec.name}")
        self.dev.step(self.opt, total, self.model)
        return {**{k: float(v.detach()) for k, v in terms.items()}, **stats}

    def pseudo_terms(self, total: torch.Tensor, terms: dict[str, torch.Tensor], stats: dict[str, float],
                     s_rows, p_rows, su_img, pu, gen: torch.Generator) -> torch.Tensor:
        """The semi terms on the pseudo pairs (su_img, pu) added to ``total`` (and ``terms``): the
        D-weighted triplet and the consistency with the frozen teacher."""
        d, p, spec = self.data, self.p, self.spec
        u_s, u_g, u_same, xs_u, xg_u = self.triplet_batch(su_img, pu, d.all_photos, gen)
        if spec.pseudo_triplet:
            w = self.pseudo_weights(s_rows, p_rows, su_img, pu, stats) if spec.weighting else None
            terms["pseudo_triplet"] = triplet_loss(u_s, u_g, p.margin, w, negatives=p.negatives, same=u_same)
            total = total + p.weights.pseudo_triplet * terms["pseudo_triplet"]
        if spec.consistency:
            with torch.no_grad():
                t_s, t_g = self.teacher.sketch_encoder(xs_u), self.teacher.photo_encoder(xg_u)
            terms["consistency"] = consistency_loss(u_s, u_g, t_s, t_g, p.consistency_temperature)
            total = total + p.weights.consistency * terms["consistency"]
        return total

    @torch.no_grad()
    def pseudo_weights(self, s_rows, p_rows, su_img, pu, stats: dict[str, float]) -> torch.Tensor:
        """D's instance weights of the pseudo pairs (reference: the batch's labelled pairs or the pseudo
        pairs themselves, ``discriminator.weight_reference``); their mean and max go to ``stats``."""
        d, dp = self.data, self.p.discriminator
        logits = self.d_logits(su_img, d.photos.images[pu])
        ref = None
        if dp.weight_reference == "labelled":
            ref = self.d_logits(d.sketches.images[s_rows], d.photos.images[p_rows])
        w = discriminator_weights(logits, dp.weight_clip, ref)
        stats["weight_mean"] = float(w.mean())
        stats["weight_max"] = float(w.max())
        return w

    def d_warmup(self, gen: torch.Generator, b_lab: int, b_pse: int) -> dict[str, float]:
        """``discriminator.warmup_steps`` D-only steps before the first F step (D steps are cheap; an
        untrained D would weight the first pseudo pairs at random)."""
        d = self.data
        out: dict[str, float] = {}
        for _ in range(self.p.discriminator.warmup_steps):
            li = _draw(len(d.lab_s), b_lab, gen)
            ui = _draw(len(self.pool_rows), b_pse, gen)
            out = self.d_step(d.lab_s[li], d.lab_p[li], self.pool[ui], self.pool_rows[ui], d.all_photos, gen)
        return out

    def d_step(self, s_rows, p_rows, su_img, pu, neg_pool, gen) -> dict[str, float]:
        """D steps: real labelled pairs vs pseudo pairs (and mismatched real pairs)."""
        d, p = self.data, self.p
        out = {}
        for _ in range(p.discriminator.steps_per_round):
            real = self.d_logits(d.sketches.images[s_rows], d.photos.images[p_rows], gen)
            fake = self.d_logits(su_img, d.photos.images[pu], gen)
            mis = None
            if p.discriminator.mismatched_fakes:
                wrong = sample_negatives(p_rows, d.labels, neg_pool, p.same_class_negative_prob, gen)
                mis = self.d_logits(d.sketches.images[s_rows], d.photos.images[wrong], gen)
            loss = discriminator_loss(real, fake, mis)
            rt.check_finite({"discriminator": loss}, self.step, f"fgsbir_joint/{self.spec.name}")
            self.dev.step(self.opt_d, loss, self.disc)
            out = {"discriminator": float(loss.detach()), "d_real": float(torch.sigmoid(real.detach()).mean()),
                   "d_fake": float(torch.sigmoid(fake.detach()).mean())}
        return out

    def g_photo_rows(self, gen: torch.Generator, b_gen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The photo rows G draws in a REINFORCE step (``policy_gradient.photos``: all train photos, as the
        paper, or the unlabelled ones) and, for each, its slot in the pseudo pool (-1: not in the pool)."""
        if self.p.policy_gradient.photos == "unlabelled":
            ui = _draw(len(self.pool_rows), b_gen, gen)
            return self.pool_rows[ui], ui
        rows = _draw(len(self.data.photos), b_gen, gen)
        slot = torch.full((len(self.data.photos),), -1, dtype=torch.long)
        slot[self.pool_rows] = torch.arange(len(self.pool_rows))
        return rows, slot[rows]

    def g_step(self, gen: torch.Generator, b_gen: int) -> dict[str, float]:
        """REINFORCE step of G (reward under F and D, minus the self-critical or moving-average baseline)
        + the supervised VAE loss on labelled pairs."""
        pg = self.p.policy_gradient
        pu, slots = self.g_photo_rows(gen, b_gen)
        photos_g = self.dev.to(photo_input(self.data.photos.images[pu]))
        s5, lengths, strokes, imgs, reward, parts = self.sample_and_score(photos_g, pu, gen)
        r_mean = rt.mean_over_workers({"r": float(reward.mean())})["r"]
        if pg.baseline == "greedy":  # self-critical: what G's most likely sketch of the same photo earns
            b: float | torch.Tensor = self.sample_and_score(photos_g, pu, gen, greedy=True)[4]
        else:
            if self.baseline.state_dict()["value"] is None:  # starts at the first batch's mean reward
                self.baseline.update(r_mean)
            b = self.baseline.value
            self.baseline.update(r_mean)
        t_max = int(lengths.max())
        log_p = self.gen.log_prob(photos_g, s5[:, :t_max], lengths, temperature=pg.temperature,
                                  pen_temperature=pg.pen_temperature)
        loss_pg = reinforce_loss(log_p, reward, b)
        vae = self.vae_loss(gen, b_gen)
        total = loss_pg + pg.vae_weight * vae
        rt.check_finite({"policy_gradient": loss_pg, "vae": vae}, self.step, f"fgsbir_joint/{self.spec.name}")
        self.dev.step(self.opt_g, total, self.gen, clip=self.gen.clip_gradients)
        accepted = self.refresh_pool(slots, pu, imgs) if pg.refresh_pool else 0.0
        return {"g_pool_refreshed": accepted, "g_reward": float(reward.mean()),
                "g_reward_retrieval": float(parts[0].mean()),
                "g_log_d": float(parts[1].mean()), "g_baseline": float(torch.as_tensor(b).float().mean()),
                "g_vae": float(vae.detach()), "g_points": float(np.mean([len(s) for s in strokes]))}

    @torch.no_grad()
    def refresh_pool(self, slots: torch.Tensor, photo_rows: torch.Tensor, imgs: torch.Tensor) -> float:
        """G's new sketches replace their photos' pseudo sketches (``refresh_if_better``: only where the
        teachers agree on the new one more); returns the share of the batch's pool photos replaced."""
        in_pool = slots >= 0
        slots, photo_rows, imgs = slots[in_pool], photo_rows[in_pool], imgs[in_pool]
        if not len(slots):
            return 0.0
        if self.pool_agreement is not None:
            score = class_agreement(*self.teachers, self.data.photos.images[photo_rows], imgs)
            better = score > self.pool_agreement[slots]
            self.pool_agreement[slots[better]] = score[better]
            slots, imgs = slots[better], imgs[better]
        self.pool[slots] = imgs
        return len(slots) / float(in_pool.sum())

    @torch.no_grad()
    def sample_and_score(self, photos_g: torch.Tensor, pu: torch.Tensor, gen: torch.Generator,
                         greedy: bool = False) -> tuple:
        """G draws a sketch per photo (rows ``pu``); (stroke-5, lengths, stroke-3, rendered images, the
        reward = retrieval reward under the current F + lambda * log D of the pair, (the two terms))."""
        d, p, pg = self.data, self.p, self.p.policy_gradient
        s5, lengths, _ = self.gen.sample(photos_g, temperature=pg.temperature, generator=None, greedy=greedy,
                                         pen_temperature=pg.pen_temperature)
        strokes = self.gen.to_stroke3(s5, lengths)
        imgs = render_sketches(strokes, d.sketch_size, self.line_width)
        # reward under the current F, gallery = this batch's photos + same-class-ish negatives
        self.model.eval()
        negs = sample_negatives(pu, d.labels, d.all_photos, p.same_class_negative_prob, gen)
        e_s = self.model.sketch_encoder(_f(imgs, 0, None, self.dev, self.size))
        e_p = self.model.photo_encoder(_f(d.photos.images[torch.cat([pu, negs])], 0, None, self.dev, self.size))
        self.model.train()
        g_rows = torch.cat([pu, negs])
        r_ret = retrieval_reward(e_s, e_p, pg.reward, p.margin, same=(pu.unsqueeze(1) == g_rows.unsqueeze(0)).to(self.device))
        log_d = F.logsigmoid(self.d_logits(imgs, d.photos.images[pu]).float())  # a reward term: fp32
        return s5, lengths, strokes, imgs, r_ret + pg.discriminator_weight * log_d, (r_ret, log_d)

    def vae_loss(self, gen: torch.Generator, b_gen: int) -> torch.Tensor:
        """G's supervised VAE loss (final KL weight) on a random batch of labelled pairs."""
        vi = torch.randint(0, len(self.vae_bank), (b_gen,), generator=gen)
        x, lens = self.vae_bank.batch(vi)
        photos = self.dev.to(photo_input(self.data.photos.images[self.vae_photo_rows[vi]]))
        return self.gen.loss(photos, self.dev.to(x), self.dev.to(lens), step=None)["total"]


def start_variant(spec: VariantSpec, p: FGJointParams, init_model: EncoderPair, arch: dict[str, Any],
                  done: dict[str, dict[str, Any]], current: dict[str, Any] | None, data: JointData, config: dict,
                  device) -> VariantRun:
    """A variant's run from the initial model or a finished variant's F, continued from ``current`` (the
    checkpoint's running variant) when that is this one."""
    start_model = copy.deepcopy(init_model) if spec.start_from is None else build_retrieval_model(arch)
    if spec.start_from is not None:
        start_model.load_state_dict(done[spec.start_from]["model"])
    vr = VariantRun(spec, p, start_model, data, config, device, int(arch["image_size"]))
    if current is not None and current["name"] == spec.name:
        vr.load_state_dict(current["state"])
    vr.broadcast()
    return vr


def joint_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    p: FGJointParams = config["params"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    workers = LoopDevice.from_config(config, device).decode_workers
    data = JointData(config["dataset_dir"], config.get("pseudo_path"), workers)
    init_model, arch = initial_model(p.init, data.photos.images, data.sketches.images, image_size=p.image_size,
                                     students_path=config.get("students_path"), student=config["student"])
    state = rt.restore()
    done, current = (state["done"], state.get("current")) if state is not None else ({}, None)
    fixed = {"arch": arch, "params": p.model_dump(mode="json"), "init": p.init, "num_labelled_pairs": len(data.lab_s),
             "num_all_pairs": len(data.all_s), "num_pseudo_pairs": len(data.pool_rows)}
    for vi, spec in enumerate(variant_specs(p)):
        if spec.name in done:
            continue
        torch.manual_seed(seed * 1009 + vi)
        vr = start_variant(spec, p, init_model, arch, done, current, data, config, device)
        current = None
        gen = torch.Generator().manual_seed(seed * 7919 + 131 * vi + 17 * rt.world()[0] + vr.step)
        if vr.disc is not None and vr.step == 0:
            with vr.dev.autocast():
                warm = vr.d_warmup(gen, p.batch_size, p.pseudo_batch_size)
            if warm and rt.is_rank0():
                print(f"[fgsbir_joint] {spec.name}: D after {p.discriminator.warmup_steps} warm-up steps: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in warm.items()), flush=True)
        train_variant(vr, vi, gen, done, fixed)


def train_variant(vr: VariantRun, vi: int, gen: torch.Generator, done: dict[str, dict[str, Any]],
                  fixed: dict[str, Any]) -> None:
    """The steps of one variant from ``vr.step``; each report checkpoints the finished variants (``done``)
    and this one's full state. Batch sizes are per worker (as in the other stages): the in-batch
    negatives of a worker's batch do not shrink when workers are added."""
    p, spec = vr.p, vr.spec
    interval = IntervalMeans()
    for step in rt.progress(range(vr.step, spec.steps), total=spec.steps - vr.step, desc=f"fgsbir {spec.name}"):
        vr.step = step
        with vr.dev.autocast():  # forward passes and losses; the backward passes run outside (LoopDevice.step)
            out = vr.f_step(gen, p.batch_size, p.pseudo_batch_size)
            if vr.gen is not None and step % p.policy_gradient.every == 0:
                out.update(vr.g_step(gen, p.policy_gradient.batch_size))
        interval.add(out)
        last = step + 1 == spec.steps
        if (step + 1) % p.history_every == 0 or last:  # a curve point: an all-reduce, no checkpoint
            metrics = rt.mean_over_workers(interval.means())
            metrics.update(step=step, seconds_per_step=interval.seconds_per_step())
            vr.history.append(metrics)
            interval.reset()
        if ((step + 1) % p.log_every == 0 and vr.history) or last:  # a report: a barrier + a checkpoint
            vr.step = step + 1
            if last:
                done[spec.name] = vr.finished()
            rt.report({"variant": vi, **{f"{spec.name}/{k}": v for k, v in vr.history[-1].items()}},
                      {"done": done, "current": None if last else {"name": spec.name, "state": vr.state_dict()},
                       **fixed})


# ----------------------------------------------------------------------------- the stage body
@torch.no_grad()
def score_pseudo_pairs(disc: PairDiscriminator, data: JointData, batch: int = 512) -> torch.Tensor:
    disc.eval()
    out = []
    for i in range(0, len(data.pool_rows), batch):
        rows = data.pool_rows[i : i + batch]
        out.append(torch.sigmoid(disc(to_float(data.pool_images[i : i + batch]), to_float(data.photos.images[rows]))))
    return torch.cat(out) if out else torch.zeros(0)


def run_fgsbir_joint(ctx) -> dict[str, Any]:
    """Stage body: F's variants in one Ray fit; checkpoints/<variant>.pt, curves, D's pseudo-pair scores."""
    p: FGJointParams = ctx.params.fgsbir_joint
    dataset_dir = ctx.path(ctx.params.dataset_dir)
    open_dataset(dataset_dir)
    config = joint_config(ctx, p, dataset_dir)
    outcome = ctx.train(joint_loop, config)
    state = outcome.state
    done = state["done"]
    save_checkpoints(ctx.tmp_out / "checkpoints", state)
    history = {name: v["history"] for name, v in done.items()}
    ctx.write_json("history.json", history)
    write_curves(ctx.tmp_out, history, p.history_every)
    metrics: dict[str, Any] = {"init": p.init, "num_labelled_pairs": state["num_labelled_pairs"],
                               "num_all_pairs": state["num_all_pairs"], "num_pseudo_pairs": state["num_pseudo_pairs"],
                               "train_seconds": round(outcome.seconds, 1), "resumed": outcome.resumed}
    for name, hist in history.items():
        last = hist[-1]
        for k in ("total", "labelled_triplet", "pseudo_triplet", "consistency", "d_real", "d_fake", "g_reward"):
            if k in last:
                metrics[f"{name}/final_{k}"] = round(float(last[k]), 4)
        if "weight_mean" in last:  # D's mean weight of the pseudo (or oracle) pairs over the variant
            metrics[f"{name}/mean_pseudo_weight"] = round(float(np.mean([h["weight_mean"] for h in hist])), 4)
        for k in ("g_reward", "g_reward_retrieval"):  # did policy gradient move G's reward?
            if k in hist[0]:
                metrics[f"{name}/first_{k}"] = round(float(hist[0][k]), 4)
                metrics[f"{name}/final_{k}"] = round(float(last[k]), 4)
        if "g_pool_refreshed" in last:  # share of G's new sketches of pool photos that entered the pool
            metrics[f"{name}/mean_pool_refreshed"] = round(float(np.mean([h["g_pool_refreshed"] for h in hist])), 4)
        metrics[f"{name}/seconds_per_step"] = round(float(np.mean([h["seconds_per_step"] for h in hist])), 4)
    if "semi" in done and "disc" in done["semi"]:
        metrics.update(write_pseudo_scores(ctx.tmp_out, p, done["semi"]["disc"], dataset_dir, config["pseudo_path"]))
    ctx.write_json("metrics.json", metrics)
    return metrics


def joint_config(ctx, p: FGJointParams, dataset_dir: Path) -> dict[str, Any]:
    """The loop's config: params, the student architecture (init scratch) and the earlier stages' outputs
    the variants need (a clear error when one is missing)."""
    specs = variant_specs(p)
    config: dict[str, Any] = {"params": p, "seed": ctx.params.seed, "dataset_dir": str(dataset_dir),
                              "student": ctx.params.distill.student, "line_width": ctx.params.pseudo_pairs.line_width,
                              "rdp_epsilon": ctx.params.sketch_generator.rdp_epsilon}
    if p.init == "data_free":
        config["students_path"] = str(checkpoint_path(ctx.path(p.students_path)) if p.students_path
                                      else ctx.input("distill", "students.pt"))
    if any(s.kind == "semi" and not s.oracle for s in specs):
        config["pseudo_path"] = str(ctx.input("pseudo_pairs", "pseudo_pairs.parquet"))
    if any(s.kind == "semi" and s.policy_gradient for s in specs):
        config["generator_path"] = str(ctx.input("sketch_generator", "generator.pt"))
        if p.policy_gradient.refresh_pool and p.policy_gradient.refresh_if_better:
            config["teachers_path"] = str(ctx.input("teacher_pretrain", "teachers.pt"))
    return config


def save_checkpoints(ck: Path, state: dict[str, Any]) -> None:
    """checkpoints/<variant>.pt (F, read by :func:`sbir.models.checkpoints.load_retrieval_checkpoint`) and
    the semi variant's final D and G."""
    done = state["done"]
    ck.mkdir()
    for name, v in done.items():
        torch.save({"model": v["model"], "arch": state["arch"], "variant": name, "kind": v["kind"],
                    "start_from": v["start_from"], "steps": v["steps"], "init": state["init"],
                    "params": state["params"]}, ck / f"{name}.pt")
    if "semi" in done and "disc" in done["semi"]:
        extras = {"discriminator": done["semi"]["disc"], "params": state["params"]}
        if "gen" in done["semi"]:
            extras["generator"] = done["semi"]["gen"]
        torch.save(extras, ck / "semi_generator_discriminator.pt")


def write_curves(out: Path, history: dict[str, list[dict[str, float]]], history_every: int) -> None:
    """loss_history.json (total loss per variant on the steps all variants logged, for ``dvc plots show``,
    one line per variant) and curves.png."""
    from sbir.plots import plot_loss_curves, write_plot_table

    steps = sorted(set.intersection(*(set(h["step"] for h in hist) for hist in history.values()))) if history else []
    write_plot_table(out / "loss_history.json", "step", steps,
                     {name: [next(h["total"] for h in hist if h["step"] == s) for s in steps]
                      for name, hist in history.items()})
    curves: dict[str, list[float]] = {}
    for name, hist in history.items():
        for k in ("total", "labelled_triplet", "pseudo_triplet", "consistency", "discriminator", "g_reward"):
            if k in hist[-1]:
                curves[f"{name}/{k}"] = [h.get(k, float("nan")) for h in hist]
    plot_loss_curves(curves, out / "curves.png", title="fgsbir_joint", xlabel=f"interval of {history_every} steps")


def write_pseudo_scores(out: Path, p: FGJointParams, disc_state: dict[str, Any], dataset_dir: Path,
                        pseudo_path: str) -> dict[str, float]:
    """The final semi D's score of every pseudo pair written by pseudo_pairs (pseudo_scores.parquet, with
    G's log-likelihood next to it) and their summary metrics."""
    data = JointData(str(dataset_dir), pseudo_path)
    disc = PairDiscriminator(p.discriminator.width)
    disc.load_state_dict(disc_state)
    scores = score_pseudo_pairs(disc, data)
    pq.write_table(pa.table({"photo_id": pa.array(data.pool_ids, pa.string()),
                             "discriminator_score": pa.array(scores.numpy().astype(np.float32)),
                             "log_likelihood": pa.array(data.pool_loglik.numpy().astype(np.float32))}),
                   out / "pseudo_scores.parquet")
    metrics = {"pseudo_mean_discriminator_score": round(float(scores.mean()), 4)}
    if len(scores) > 2:
        metrics["pseudo_score_loglik_corr"] = round(float(np.corrcoef(scores.numpy(), data.pool_loglik.numpy())[0, 1]), 4)
    return metrics
