"""teacher_pretrain: the photo classifier, the sketch classifier and the modality guidance network.

Two *independent* classifiers (photos only / sketches only): the authors' code trains one unified
classifier on both modalities, which breaks the data-free premise. The modality network (photo vs
sketch) is trained here too, on unpaired images of both modalities, and frozen afterwards.

All three train in one Ray Train job (one fit per stage keeps Ray's fixed start-up cost low).
"""
from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbir.config import TeacherParams
from sbir.data.datasets import load_image_set
from sbir.data.format import open_dataset
from sbir.models.backbones import Classifier, channel_stats, resize, to_float
from sbir.train import runtime as rt

PHOTO, SKETCH = 0, 1


class TeacherSet(nn.Module):
    def __init__(self, p: TeacherParams, num_classes: int) -> None:
        super().__init__()
        self.photo_teacher = Classifier(p.backbone, num_classes)
        self.sketch_teacher = Classifier(p.backbone, num_classes)
        self.modality_net = Classifier(p.modality_backbone, 2)


def build_teachers(p: TeacherParams, num_classes: int) -> TeacherSet:
    return TeacherSet(p, num_classes)


def load_teachers(path: str, device: torch.device | str = "cpu") -> tuple[TeacherSet, dict[str, Any]]:
    """Load the teacher checkpoint written by teacher_pretrain; all three nets frozen in eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    p = TeacherParams.model_validate(blob["params"])
    teachers = build_teachers(p, blob["num_classes"])
    teachers.load_state_dict(blob["model"])
    teachers.eval().requires_grad_(False).to(device)
    return teachers, blob


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shift (pad + crop) and horizontal flip, batched."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int, device: torch.device,
             batch: int = 512) -> tuple[int, int]:
    """(correct, total) over this rank's share of a test set."""
    rank, world = rt.world()
    idx = torch.arange(rank, len(images), world)
    correct = 0
    for i in range(0, len(idx), batch):
        b = idx[i : i + batch]
        x = resize(to_float(images[b]), size).to(device)
        correct += int((model(x).argmax(1).cpu() == labels[b]).sum())
    return correct, len(idx)


def teacher_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    p = TeacherParams.model_validate(config["params"])
    seed = int(config["seed"])
    torch.manual_seed(seed)
    ds = open_dataset(config["dataset_dir"])
    photos = load_image_set(ds, "photos", ["train"])
    sketches = load_image_set(ds, "sketches", ["train"])
    photos_test = load_image_set(ds, "photos", ["test"])
    sketches_test = load_image_set(ds, "sketches", ["test"])
    if len(photos) == 0 or len(sketches) == 0:
        raise ValueError(f"{ds.root}: teacher_pretrain needs train photos and sketches "
                         f"(found {len(photos)} photos, {len(sketches)} sketches)")
    teachers = build_teachers(p, ds.num_classes)
    # each network normalises with the statistics of what it is trained on
    teachers.photo_teacher.normalise.set_stats(*channel_stats(photos.images))
    teachers.sketch_teacher.normalise.set_stats(*channel_stats(sketches.images))
    both_mean = (channel_stats(photos.images)[0] + channel_stats(sketches.images)[0]) / 2
    both_std = (channel_stats(photos.images)[1] + channel_stats(sketches.images)[1]) / 2
    teachers.modality_net.normalise.set_stats(both_mean, both_std)
    teachers.to(device)
    opt = torch.optim.AdamW(teachers.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = max(1, len(photos) // (p.batch_size * rt.world()[1]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.epochs * steps_per_epoch, pct_start=0.2)
    start_epoch, history = 0, []
    state = rt.restore()
    if state is not None:
        teachers.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    rt.broadcast_module(teachers)
    gen = torch.Generator().manual_seed(seed + 1000 * rt.world()[0])
    run = config.get("mlflow_run")
    for epoch in range(start_epoch, p.epochs):
        teachers.train()
        t0 = time.time()
        sums = {"photo_ce": 0.0, "sketch_ce": 0.0, "modality_ce": 0.0}
        sketch_batches = rt.shard_indices(len(sketches), p.batch_size, epoch, seed + 1)
        sketch_iter = iter(sketch_batches)
        n_steps = 0
        for pb in rt.progress(rt.shard_indices(len(photos), p.batch_size, epoch, seed),
                              total=steps_per_epoch, desc=f"teachers epoch {epoch}"):
            try:
                sb = next(sketch_iter)
            except StopIteration:
                sketch_iter = iter(rt.shard_indices(len(sketches), p.batch_size, epoch + 10_000, seed + 1))
                sb = next(sketch_iter)
            xp = resize(to_float(photos.images[pb]), p.image_size)
            xs = resize(to_float(sketches.images[sb]), p.image_size)
            if p.augment:
                xp, xs = augment(xp, gen), augment(xs, gen)
            xp, xs = xp.to(device), xs.to(device)
            yp, ys = photos.labels[pb].to(device), sketches.labels[sb].to(device)
            losses = {
                "photo_ce": F.cross_entropy(teachers.photo_teacher(xp), yp, label_smoothing=p.label_smoothing),
                "sketch_ce": F.cross_entropy(teachers.sketch_teacher(xs), ys, label_smoothing=p.label_smoothing),
            }
            xm = torch.cat([xp, xs])
            ym = torch.cat([torch.full((len(xp),), PHOTO), torch.full((len(xs),), SKETCH)]).to(device)
            losses["modality_ce"] = F.cross_entropy(teachers.modality_net(xm), ym)
            rt.check_finite(losses, epoch * steps_per_epoch + n_steps, "teacher_pretrain")
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            rt.sync_gradients(teachers)
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] += float(v.detach())
            n_steps += 1
        teachers.eval()
        counts = {}
        for name, net, imgs, labels in (("photo_teacher", teachers.photo_teacher, photos_test.images, photos_test.labels),
                                        ("sketch_teacher", teachers.sketch_teacher, sketches_test.images, sketches_test.labels)):
            c, n = accuracy(net, imgs, labels, p.image_size, device)
            counts[f"{name}_correct"], counts[f"{name}_total"] = c, n
        mod_imgs = torch.cat([photos_test.images, sketches_test.images.expand(-1, 3, -1, -1)])
        mod_labels = torch.cat([torch.full((len(photos_test),), PHOTO), torch.full((len(sketches_test),), SKETCH)])
        counts["modality_net_correct"], counts["modality_net_total"] = accuracy(teachers.modality_net, mod_imgs, mod_labels, p.image_size, device)
        summed = {k: v * rt.world()[1] for k, v in rt.mean_over_workers(counts).items()}
        metrics = {k: v / max(1, n_steps) for k, v in sums.items()}
        metrics = rt.mean_over_workers(metrics)
        for name in ("photo_teacher", "sketch_teacher", "modality_net"):
            metrics[f"{name}_test_acc"] = summed[f"{name}_correct"] / max(1.0, summed[f"{name}_total"])
        metrics.update(epoch=epoch, epoch_seconds=time.time() - t0, lr=sched.get_last_lr()[0])
        history.append(metrics)
        if run is not None and rt.is_rank0():
            run.log_metrics(metrics, step=epoch)
        rt.report(metrics, {"model": teachers.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                            "params": p.model_dump(mode="json"), "num_classes": ds.num_classes,
                            "class_names": ds.class_names})


def run_teacher_pretrain(ctx) -> dict[str, Any]:
    """Stage body: train the three networks on Ray, write ``teachers.pt`` + metrics + curves."""
    from sbir.plots import plot_loss_curves

    p = ctx.params.teacher_pretrain
    dataset_dir = ctx.path(ctx.params.dataset_dir)
    open_dataset(dataset_dir)  # fail fast and clearly before Ray starts
    config = {"params": p.model_dump(mode="json"), "seed": ctx.params.seed, "dataset_dir": str(dataset_dir),
              "mlflow_run": ctx.run}
    outcome = rt.run_training("teacher_pretrain", teacher_loop, config, ctx.params.ray,
                              ctx.params_digest(p), resume=ctx.resume)
    state = outcome.state
    torch.save({k: state[k] for k in ("model", "optimizer", "scheduler", "epoch", "params", "num_classes", "class_names")},
               ctx.tmp_out / "teachers.pt")
    history = state["history"]
    (ctx.tmp_out / "history.json").write_text(json.dumps(history, indent=2))
    plot_loss_curves({k: [h[k] for h in history] for k in ("photo_ce", "sketch_ce", "modality_ce",
                                                          "photo_teacher_test_acc", "sketch_teacher_test_acc")},
                     ctx.tmp_out / "curves.png", title="teacher_pretrain", xlabel="epoch")
    last = history[-1]
    metrics = {k: round(last[k], 4) for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc", "modality_net_test_acc")}
    metrics.update(chance_acc=round(1.0 / state["num_classes"], 4), epochs=p.epochs,
                   train_seconds=round(outcome.seconds, 1), resumed=outcome.resumed)
    (ctx.tmp_out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
