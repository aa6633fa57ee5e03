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

1. ``supervised``: triplet on the labelled pairs, negatives among the labelled photos;
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
   * every ``policy_gradient.every`` F steps a G step: G draws sketches for a batch of unlabelled
     photos, they are rasterised (the same rasteriser as the data), and G is updated by REINFORCE
     with reward = retrieval reward under F + lambda * log D, minus a moving-average baseline,
     plus the supervised VAE loss on labelled pairs; the new sketches replace those photos' pseudo
     sketches in the pool (each worker refreshes its own copy of the pool).
4. ``ablations``: semi with one part switched off, and ``oracle_sketches``: semi whose pseudo pool
   holds the unlabelled photos' *real* sketches (no G): what the rest of the method makes of perfect
   pseudo sketches, i.e. the ceiling a better generator could reach.

Checkpoints: every report carries the finished variants' models and the running variant's full
state, so a restarted worker resumes inside the running variant.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from sbir.config import BackboneParams
from sbir.data.datasets import load_image_set
from sbir.data.format import open_dataset
from sbir.fgsbir.generator_train import fine_grained_pairs, load_generator, photo_input, render_sketches
from sbir.fgsbir.params import FGJointParams
from sbir.models.backbones import EncoderPair, channel_stats, resize, to_float
from sbir.models.sketch_generator import MovingAverageBaseline, reinforce_loss
from sbir.train import runtime as rt


# ----------------------------------------------------------------------------- loss terms (pure)
def triplet_loss(anchor: torch.Tensor, gallery: torch.Tensor, margin: float, weights: torch.Tensor | None = None,
                 negatives: str = "in_batch", same: torch.Tensor | None = None) -> torch.Tensor:
    """Triplet loss of sketch anchors against a photo gallery; squared L2 distance of unit embeddings.

    ``gallery`` (G >= B rows): row i is anchor i's photo (the positive). ``negatives``:

    * ``sampled``: row B + i is anchor i's negative: ``max(0, margin + d(a_i, p_i) - d(a_i, n_i))``;
    * ``in_batch``: every other gallery row is a negative; per anchor, the mean hinge over the
      negatives that violate the margin (batch-all), 0 when none does.

    ``same`` (B, G) bool, optional: True where a gallery row shows anchor i's own photo (a repeat in
    the batch); such rows are never negatives. Per-anchor losses are averaged with ``weights``
    (default 1; no gradient flows through them).
    """
    b = anchor.shape[0]
    idx = torch.arange(b, device=anchor.device)
    d = (2.0 - 2.0 * anchor @ gallery.T).clamp_min(0.0)  # (B, G)
    pos = d[idx, idx]
    if negatives == "sampled":
        per_anchor = F.relu(margin + pos - d[idx, b + idx])
    elif negatives == "in_batch":
        other = torch.ones_like(d, dtype=torch.bool) if same is None else ~same
        other[idx, idx] = False
        hinge = F.relu(margin + pos.unsqueeze(1) - d) * other
        per_anchor = hinge.sum(1) / (hinge > 0).sum(1).clamp_min(1)
    else:
        raise ValueError(f"unknown negatives {negatives!r}")
    if weights is None:
        return per_anchor.mean()
    return (weights.detach() * per_anchor).mean()


def discriminator_weights(logits: torch.Tensor, clip: float = float("inf"),
                          reference_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Instance weights of pseudo pairs from D's logits, normalised over the batch, then clipped at
    ``clip`` (one pair D likes cannot carry the batch; the clipped excess is dropped). No gradient
    flows to D.

    Without ``reference_logits`` the probabilities are divided by their batch mean (mean weight 1:
    only the ranking within the batch matters). With the logits D gives the batch's *labelled* pairs,
    they are divided by the mean probability of those: a pseudo pair D finds as real as a labelled
    pair weighs 1, and a batch of obvious fakes weighs little in total.
    """
    prob = torch.sigmoid(logits.detach().float()).flatten()
    ref = prob if reference_logits is None else torch.sigmoid(reference_logits.detach().float()).flatten()
    w = prob / ref.mean().clamp_min(1e-8)
    return w.clamp(max=clip) if math.isfinite(clip) else w


def similarity_logits(sketch_emb: torch.Tensor, photo_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    return sketch_emb @ photo_emb.T / temperature


def consistency_loss(student_sketch: torch.Tensor, student_photo: torch.Tensor, teacher_sketch: torch.Tensor,
                     teacher_photo: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each sketch's softmax over the batch gallery of photos (cosine / tau),
    averaged over sketches. The teacher side carries no gradient."""
    log_s = F.log_softmax(similarity_logits(student_sketch, student_photo, temperature), dim=1)
    with torch.no_grad():
        log_t = F.log_softmax(similarity_logits(teacher_sketch, teacher_photo, temperature), dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def retrieval_reward(sketch_emb: torch.Tensor, photo_emb: torch.Tensor, kind: str, margin: float,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """Reward (B,) of each generated sketch i under F: row i of ``photo_emb`` is its true photo, every
    row is in the gallery (extra rows beyond B are extra negatives).

    * ``neg_triplet``: minus the mean triplet hinge against every other gallery photo;
    * ``inverse_rank``: 1 / rank of the true photo (ties count against the sketch).

    ``same`` (B, G) bool, optional: rows showing sketch i's own photo again (never negatives).
    """
    b = sketch_emb.shape[0]
    sims = sketch_emb @ photo_emb.T  # (B, G)
    true = sims[torch.arange(b), torch.arange(b)].unsqueeze(1)
    other = torch.ones_like(sims, dtype=torch.bool) if same is None else ~same
    other[torch.arange(b), torch.arange(b)] = False
    if kind == "inverse_rank":
        rank = 1 + ((sims >= true) & other).sum(1)
        return 1.0 / rank.float()
    if kind == "neg_triplet":
        # squared L2 of unit vectors = 2 - 2 cos
        hinge = F.relu(margin + (2 - 2 * true) - (2 - 2 * sims))
        return -(hinge * other).sum(1) / other.sum(1).clamp_min(1)
    raise ValueError(f"unknown reward {kind!r}")


def sample_negatives(positives: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, same_class_prob: float,
                     generator: torch.Generator) -> torch.Tensor:
    """One negative photo row per positive, from ``pool`` (photo rows), never the positive itself; from
    the positive's class with probability ``same_class_prob`` when that class has another photo."""
    pool_labels = labels[pool]
    out = torch.empty_like(positives)
    coins = torch.rand(len(positives), generator=generator)
    for i, (pos, coin) in enumerate(zip(positives.tolist(), coins.tolist())):
        cand = pool
        if coin < same_class_prob:
            same = pool[pool_labels == labels[pos]]
            if (same != pos).any():
                cand = same
        for _ in range(64):
            j = int(cand[torch.randint(0, len(cand), (1,), generator=generator)])
            if j != pos:
                break
        out[i] = j
    return out


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
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)

    def forward(self, sketches: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
        """sketches float (B,1 or 3,H,W) in [0,1] (white paper = 1), photos float (B,3,H',W') -> (B,) logits."""
        ink = 1.0 - sketches[:, :1]
        if ink.shape[-1] != photos.shape[-1]:
            ink = resize(ink, photos.shape[-1])
        x = torch.cat([ink, photos], dim=1) * 2 - 1
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)).squeeze(1)


# ----------------------------------------------------------------------------- F construction
def build_retrieval_model(arch: dict[str, Any]) -> EncoderPair:
    """F from its architecture dict: backbone params, embed_dim, head ('linear' | 'mlp'), image_size."""
    return EncoderPair(BackboneParams.model_validate(arch["backbone"]), int(arch["embed_dim"]),
                       arch.get("head", "linear"))


def load_retrieval_checkpoint(path: str | Path) -> tuple[EncoderPair, dict[str, Any]]:
    """An F checkpoint written by fgsbir_joint (``checkpoints/<variant>.pt``), eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = build_retrieval_model(blob["arch"])
    model.load_state_dict(blob["model"])
    return model.eval(), blob


def initial_model(config: dict[str, Any], photos_u8: torch.Tensor, sketches_u8: torch.Tensor
                  ) -> tuple[EncoderPair, dict[str, Any]]:
    """F at step 0: the distilled students (data_free) or a random init of the same architecture.
    ``arch['image_size']``: the size F's inputs are resized to (``config['image_size']``, default the
    dataset's photo size)."""
    size = int(config.get("image_size") or photos_u8.shape[-1])
    if config["init"] == "data_free":
        from sbir.dfsbir.distill import load_students

        students, blob = load_students(config["students_path"])
        sp = blob["params"]["student"]
        arch = {"backbone": sp["backbone"], "embed_dim": sp["embed_dim"], "head": sp.get("head", "linear"),
                "image_size": size}
        return students.train(), arch
    arch = {**config["scratch_arch"], "image_size": size}
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

    def __init__(self, config: dict[str, Any]) -> None:
        from sbir.fgsbir.pseudo_pairs import read_pseudo_pairs

        ds = open_dataset(config["dataset_dir"])
        self.photos = load_image_set(ds, "photos", ["train"])
        self.sketches = load_image_set(ds, "sketches", ["train"])
        self.lab_s, self.lab_p = fine_grained_pairs(self.sketches, self.photos, labelled_only=True)
        self.all_s, self.all_p = fine_grained_pairs(self.sketches, self.photos, labelled_only=False)
        if len(self.lab_s) == 0:
            raise ValueError(f"{ds.root}: no labelled train pair")
        self.labels = self.photos.labels
        self.labelled_photos = torch.unique(self.lab_p)
        self.all_photos = torch.arange(len(self.photos))
        self.sketch_size = int(self.sketches.images.shape[-1])
        self.pool_rows = torch.zeros(0, dtype=torch.long)
        self.pool_images = torch.zeros((0, 1, self.sketch_size, self.sketch_size), dtype=torch.uint8)
        if config.get("pseudo_path"):
            pseudo = read_pseudo_pairs(config["pseudo_path"])
            row = {pid: i for i, pid in enumerate(self.photos.ids)}
            keep = [i for i, pid in enumerate(pseudo["photo_ids"]) if pid in row]
            self.pool_rows = torch.tensor([row[pseudo["photo_ids"][i]] for i in keep], dtype=torch.long)
            self.pool_images = pseudo["images"][keep].clone()
            self.pool_ids = [pseudo["photo_ids"][i] for i in keep]
            self.pool_loglik = pseudo["log_likelihood"][keep]


def _draw(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices in [0, n) (with repeats only when k > n)."""
    if k <= n:
        return torch.randperm(n, generator=gen)[:k]
    return torch.randint(0, n, (k,), generator=gen)


def _f(x_u8: torch.Tensor, shift: int, gen: torch.Generator | None, device, size: int | None = None) -> torch.Tensor:
    """uint8 images -> float [0,1], 3 channels, resized to ``size``, randomly shifted when ``gen`` is given."""
    x = to_float(x_u8)
    if size is not None:
        x = resize(x, size)
    if gen is not None and shift > 0:
        x = random_shift(x, shift, gen)
    return x.to(device)


class VariantRun:
    """One variant's models, optimisers and step, with a state dict for checkpoints."""

    def __init__(self, spec: VariantSpec, p: FGJointParams, model: EncoderPair, data: JointData, config: dict,
                 device, image_size: int) -> None:
        self.spec, self.p, self.data, self.device, self.size = spec, p, data, device, image_size
        self.line_width = float(config.get("line_width", 1.0))  # as pseudo_pairs renders
        self.model = model.to(device).train()
        lr = p.joint_lr if spec.start_from is not None else p.lr
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=p.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.teacher = self.disc = self.gen = self.baseline = None
        self.pool, self.pool_rows = data.pool_images.clone(), data.pool_rows
        if spec.oracle:
            # one real sketch per unlabelled photo (needs sketches that keep their photo_id)
            unl = ~data.photos.labelled[data.all_p]
            first: dict[int, int] = {}
            for s_row, p_row in zip(data.all_s[unl].tolist(), data.all_p[unl].tolist()):
                first.setdefault(p_row, s_row)
            if not first:
                raise ValueError("oracle_sketches needs sketches of unlabelled train photos with their photo_id")
            self.pool_rows = torch.tensor(list(first), dtype=torch.long)
            self.pool = data.sketches.images[torch.tensor(list(first.values()), dtype=torch.long)].clone()
        if spec.kind == "semi":
            if len(self.pool_rows) == 0:
                raise ValueError("the semi variant needs pseudo pairs (run the pseudo_pairs stage)")
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.disc = PairDiscriminator(p.discriminator.width).to(device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=p.discriminator.lr, betas=(0.5, 0.999))
            if spec.policy_gradient:
                self.gen, _ = load_generator(config["generator_path"], device)
                self.gen.train()
                self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=p.policy_gradient.lr)
                self.baseline = MovingAverageBaseline(p.policy_gradient.baseline_decay)
                from sbir.fgsbir.generator_train import StrokeBank, simplify_all

                sk = load_image_set(open_dataset(config["dataset_dir"]), "sketches", ["train"], with_strokes=True)
                strokes = simplify_all([sk.strokes[i] if sk.strokes else None for i in data.lab_s.tolist()],
                                       config["rdp_epsilon"])
                ok = [i for i, s in enumerate(strokes) if s is not None and len(s) > 0]
                self.vae_bank = StrokeBank([strokes[i] for i in ok], self.gen.config.max_len)
                self.vae_photo_rows = data.lab_p[ok]

    # -- checkpoint
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                               "history": self.history}
        if self.disc is not None:
            out.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict(), teacher=self.teacher.state_dict(),
                       pool=self.pool)
        if self.gen is not None:
            out.update(gen=self.gen.state_dict(), opt_g=self.opt_g.state_dict(), baseline=self.baseline.state_dict())
        return out

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.step, self.history = s["step"], s["history"]
        if self.disc is not None:
            self.disc.load_state_dict(s["disc"])
            self.opt_d.load_state_dict(s["opt_d"])
            self.teacher.load_state_dict(s["teacher"])
            self.pool = s["pool"]
        if self.gen is not None:
            self.gen.load_state_dict(s["gen"])
            self.opt_g.load_state_dict(s["opt_g"])
            self.baseline.load_state_dict(s["baseline"])

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
        xs = _f(s_images, p.augment_shift, gen, self.device, self.size)
        xg = _f(d.photos.images[g_rows], p.augment_shift, gen, self.device, self.size)
        return self.model.sketch_encoder(xs), self.model.photo_encoder(xg), same, xs, xg

    def f_step(self, gen: torch.Generator, b_lab: int, b_pse: int) -> dict[str, float]:
        d, p, spec = self.data, self.p, self.spec
        if spec.kind == "full":
            pairs_s, pairs_p, neg_pool = d.all_s, d.all_p, d.all_photos
        elif spec.kind == "supervised":
            pairs_s, pairs_p, neg_pool = d.lab_s, d.lab_p, d.labelled_photos
        else:
            pairs_s, pairs_p, neg_pool = d.lab_s, d.lab_p, d.all_photos
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
            u_s, u_g, u_same, xs_u, xg_u = self.triplet_batch(su_img, pu, d.all_photos, gen)
            if spec.pseudo_triplet:
                if spec.weighting:
                    with torch.no_grad():  # D sees the pairs as it was trained on them (no shift, native size)
                        logits = self.disc(_f(su_img, 0, None, self.device), _f(d.photos.images[pu], 0, None, self.device))
                        ref = None
                        if p.discriminator.weight_reference == "labelled":
                            ref = self.disc(_f(d.sketches.images[s_rows], 0, None, self.device),
                                            _f(d.photos.images[p_rows], 0, None, self.device))
                        w = discriminator_weights(logits, p.discriminator.weight_clip, ref)
                    stats["weight_mean"] = float(w.mean())
                    stats["weight_max"] = float(w.max())
                else:
                    w = None
                terms["pseudo_triplet"] = triplet_loss(u_s, u_g, p.margin, w, negatives=p.negatives, same=u_same)
                total = total + p.weights.pseudo_triplet * terms["pseudo_triplet"]
            if spec.consistency:
                with torch.no_grad():
                    t_s, t_g = self.teacher.sketch_encoder(xs_u), self.teacher.photo_encoder(xg_u)
                terms["consistency"] = consistency_loss(u_s, u_g, t_s, t_g, p.consistency_temperature)
                total = total + p.weights.consistency * terms["consistency"]
        terms["total"] = total
        rt.check_finite(terms, self.step, f"fgsbir_joint/{spec.name}")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        rt.sync_gradients(self.model)
        self.opt.step()
        return {**{k: float(v.detach()) for k, v in terms.items()}, **stats}

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
            real = self.disc(_f(d.sketches.images[s_rows], 0, None, self.device),
                             _f(d.photos.images[p_rows], 0, None, self.device))
            fake = self.disc(_f(su_img, 0, None, self.device), _f(d.photos.images[pu], 0, None, self.device))
            loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                    + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
            if p.discriminator.mismatched_fakes:
                wrong = sample_negatives(p_rows, d.labels, neg_pool, p.same_class_negative_prob, gen)
                mis = self.disc(_f(d.sketches.images[s_rows], 0, None, self.device),
                                _f(d.photos.images[wrong], 0, None, self.device))
                loss = loss + F.binary_cross_entropy_with_logits(mis, torch.zeros_like(mis))
            rt.check_finite({"discriminator": loss}, self.step, f"fgsbir_joint/{self.spec.name}")
            self.opt_d.zero_grad(set_to_none=True)
            loss.backward()
            rt.sync_gradients(self.disc)
            self.opt_d.step()
            out = {"discriminator": float(loss.detach()), "d_real": float(torch.sigmoid(real.detach()).mean()),
                   "d_fake": float(torch.sigmoid(fake.detach()).mean())}
        return out

    def g_step(self, gen: torch.Generator, b_gen: int) -> dict[str, float]:
        """REINFORCE step of G on unlabelled photos + the supervised VAE loss on labelled pairs."""
        d, p, pg = self.data, self.p, self.p.policy_gradient
        ui = _draw(len(self.pool_rows), b_gen, gen)
        pu = self.pool_rows[ui]
        photos_g = photo_input(d.photos.images[pu]).to(self.device)
        with torch.no_grad():
            s5, lengths, _ = self.gen.sample(photos_g, temperature=pg.temperature, generator=None,
                                                 pen_temperature=pg.pen_temperature)
            strokes = self.gen.to_stroke3(s5, lengths)
            imgs = render_sketches(strokes, d.sketch_size, self.line_width)
            # reward under the current F, gallery = this batch's photos + same-class-ish negatives
            self.model.eval()
            negs = sample_negatives(pu, d.labels, d.all_photos, p.same_class_negative_prob, gen)
            e_s = self.model.sketch_encoder(_f(imgs, 0, None, self.device, self.size))
            e_p = self.model.photo_encoder(_f(d.photos.images[torch.cat([pu, negs])], 0, None, self.device, self.size))
            self.model.train()
            g_rows = torch.cat([pu, negs])
            r_ret = retrieval_reward(e_s, e_p, pg.reward, p.margin, same=(pu.unsqueeze(1) == g_rows.unsqueeze(0)).to(self.device))
            log_d = F.logsigmoid(self.disc(_f(imgs, 0, None, self.device), _f(d.photos.images[pu], 0, None, self.device)))
            reward = r_ret + pg.discriminator_weight * log_d
        r_mean = rt.mean_over_workers({"r": float(reward.mean())})["r"]
        if self.baseline.state_dict()["value"] is None:  # the baseline starts at the first batch's mean reward
            self.baseline.update(r_mean)
        b = self.baseline.value
        t_max = int(lengths.max())
        log_p = self.gen.log_prob(photos_g, s5[:, :t_max], lengths, temperature=pg.temperature,
                                  pen_temperature=pg.pen_temperature)
        loss_pg = reinforce_loss(log_p, reward, b)
        self.baseline.update(r_mean)
        vi = torch.randint(0, len(self.vae_bank), (b_gen,), generator=gen)
        x, lens = self.vae_bank.batch(vi)
        vae = self.gen.loss(photo_input(d.photos.images[self.vae_photo_rows[vi]]).to(self.device), x.to(self.device),
                            lens.to(self.device), step=None)
        total = loss_pg + pg.vae_weight * vae["total"]
        rt.check_finite({"policy_gradient": loss_pg, "vae": vae["total"]}, self.step, f"fgsbir_joint/{self.spec.name}")
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        rt.sync_gradients(self.gen)
        self.gen.clip_gradients()
        self.opt_g.step()
        if pg.refresh_pool:
            self.pool[ui] = imgs
        return {"g_reward": float(reward.mean()), "g_reward_retrieval": float(r_ret.mean()),
                "g_log_d": float(log_d.mean()), "g_baseline": b, "g_vae": float(vae["total"].detach()),
                "g_points": float(np.mean([len(s) for s in strokes]))}


def joint_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    p = FGJointParams.model_validate(config["params"])
    seed = int(config["seed"])
    torch.manual_seed(seed)
    rank, world = rt.world()
    data = JointData(config)
    init_model, arch = initial_model(config, data.photos.images, data.sketches.images)
    specs = variant_specs(p)
    done: dict[str, dict[str, Any]] = {}
    current_state = None
    state = rt.restore()
    if state is not None:
        done, current_state = state["done"], state.get("current")
    run = config.get("mlflow_run")
    # batch sizes are per worker (as in the other stages): the in-batch negatives of a worker's batch
    # do not shrink when workers are added
    b_lab, b_pse, b_gen = p.batch_size, p.pseudo_batch_size, p.policy_gradient.batch_size
    global_step = sum(len(v["history"]) for v in done.values())  # MLflow step: monotonic over variants and resumes
    for vi, spec in enumerate(specs):
        if spec.name in done:
            continue
        torch.manual_seed(seed * 1009 + vi)
        start_model = copy.deepcopy(init_model) if spec.start_from is None else build_retrieval_model(arch)
        if spec.start_from is not None:
            start_model.load_state_dict(done[spec.start_from]["model"])
        vr = VariantRun(spec, p, start_model, data, config, device, int(arch["image_size"]))
        if current_state is not None and current_state["name"] == spec.name:
            vr.load_state_dict(current_state["state"])
        current_state = None
        vr.broadcast()
        gen = torch.Generator().manual_seed(seed * 7919 + 131 * vi + 17 * rank + vr.step)
        if vr.disc is not None and vr.step == 0:
            warm = vr.d_warmup(gen, b_lab, b_pse)
            if warm and rt.is_rank0():
                print(f"[fgsbir_joint] {spec.name}: D after {p.discriminator.warmup_steps} warm-up steps: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in warm.items()), flush=True)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        t0, n = time.time(), 0
        for step in rt.progress(range(vr.step, spec.steps), total=spec.steps - vr.step, desc=f"fgsbir {spec.name}"):
            vr.step = step
            out = vr.f_step(gen, b_lab, b_pse)
            if vr.gen is not None and step % p.policy_gradient.every == 0:
                out.update(vr.g_step(gen, b_gen))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            n += 1
            last = step + 1 == spec.steps
            if (step + 1) % p.history_every == 0 or last:  # a curve point: an all-reduce, no checkpoint
                metrics = rt.mean_over_workers({k: sums[k] / counts[k] for k in sums})
                metrics.update(step=step, seconds_per_step=(time.time() - t0) / n)
                vr.history.append(metrics)
                sums, counts, t0, n = {}, {}, time.time(), 0
            if ((step + 1) % p.log_every == 0 and vr.history) or last:  # a report: a barrier + a checkpoint
                metrics = vr.history[-1]
                vr.step = step + 1
                finished = last
                if finished:
                    done[spec.name] = {"model": vr.model.state_dict(), "history": vr.history, "steps": spec.steps,
                                       "kind": spec.kind, "start_from": spec.start_from}
                    if vr.disc is not None:
                        done[spec.name]["disc"] = vr.disc.state_dict()
                    if vr.gen is not None:
                        done[spec.name]["gen"] = vr.gen.state_dict()
                if run is not None and rt.is_rank0():
                    run.log_metrics({f"{spec.name}/{k}": v for k, v in metrics.items()}, step=global_step)
                global_step += 1
                rt.report({"variant": vi, **{f"{spec.name}/{k}": v for k, v in metrics.items()}},
                          {"done": done, "current": None if finished else {"name": spec.name, "state": vr.state_dict()},
                           "arch": arch, "params": p.model_dump(mode="json"), "init": config["init"],
                           "num_labelled_pairs": len(data.lab_s), "num_all_pairs": len(data.all_s),
                           "num_pseudo_pairs": len(data.pool_rows)})


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
    from sbir.plots import plot_loss_curves

    p: FGJointParams = ctx.params.fgsbir_joint
    dataset_dir = ctx.path(ctx.params.dataset_dir)
    open_dataset(dataset_dir)
    specs = variant_specs(p)
    needs_semi = any(s.kind == "semi" and not s.oracle for s in specs)
    needs_g = any(s.kind == "semi" and s.policy_gradient for s in specs)
    config: dict[str, Any] = {"params": p.model_dump(mode="json"), "seed": ctx.params.seed,
                              "dataset_dir": str(dataset_dir), "init": p.init, "mlflow_run": ctx.run,
                              "scratch_arch": {"backbone": ctx.params.distill.student.backbone.model_dump(mode="json"),
                                               "embed_dim": ctx.params.distill.student.embed_dim,
                                               "head": ctx.params.distill.student.head},
                              "image_size": p.image_size, "line_width": ctx.params.pseudo_pairs.line_width,
                              "rdp_epsilon": ctx.params.sketch_generator.rdp_epsilon}
    needed: list[Path] = []
    if p.init == "data_free":
        config["students_path"] = str(ctx.path(p.students_path) if p.students_path
                                      else ctx.stage_dir("distill") / "students.pt")
        needed.append(Path(config["students_path"]))
    if needs_semi:
        config["pseudo_path"] = str(ctx.stage_dir("pseudo_pairs") / "pseudo_pairs.parquet")
        needed.append(Path(config["pseudo_path"]))
    if needs_g:
        config["generator_path"] = str(ctx.stage_dir("sketch_generator") / "generator.pt")
        needed.append(Path(config["generator_path"]))
    for f in needed:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: run the earlier stages first")
    digest = ctx.params_digest({"fgsbir_joint": p.model_dump(mode="json"), "scratch_arch": config["scratch_arch"],
                                "rdp_epsilon": config["rdp_epsilon"], "line_width": config["line_width"]})
    outcome = rt.run_training("fgsbir_joint", joint_loop, config, ctx.params.ray, digest, resume=ctx.resume)
    state = outcome.state
    done = state["done"]
    ck = ctx.tmp_out / "checkpoints"
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
    history = {name: v["history"] for name, v in done.items()}
    (ctx.tmp_out / "history.json").write_text(json.dumps(history, indent=2))
    # total loss per variant on the steps all variants logged, for `dvc plots show` (one line per variant)
    from sbir.plots import write_plot_table

    steps = sorted(set.intersection(*(set(h["step"] for h in hist) for hist in history.values()))) if history else []
    write_plot_table(ctx.tmp_out / "loss_history.json", "step", steps,
                     {name: [next(h["total"] for h in hist if h["step"] == s) for s in steps]
                      for name, hist in history.items()})
    curves: dict[str, list[float]] = {}
    for name, hist in history.items():
        for k in ("total", "labelled_triplet", "pseudo_triplet", "consistency", "discriminator", "g_reward"):
            if k in hist[-1]:
                curves[f"{name}/{k}"] = [h.get(k, float("nan")) for h in hist]
    plot_loss_curves(curves, ctx.tmp_out / "curves.png", title="fgsbir_joint",
                     xlabel=f"interval of {p.history_every} steps")

    metrics: dict[str, Any] = {"init": p.init, "num_labelled_pairs": state["num_labelled_pairs"],
                               "num_all_pairs": state["num_all_pairs"], "num_pseudo_pairs": state["num_pseudo_pairs"],
                               "train_seconds": round(outcome.seconds, 1), "resumed": outcome.resumed}
    for name, hist in history.items():
        last = hist[-1]
        for k in ("total", "labelled_triplet", "pseudo_triplet", "consistency", "d_real", "d_fake", "g_reward"):
            if k in last:
                metrics[f"{name}/final_{k}"] = round(float(last[k]), 4)
        metrics[f"{name}/seconds_per_step"] = round(float(np.mean([h["seconds_per_step"] for h in hist])), 4)
    if "semi" in done and "disc" in done["semi"]:
        # the discriminator score of the pseudo pairs written by pseudo_pairs (final D of the semi variant)
        data = JointData({"dataset_dir": str(dataset_dir), "pseudo_path": config["pseudo_path"]})
        disc = PairDiscriminator(p.discriminator.width)
        disc.load_state_dict(done["semi"]["disc"])
        scores = score_pseudo_pairs(disc, data)
        pq.write_table(pa.table({"photo_id": pa.array(data.pool_ids, pa.string()),
                                 "discriminator_score": pa.array(scores.numpy().astype(np.float32)),
                                 "log_likelihood": pa.array(data.pool_loglik.numpy().astype(np.float32))}),
                       ctx.tmp_out / "pseudo_scores.parquet")
        metrics["pseudo_mean_discriminator_score"] = round(float(scores.mean()), 4)
        if len(scores) > 2:
            metrics["pseudo_score_loglik_corr"] = round(float(np.corrcoef(scores.numpy(), data.pool_loglik.numpy())[0, 1]), 4)
    (ctx.tmp_out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
