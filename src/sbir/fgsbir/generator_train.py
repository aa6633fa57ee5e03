"""sketch_generator: pretrain the photo-to-sketch generator G on the labelled pairs (VAE loss).

Data: the train sketches whose photo is *labelled* (the photos' ``labelled`` flag alone decides what
is labelled, whether or not other sketches also keep a photo_id). Each sketch is RDP-simplified
(``rdp_epsilon``, in the data's stroke units), converted to stroke-5 and capped at ``max_len`` rows
(``sbir.strokes.pad_stroke5`` truncates and lifts the pen at the cut); offsets are standardised by
the pooled std of the simplified training offsets, stored in the model (``offset_scale``).

One Ray Train fit: each worker draws random batches of ``batch_size`` pairs (per worker, as in the
other stages), gradients are averaged with ``rt.sync_gradients`` and clipped after the average, so
every worker takes the same step. The VAE loss of ``eval_pairs`` *test* pairs is logged for the curves (never used to select
anything).

This module also holds the helpers the later fine-grained stages share: the pair indices, the photo
input of G, the rendering of generated strokes with :func:`sbir.strokes.rasterise` (the one
rasteriser for real and generated sketches), and the loops' optimiser step and curve-point means.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sbir import strokes as S
from sbir.data.datasets import ImageSet, fine_grained_pairs, load_image_set
from sbir.data.format import open_dataset
from sbir.fgsbir.params import GeneratorParams
from sbir.models.backbones import to_float
from sbir.models.checkpoints import TeacherSet, load_generator, load_teachers
from sbir.models.pretrained import efficientnet_lite0, efficientnet_trunk, packaged_weights_file
from sbir.models.sketch_generator import FrozenModule, PhotoToSketchGenerator, SketchGeneratorConfig
from sbir.train import runtime as rt
from sbir.train.precision import LoopDevice


# ----------------------------------------------------------------------------- shared helpers
class IntervalMeans:
    """Per-key means of the step metrics since the last curve point, and the seconds per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.t0 = 0, time.time()

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def seconds_per_step(self) -> float:
        return (time.time() - self.t0) / self.steps


def photo_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 photos (N,3,H,W) -> G's input: float in [0, 1]."""
    return to_float(images)


def render_sketches(strokes: Sequence[np.ndarray], size: int, line_width: float) -> torch.Tensor:
    """Stroke-3 sketches -> uint8 (N,1,size,size), black ink on white, exactly as the dataset's sketches
    (``sbir.data.synthetic`` renders ``round(255 * (1 - rasterise(...)))``)."""
    if len(strokes) == 0:
        return torch.zeros((0, 1, size, size), dtype=torch.uint8)
    ink = S.rasterise(list(strokes), size=size, line_width=line_width)
    return torch.from_numpy(np.round(255.0 * (1.0 - ink)).astype(np.uint8))[:, None]


def simplify_all(strokes: Sequence[np.ndarray | None], epsilon: float) -> list[np.ndarray | None]:
    """RDP-simplify (``epsilon`` > 0) and translate each sketch to start at the origin: the first stroke-3
    row is an offset from (0, 0), i.e. the sketch's absolute position, which the rasteriser discards (it
    fits the bounding box) and which would otherwise dominate the offset std."""
    out: list[np.ndarray | None] = []
    for s in strokes:
        if s is None:
            out.append(None)
            continue
        a = S.simplify_stroke3(s, epsilon) if epsilon > 0 else np.array(s, dtype=np.float32)
        if len(a):
            a[0, :2] = 0.0
        out.append(a)
    return out


def generator_config(p: GeneratorParams, image_size: int, teacher_params: dict | None = None) -> SketchGeneratorConfig:
    """G's architecture; ``teacher_params`` (teacher_pretrain's params) when the encoder is the photo teacher's."""
    encoder: dict[str, Any] = {}
    if p.encoder_init == "imagenet":
        encoder = {"encoder": "efficientnet_lite0", "freeze_encoder": p.freeze_encoder}
    elif p.encoder_init == "photo_teacher":
        backbone = (teacher_params or {}).get("backbone", {})
        if backbone.get("name") == "efficientnet_lite0":
            encoder = {"encoder": "efficientnet_lite0", "freeze_encoder": p.freeze_encoder}
        elif backbone.get("name") == "small_cnn":
            blocks = 1 + int(math.log2(p.feature_stride))
            if blocks > int(backbone["depth"]):
                raise ValueError(f"sketch_generator.feature_stride {p.feature_stride} needs {blocks} blocks of the "
                                 f"photo teacher, which has {backbone['depth']}")
            encoder = {"encoder": "small_cnn", "encoder_width": int(backbone["width"]),
                       "freeze_encoder": p.freeze_encoder}
        else:
            raise ValueError(f"sketch_generator.encoder_init photo_teacher needs a small_cnn or efficientnet_lite0 "
                             f"photo teacher, got {backbone.get('name')!r}")
    global_backbone = None
    if p.global_context == "photo_teacher":
        if not (teacher_params or {}).get("backbone"):
            raise ValueError("sketch_generator.global_context photo_teacher needs the teacher_pretrain stage's params")
        global_backbone = dict(teacher_params["backbone"])
    return SketchGeneratorConfig(
        image_size=image_size, in_channels=3, encoder_channels=tuple(p.encoder_channels),
        feature_stride=p.feature_stride, latent_dim=p.latent_dim, decoder_hidden=p.decoder_hidden,
        attention_dim=p.attention_dim, num_mixtures=p.num_mixtures, max_len=p.max_len, kl_floor=p.kl_floor,
        kl_weight=p.kl_weight, kl_weight_start=p.kl_weight_start, kl_anneal_steps=p.kl_anneal_steps,
        grad_clip=p.grad_clip, global_backbone=global_backbone, decoder_dropout=p.decoder_dropout, **encoder)


def copy_teacher_encoder(model: PhotoToSketchGenerator, teachers: TeacherSet, encoder: bool = True) -> None:
    """Copy the whole photo teacher's normalisation and backbone into G's global encoder (when G has one) and,
    with ``encoder``, its input normalisation and first conv blocks (small_cnn) or its stem and first stages
    (efficientnet_lite0) into G's encoder."""
    teacher = teachers.photo_teacher
    if model.global_encoder is not None:
        model.global_encoder.module[0].load_state_dict(teacher.normalise.state_dict())
        model.global_encoder.module[1].load_state_dict(teacher.backbone.state_dict())
    if not encoder:
        return
    encoder = model.encoder.module if isinstance(model.encoder, FrozenModule) else model.encoder
    normalise, features = encoder
    normalise.load_state_dict(teacher.normalise.state_dict())
    if model.config.encoder == "efficientnet_lite0":
        trunk, _ = efficientnet_trunk(teacher.backbone.net, model.config.feature_stride)
        features.load_state_dict(trunk.state_dict())
        return
    features.load_state_dict({k: v for k, v in teacher.backbone.features.state_dict().items()
                              if int(k.split(".")[0]) < len(features)})


def copy_imagenet_encoder(model: PhotoToSketchGenerator) -> None:
    """Load the packaged ImageNet EfficientNet-Lite0 weights into G's efficientnet_lite0 encoder (no download)."""
    encoder = model.encoder.module if isinstance(model.encoder, FrozenModule) else model.encoder
    trunk, _ = efficientnet_trunk(efficientnet_lite0(0, packaged_weights_file()), model.config.feature_stride)
    encoder[1].load_state_dict(trunk.state_dict())


class StrokeBank:
    """Padded stroke-5 tensors of a set of sketches; batches are trimmed to their longest sketch."""

    def __init__(self, strokes: Sequence[np.ndarray], max_len: int) -> None:
        x, lengths = S.pad_stroke5(list(strokes), max_len)
        self.x = torch.from_numpy(x)
        self.lengths = torch.from_numpy(lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.lengths[idx]
        return self.x[idx, : int(lengths.max()) + 1], lengths


def generator_pairs(ds, split: str, p: GeneratorParams, labelled_only: bool, workers: int = 0
                    ) -> tuple[ImageSet, torch.Tensor, list[np.ndarray]]:
    """Photos of ``split``, the photo row of every usable pair and its simplified strokes (images decoded
    on ``workers`` threads)."""
    photos = load_image_set(ds, "photos", [split], workers=workers)
    sketches = load_image_set(ds, "sketches", [split], with_strokes=True, workers=workers)
    s_rows, p_rows = fine_grained_pairs(sketches, photos, labelled_only)
    p_rows, strokes = paired_strokes(sketches, s_rows, p_rows, p.rdp_epsilon)
    return photos, p_rows, strokes


def paired_strokes(sketches: ImageSet, s_rows: torch.Tensor, p_rows: torch.Tensor, epsilon: float
                   ) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The pairs (sketch rows ``s_rows``, photo rows ``p_rows``) whose sketch keeps strokes after RDP
    simplification: (their photo rows, their simplified strokes)."""
    strokes = simplify_all([sketches.strokes[i] if sketches.strokes else None for i in s_rows.tolist()], epsilon)
    ok = [i for i, s in enumerate(strokes) if s is not None and len(s) > 0]
    return p_rows[ok], [strokes[i] for i in ok]


def _cosine_factor(step: int, total: int, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


# ----------------------------------------------------------------------------- the Ray loop
@dataclass
class GeneratorData:
    """G's training pairs (a stroke bank and the photo row of each sketch) and the evaluation pairs."""

    bank: StrokeBank
    photos: torch.Tensor  # G's input (float [0, 1]) of every train photo
    rows: torch.Tensor  # the photo row of each bank sketch
    offset_scale: Any  # the pooled std of the simplified training offsets
    image_size: int
    eval_bank: StrokeBank | None = None
    eval_photos: torch.Tensor | None = None
    eval_rows: torch.Tensor | None = None


def load_generator_data(dataset_dir: str, p: GeneratorParams, workers: int = 0) -> GeneratorData:
    ds = open_dataset(dataset_dir)
    photos, p_rows, strokes = generator_pairs(ds, "train", p, labelled_only=True, workers=workers)
    if not strokes:
        raise ValueError(f"{ds.root}: no labelled train pair with strokes to train the sketch generator on")
    data = GeneratorData(StrokeBank(strokes, p.max_len), photo_input(photos.images), p_rows,
                         S.stroke3_offset_std(strokes), int(photos.images.shape[-1]))
    if p.eval_pairs > 0:
        t_photos, t_rows, t_strokes = generator_pairs(ds, "test", p, labelled_only=False, workers=workers)
        data.eval_photos, data.eval_rows = photo_input(t_photos.images), t_rows[: p.eval_pairs]
        data.eval_bank = StrokeBank(t_strokes[: p.eval_pairs], p.max_len) if t_strokes[: p.eval_pairs] else None
    return data


def generator_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    dev = LoopDevice.from_config(config, device)
    p: GeneratorParams = config["params"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    data = load_generator_data(config["dataset_dir"], p, dev.decode_workers)
    needs_teacher = p.encoder_init == "photo_teacher" or p.global_context == "photo_teacher"
    teachers, blob = load_teachers(config["teachers_path"]) if needs_teacher else (None, {})
    cfg = generator_config(p, data.image_size, blob.get("params"))
    model = PhotoToSketchGenerator(cfg, offset_scale=data.offset_scale)
    if teachers is not None:
        copy_teacher_encoder(model, teachers, encoder=p.encoder_init == "photo_teacher")
    if p.encoder_init == "imagenet":
        copy_imagenet_encoder(model)
    model = model.to(device)
    opt = torch.optim.Adam([w for w in model.parameters() if w.requires_grad], lr=p.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_factor(s, p.steps, p.min_lr_ratio))
    state = rt.restore_into(model=model, optimizer=opt, scheduler=sched)
    start, history = (state["step"] + 1, state["history"]) if state else (0, [])
    rt.broadcast_module(model)
    gen = torch.Generator().manual_seed(seed * 7919 + 17 * rt.world()[0] + start)
    interval = IntervalMeans()
    for step in rt.progress(range(start, p.steps), total=p.steps - start, desc="sketch generator"):
        interval.add(train_step(model, opt, sched, data, p, gen, step, dev))
        last = step + 1 == p.steps
        if (step + 1) % p.history_every == 0 or last:  # a curve point: an all-reduce, no checkpoint
            history.append(curve_point(model, sched, data, interval, step, device))
            interval.reset()
        if ((step + 1) % p.log_every == 0 and history) or last:  # a report: a barrier + a checkpoint
            rt.report(history[-1], {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "step": step, "history": history,
                                    "params": p.model_dump(mode="json"), "config": cfg.to_dict(),
                                    "offset_scale": model.offset_scale.tolist(), "num_pairs": len(data.bank)})


def train_step(model: PhotoToSketchGenerator, opt: torch.optim.Optimizer, sched, data: GeneratorData,
               p: GeneratorParams, gen: torch.Generator, step: int, dev: LoopDevice) -> dict[str, float]:
    """One VAE step on a random batch of ``p.batch_size`` pairs (per worker, as in the other stages:
    more workers = a larger global batch); gradients clipped after the all-reduce."""
    model.train()
    idx = torch.randint(0, len(data.bank), (p.batch_size,), generator=gen)
    x, lengths = data.bank.batch(idx)
    with dev.autocast():  # the model computes its mixture and KL in fp32
        out = model.loss(dev.to(data.photos[data.rows[idx]]), dev.to(x), dev.to(lengths), step=step)
    terms = {k: out[k] for k in ("total", "gmm_nll", "pen_ce", "kl")}
    rt.check_finite(terms, step, "sketch_generator")
    dev.step(opt, out["total"], model, clip=model.clip_gradients)
    sched.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def curve_point(model: PhotoToSketchGenerator, sched, data: GeneratorData, interval: IntervalMeans, step: int,
                device) -> dict[str, float]:
    """The mean train losses since the last point and the evaluation pairs' loss, averaged over workers."""
    metrics = {f"train_{k}": v for k, v in interval.means().items()}
    if data.eval_bank is not None:
        metrics.update(_eval_loss(model, data.eval_bank, data.eval_photos, data.eval_rows, device))
    metrics = rt.mean_over_workers(metrics)
    metrics.update(step=step, seconds_per_step=interval.seconds_per_step(), lr=sched.get_last_lr()[0],
                   kl_weight=model.kl_weight_at(step))
    return metrics


@torch.no_grad()
def _eval_loss(model: PhotoToSketchGenerator, bank: StrokeBank, photo_f: torch.Tensor, p_rows: torch.Tensor,
               device) -> dict[str, float]:
    """VAE loss (final KL weight, latent = mu) on this rank's share of the evaluation pairs."""
    rank, world = rt.world()
    idx = torch.arange(rank, len(bank), world)
    if len(idx) == 0:
        idx = torch.arange(0, 1)
    model.eval()
    x, lengths = bank.batch(idx)
    out = model.loss(photo_f[p_rows[idx]].to(device), x.to(device), lengths.to(device), step=None)
    model.train()
    return {f"eval_{k}": float(out[k]) for k in ("total", "gmm_nll", "pen_ce", "kl")}


@torch.no_grad()
def photo_dependence(model: PhotoToSketchGenerator, bank: StrokeBank, photo_f: torch.Tensor, p_rows: torch.Tensor,
                     seed: int = 0) -> dict[str, float]:
    """Does G draw *its* photo? On pairs (``bank``, photos ``photo_f[p_rows]``), with the latent at mu:

    * ``photo_loss_gain``: the VAE loss with each sketch's photo swapped for another pair's photo, minus
      the loss with its own photo (nats per row; 0 = G ignores the photo);
    * ``attention_entropy``: the mean entropy of the attention map over the real rows, as a share of
      log(H*W) (1 = uniform attention, a map that looks nowhere in particular)."""
    if len(bank) < 2:
        return {}
    model.eval()
    idx = torch.arange(len(bank))
    x, lengths = bank.batch(idx)
    device = next(model.parameters()).device
    x, lengths = x.to(device), lengths.to(device)
    own = photo_f[p_rows].to(device)
    perm = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))
    perm = torch.where(perm == idx, (perm + 1) % len(bank), perm)  # no pair keeps its own photo
    shuffled = own[perm.to(device)]
    loss_own = float(model.loss(own, x, lengths)["total"])
    loss_shuffled = float(model.loss(shuffled, x, lengths)["total"])
    attn = model(own, x[:, :-1], latent="mean")["attention"].clamp_min(1e-12)  # (B, T, H*W)
    ent = -(attn * attn.log()).sum(-1) / math.log(attn.shape[-1]) if attn.shape[-1] > 1 else attn.new_zeros(attn.shape[:2])
    real = torch.arange(ent.shape[1], device=device).view(1, -1) < lengths.view(-1, 1)
    return {"photo_loss_own": round(loss_own, 4), "photo_loss_shuffled": round(loss_shuffled, 4),
            "photo_loss_gain": round(loss_shuffled - loss_own, 4),
            "attention_entropy": round(float(ent[real].mean()), 4), "attention_cells": int(attn.shape[-1])}


# ----------------------------------------------------------------------------- the stage body
@torch.no_grad()
def draw(model: PhotoToSketchGenerator, photos_u8: torch.Tensor, temperature: float, greedy: bool = False,
         seed: int = 0, batch_size: int = 256, pen_temperature: float | None = None) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    """One generated sketch per photo: (stroke-3 list, log-likelihood (N,), lengths (N,) incl. the end row)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out_strokes: list[np.ndarray] = []
    lps, lens = [], []
    model.eval()
    for i in range(0, len(photos_u8), batch_size):
        s5, lengths, lp = model.sample(photo_input(photos_u8[i : i + batch_size]).to(device),
                                       temperature=temperature, greedy=greedy, generator=gen,
                                       pen_temperature=pen_temperature)
        out_strokes += model.to_stroke3(s5, lengths)
        lps.append(lp.cpu())
        lens.append(lengths.cpu())
    if not lps:
        return [], torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return out_strokes, torch.cat(lps), torch.cat(lens)


@rt.with_worker_threads
def run_sketch_generator(ctx) -> dict[str, Any]:
    """Stage body: train G on Ray; write ``generator.pt``, curves, samples and metrics."""
    p: GeneratorParams = ctx.params.sketch_generator
    dataset_dir = ctx.path(ctx.params.dataset_dir)
    ds = open_dataset(dataset_dir)  # fail fast, before Ray starts
    config: dict[str, Any] = {"params": p, "seed": ctx.params.seed, "dataset_dir": str(dataset_dir)}
    if p.encoder_init == "photo_teacher" or p.global_context == "photo_teacher":
        config["teachers_path"] = str(ctx.input("teacher_pretrain", "teachers.pt"))
    outcome = ctx.train(generator_loop, config)
    state = outcome.state
    torch.save({k: state[k] for k in ("model", "optimizer", "scheduler", "step", "params", "config", "offset_scale",
                                      "num_pairs")}, ctx.tmp_out / "generator.pt")
    model, _ = load_generator(ctx.tmp_out / "generator.pt")
    metrics = write_samples(ctx, ds, p, model)
    data = load_generator_data(str(dataset_dir), p)
    if data.eval_bank is not None:  # on the test pairs G never trained on
        metrics.update(photo_dependence(model, data.eval_bank, data.eval_photos, data.eval_rows, ctx.params.seed))
    history = state["history"]
    last = history[-1]
    keys = [k for k in last if k.startswith(("train_", "eval_"))]
    metrics.update({k: round(float(last[k]), 4) for k in keys})
    metrics.update(steps=state["step"] + 1, num_pairs=state["num_pairs"],
                   offset_scale=round(float(state["offset_scale"][0]), 4),
                   seconds_per_step=round(last["seconds_per_step"], 4), train_seconds=round(outcome.seconds, 1),
                   resumed=outcome.resumed)
    return ctx.write_training_outputs(history, metrics, curves=keys, title="sketch_generator (VAE loss)",
                                      xlabel=f"interval of {p.history_every} steps")


def write_samples(ctx, ds, p: GeneratorParams, model: PhotoToSketchGenerator) -> dict[str, Any]:
    """samples.png: test photos, two generated sketches each, a greedy one and the real sketch (one
    rasteriser for all); returns the preview's mean point counts."""
    from sbir.plots import image_grid

    t_photos, t_rows, t_strokes = generator_pairs(ds, "test", p, labelled_only=False)
    n = min(p.num_preview, len(t_strokes))
    if not n:
        return {}
    size = int(load_image_set(ds, "sketches", ["test"]).images.shape[-1])
    pick = torch.linspace(0, len(t_strokes) - 1, n).round().long()
    ph = t_photos.images[t_rows[pick]]
    gen_a, _, _ = draw(model, ph, p.preview_temperature, seed=ctx.params.seed,
                       pen_temperature=p.preview_pen_temperature)
    gen_b, _, _ = draw(model, ph, p.preview_temperature, seed=ctx.params.seed + 1,
                       pen_temperature=p.preview_pen_temperature)
    gen_g, _, _ = draw(model, ph, 1.0, greedy=True)
    real = [t_strokes[i] for i in pick.tolist()]
    imgs = [render_sketches(s, size, 1.0) for s in (gen_a, gen_b, gen_g, real)]
    rows = [[ph[i].permute(1, 2, 0).numpy()] + [im[i, 0].numpy() for im in imgs] for i in range(n)]
    image_grid(rows, ctx.tmp_out / "samples.png",
               col_labels=["photo", f"G T={p.preview_temperature}", f"G T={p.preview_temperature}", "G greedy", "real"],
               title="sketch_generator on test photos")
    return {"preview_mean_points_generated": round(float(np.mean([len(s) for s in gen_a])), 1),
            "preview_mean_points_real": round(float(np.mean([len(s) for s in real])), 1)}
