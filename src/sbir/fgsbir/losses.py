"""The loss terms of the semi-supervised FG-SBIR method (fgsbir_joint), pure functions of embeddings
and logits, plus the negative sampling of the triplets.

* :func:`triplet_loss`: F's retrieval loss (labelled pairs, and D-weighted pseudo pairs);
* :func:`discriminator_weights`: the instance weights of pseudo pairs from D's logits;
* :func:`discriminator_loss`: D's real-vs-fake loss on (sketch, photo) pairs;
* :func:`consistency_loss`: KL to the frozen supervised model's similarity softmax;
* :func:`retrieval_reward`: the REINFORCE reward of a generated sketch under F;
* :func:`sample_negatives`: one negative photo per positive (same class with some probability).

The losses and the reward run in fp32, also inside a mixed-precision loop (:func:`sbir.train.precision.fp32`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sbir.train.precision import fp32


@fp32
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


@fp32
def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, mismatched: torch.Tensor | None = None) -> torch.Tensor:
    """D's loss: BCE of real labelled pairs (target 1) + generated pairs (target 0) [+ real sketches with a
    wrong photo (target 0)]."""
    loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    if mismatched is not None:
        loss = loss + F.binary_cross_entropy_with_logits(mismatched, torch.zeros_like(mismatched))
    return loss


def similarity_logits(sketch_emb: torch.Tensor, photo_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    return sketch_emb @ photo_emb.T / temperature


@fp32
def consistency_loss(student_sketch: torch.Tensor, student_photo: torch.Tensor, teacher_sketch: torch.Tensor,
                     teacher_photo: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each sketch's softmax over the batch gallery of photos (cosine / tau),
    averaged over sketches. The teacher side carries no gradient."""
    log_s = F.log_softmax(similarity_logits(student_sketch, student_photo, temperature), dim=1)
    with torch.no_grad():
        log_t = F.log_softmax(similarity_logits(teacher_sketch, teacher_photo, temperature), dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


@fp32
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
