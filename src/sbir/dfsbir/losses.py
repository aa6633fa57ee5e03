"""Loss terms of CrossX-DFL: the estimator objective and the student (distillation) objective.

Each term is a small function on tensors so it can be tested alone (sign, which network gets the
gradient). Conventions: every term is a quantity to *minimise*; weights come from params. Every term
runs in fp32, also inside a mixed-precision loop (:func:`sbir.train.precision.fp32`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sbir.train.precision import fp32


# ------------------------------------------------------------------------------- estimator terms
@fp32
def semantic_ce(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The teacher should classify the reconstructed sample as its conditioning class."""
    return F.cross_entropy(teacher_logits, target)


@fp32
def class_balance(teacher_logits: torch.Tensor) -> torch.Tensor:
    """log C - H(mean prediction over the batch): 0 when the batch covers all classes evenly."""
    mean_p = teacher_logits.softmax(dim=1).mean(dim=0)
    entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return math.log(teacher_logits.shape[1]) - entropy


@fp32
def activation(teacher_features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation term: the teacher's penultimate features should be strongly active."""
    return -teacher_features.abs().mean()


@fp32
def modality_guidance(modality_logits_photo: torch.Tensor, modality_logits_sketch: torch.Tensor,
                      photo_class: int = 0, sketch_class: int = 1) -> torch.Tensor:
    """The modality network should say 'photo' for g_p's output and 'sketch' for g_s's."""
    yp = torch.full((len(modality_logits_photo),), photo_class, device=modality_logits_photo.device)
    ys = torch.full((len(modality_logits_sketch),), sketch_class, device=modality_logits_sketch.device)
    return F.cross_entropy(modality_logits_photo, yp) + F.cross_entropy(modality_logits_sketch, ys)


@fp32
def class_alignment(photo_logits: torch.Tensor, sketch_logits: torch.Tensor,
                    detach: Literal["none", "photo", "sketch"] = "none") -> torch.Tensor:
    """Symmetric KL between t_p(x_p) and t_s(x_s) of each aligned pair (optionally one side detached)."""
    lp = photo_logits.log_softmax(1)
    ls = sketch_logits.log_softmax(1)
    if detach == "photo":
        lp = lp.detach()
    elif detach == "sketch":
        ls = ls.detach()
    kl_ps = F.kl_div(ls, lp, log_target=True, reduction="batchmean")  # KL(p || s)
    kl_sp = F.kl_div(lp, ls, log_target=True, reduction="batchmean")  # KL(s || p)
    return kl_ps + kl_sp


@fp32
def diversity(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mode-seeking term: two samples of one class (first/second half of the batch, same classes,
    other noise) should differ in proportion to their noise. Negative, so minimising spreads them;
    bounded because images live in [0, 1]."""
    h = len(x) // 2
    if h == 0:
        return x.sum() * 0
    dx = (x[:h] - x[h : 2 * h]).abs().flatten(1).mean(1)
    dz = (z[:h] - z[h : 2 * h]).abs().mean(1).clamp_min(1e-6)
    return -(dx / dz).mean()


@fp32
def adversarial_hardness(teacher_logits: torch.Tensor, student_logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Negative of the (per-sample, clamped at ``bound``) teacher→student KL.

    Minimising it *maximises* disagreement, making samples the students get wrong; the clamp stops
    the term from diverging once a sample is hard enough (the public code's term is unbounded).
    """
    pt = teacher_logits.softmax(1)
    kl = (pt * (pt.clamp_min(1e-12).log() - student_logits.log_softmax(1))).sum(1)
    return -kl.clamp(max=bound).mean()


class ChannelMoments(torch.autograd.Function):
    """Per-channel batch mean and (biased) variance of an N×C×H×W tensor, in fp32 whatever the input's
    dtype, with the analytic backward ``dL/dx = (g_mean + 2 g_var (x - mean)) / (N·H·W)``.

    Written by hand because autograd's ``var`` backward was most of the BN prior's cost: with ``Tensor.mean``
    and ``Tensor.var`` the prior's hooks took 48% of a batch-64 reconstruct step, with this 27%
    (benchmarks/bn_prior.py). The variance is the two-pass one (mean first), as ``Tensor.var`` computes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = xf.mean(dim=(0, 2, 3))
        var = (xf - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        slope = 2 * grad_var / n  # dL/dx = slope * x + offset, per channel: one fused pass over x
        offset = grad_mean / n - slope * mean
        return torch.addcmul(offset.view(1, -1, 1, 1), x.to(mean.dtype), slope.view(1, -1, 1, 1)).to(x.dtype)


class BNStatsPrior:
    """DeepInversion's prior: per-BN-layer batch mean/var of the sample match the running statistics.

    Registers forward hooks on the BatchNorm layers of a (frozen) network. The hooks act only inside
    :meth:`collecting` (the forward pass of reconstructed samples; then :meth:`loss`): the same network
    also runs elsewhere (distill's student steps run the teachers on every batch), where the statistics
    would be wasted work and, never read, would pile up. :meth:`remove` when done.
    """

    def __init__(self, network: nn.Module,
                 moments: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        # moments: x -> (per-channel mean, variance); ChannelMoments unless told (benchmarks/bn_prior.py)
        self.moments = moments or ChannelMoments.apply
        self.terms: list[torch.Tensor] = []
        self.active = False
        self.handles = [m.register_forward_hook(self._hook) for m in network.modules()
                        if isinstance(m, nn.BatchNorm2d)]

    @contextlib.contextmanager
    def collecting(self) -> Iterator["BNStatsPrior"]:
        """The forward passes inside add their terms (the previous ones are dropped)."""
        self.terms, self.active = [], True
        try:
            yield self
        finally:
            self.active = False

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if not self.active:
            return
        mean, var = self.moments(inputs[0])
        self.terms.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def loss(self) -> torch.Tensor:
        out = torch.stack(self.terms).sum() if self.terms else torch.tensor(0.0)
        self.terms = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------- student terms
@fp32
def proxy_logits(embeddings: torch.Tensor, proxies: torch.Tensor, scale: float) -> torch.Tensor:
    """Class logits of L2-normalised embeddings: scaled cosine similarity to each proxy."""
    return scale * embeddings @ F.normalize(proxies, dim=1).t()


def make_proxy_anchor(num_classes: int, embed_dim: int, initial_proxies: torch.Tensor,
                      margin: float = 0.1, alpha: float = 32.0) -> nn.Module:
    """pytorch-metric-learning's Proxy-Anchor loss whose proxies start from the teachers' class rows.

    The module owns the proxies (``.proxies``); both students use the same module, so they share
    one proxy space.
    """
    from pytorch_metric_learning import losses as pml_losses

    loss = pml_losses.ProxyAnchorLoss(num_classes=num_classes, embedding_size=embed_dim, margin=margin, alpha=alpha)
    with torch.no_grad():
        loss.proxies.copy_(initial_proxies)
    return loss


@fp32
def teacher_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Metric-agnostic distillation: the student's proxy-class distribution matches its teacher's."""
    t = temperature
    return F.kl_div(student_logits.div(t).log_softmax(1), teacher_logits.div(t).log_softmax(1),
                    log_target=True, reduction="batchmean") * t * t


@fp32
def cross_modal_triplet(sketch_emb: torch.Tensor, sketch_labels: torch.Tensor, photo_emb: torch.Tensor,
                        photo_labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Category-level cross-modal triplet: sketch anchors, same-class photos positive, others negative.

    Uses pytorch-metric-learning's TripletMarginLoss over all valid triplets with the photos as the
    reference set.
    """
    from pytorch_metric_learning import losses as pml_losses

    loss_fn = pml_losses.TripletMarginLoss(margin=margin)
    return loss_fn(sketch_emb, sketch_labels, ref_emb=photo_emb, ref_labels=photo_labels)


def init_proxies(teacher_weights: torch.Tensor | None, num_classes: int, embed_dim: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Proxies from a teacher's final-layer rows, projected by a fixed random map when dims differ."""
    if teacher_weights is None:
        return F.normalize(torch.randn(num_classes, embed_dim, generator=generator), dim=1)
    w = teacher_weights.detach().float()
    if w.shape[1] != embed_dim:
        # Johnson–Lindenstrauss style random projection keeps the rows' relative geometry
        proj = torch.randn(w.shape[1], embed_dim, generator=generator) / math.sqrt(embed_dim)
        w = w @ proj
    return F.normalize(w, dim=1)


class StudentProxies(nn.Module):
    """The students' class proxies, each inside a Proxy-Anchor loss.

    ``shared`` (one loss for both students) puts both modalities in one proxy space: the default for
    two independent teachers (METHOD.md, "one proxy space"). ``per_modality`` gives each student its own
    teacher's final-layer rows as proxies, as the paper does; only a cross-modal term then ties the two
    spaces together.
    """

    def __init__(self, photo: nn.Module, sketch: nn.Module | None = None) -> None:
        super().__init__()
        self.photo = photo
        self.sketch = sketch  # None: the photo loss is shared by both students

    @property
    def shared(self) -> bool:
        return self.sketch is None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the photo student's proxies, the sketch student's proxies)."""
        return self.photo.proxies, (self.photo if self.sketch is None else self.sketch).proxies

    @fp32
    def loss(self, e_p: torch.Tensor, y_p: torch.Tensor, e_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        if self.sketch is None:
            return self.photo(torch.cat([e_p, e_s]), torch.cat([y_p, y_s]))
        return self.photo(e_p, y_p) + self.sketch(e_s, y_s)
