"""teacher_pretrain: the photo classifier, the sketch classifier and the modality guidance network.

Two *independent* classifiers (photos only / sketches only): the authors' code trains one unified
classifier on both modalities, which breaks the data-free premise. The modality network (photo vs
sketch) is trained here too, on unpaired images of both modalities, and frozen afterwards.

All three train in one Ray Train job (one fit per stage keeps Ray's fixed start-up cost low).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbir.config import TeacherParams
from sbir.data.datasets import ImageSet, load_image_set
from sbir.data.format import open_dataset
from sbir.models.backbones import channel_stats, resize, to_float
from sbir.models.checkpoints import TeacherSet
from sbir.train import runtime as rt
from sbir.train.precision import LoopDevice

PHOTO, SKETCH = 0, 1


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


@dataclass
class TeacherData:
    photos: ImageSet
    sketches: ImageSet
    photos_test: ImageSet
    sketches_test: ImageSet


def of_classes(images: ImageSet, classes: list[int] | None) -> ImageSet:
    """The images whose label is in ``classes`` (all when None)."""
    if classes is None:
        return images
    return images.subset(torch.nonzero(torch.isin(images.labels, torch.tensor(classes))).flatten())


def check_class_lists(p: TeacherParams, num_classes: int, where: str) -> None:
    for key in ("photo_classes", "sketch_classes"):
        bad = [c for c in getattr(p, key) or [] if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"{where}: teacher_pretrain.{key} has class ids {bad} outside 0..{num_classes - 1}")


def load_teacher_data(dataset_dir: str, p: TeacherParams, workers: int = 0) -> tuple[TeacherData, Any]:
    """Train and test images of the classes each teacher is trained on (decoded on ``workers`` threads)."""
    ds = open_dataset(dataset_dir)
    check_class_lists(p, ds.num_classes, str(ds.root))

    def part(table: str, split: str) -> ImageSet:
        return of_classes(load_image_set(ds, table, [split], workers=workers),
                          p.photo_classes if table == "photos" else p.sketch_classes)

    data = TeacherData(photos=part("photos", "train"), sketches=part("sketches", "train"),
                       photos_test=part("photos", "test"), sketches_test=part("sketches", "test"))
    if len(data.photos) == 0 or len(data.sketches) == 0:
        raise ValueError(f"{ds.root}: teacher_pretrain needs train photos and sketches "
                         f"(found {len(data.photos)} photos, {len(data.sketches)} sketches)")
    return data, ds


def set_normalisation(teachers: TeacherSet, data: TeacherData) -> None:
    """Each network normalises with the statistics of what it is trained on."""
    photo_stats, sketch_stats = channel_stats(data.photos.images), channel_stats(data.sketches.images)
    teachers.photo_teacher.normalise.set_stats(*photo_stats)
    teachers.sketch_teacher.normalise.set_stats(*sketch_stats)
    teachers.modality_net.normalise.set_stats((photo_stats[0] + sketch_stats[0]) / 2,
                                              (photo_stats[1] + sketch_stats[1]) / 2)


def parameter_groups(teachers: TeacherSet, p: TeacherParams) -> list[dict[str, Any]]:
    """The classifiers' backbones at lr * backbone_lr_scale, everything else at lr (one group when 1)."""
    backbones = [w for net in (teachers.photo_teacher, teachers.sketch_teacher) for w in net.backbone.parameters()]
    if p.backbone_lr_scale == 1.0:
        return [{"params": list(teachers.parameters()), "lr": p.lr}]
    ids = {id(w) for w in backbones}
    return [{"params": backbones, "lr": p.lr * p.backbone_lr_scale},
            {"params": [w for w in teachers.parameters() if id(w) not in ids], "lr": p.lr}]


def teacher_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    dev = LoopDevice.from_config(config, device)
    p: TeacherParams = config["params"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    data, ds = load_teacher_data(config["dataset_dir"], p, dev.decode_workers)
    teachers = TeacherSet(p, ds.num_classes)
    set_normalisation(teachers, data)
    teachers.to(device)
    opt = torch.optim.AdamW(parameter_groups(teachers, p), lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = max(1, len(data.photos) // (p.batch_size * rt.world()[1]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=p.epochs * steps_per_epoch, pct_start=0.2)
    state = rt.restore_into(model=teachers, optimizer=opt, scheduler=sched)
    start_epoch, history = (state["epoch"] + 1, state["history"]) if state else (0, [])
    rt.broadcast_module(teachers)
    gen = torch.Generator().manual_seed(seed + 1000 * rt.world()[0])
    for epoch in rt.progress(range(start_epoch, p.epochs), total=p.epochs - start_epoch, desc="teachers"):
        t0 = time.time()
        metrics = train_one_epoch(teachers, opt, sched, data, p, epoch, seed, gen, dev, steps_per_epoch)
        metrics.update(evaluate_teachers(teachers, data, p.image_size, device))  # fp32
        metrics.update(epoch=epoch, epoch_seconds=time.time() - t0, lr=sched.get_last_lr()[-1])
        history.append(metrics)
        rt.report(metrics, {"model": teachers.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                            "params": p.model_dump(mode="json"), "num_classes": ds.num_classes,
                            "class_names": ds.class_names})


def train_one_epoch(teachers: TeacherSet, opt, sched, data: TeacherData, p: TeacherParams, epoch: int, seed: int,
                    gen: torch.Generator, dev: LoopDevice, steps_per_epoch: int) -> dict[str, float]:
    """One epoch over this rank's photo batches, each with a sketch batch; mean losses over workers."""
    teachers.train()
    if p.freeze_bn_stats:
        for net in (teachers.photo_teacher, teachers.sketch_teacher):
            for m in net.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
    sums = {"photo_ce": 0.0, "sketch_ce": 0.0, "modality_ce": 0.0}
    photos, sketches = data.photos, data.sketches
    sketch_iter = iter(rt.shard_indices(len(sketches), p.batch_size, epoch, seed + 1))
    n_steps = 0
    for pb in rt.shard_indices(len(photos), p.batch_size, epoch, seed):
        try:
            sb = next(sketch_iter)
        except StopIteration:
            sketch_iter = iter(rt.shard_indices(len(sketches), p.batch_size, epoch + 10_000, seed + 1))
            sb = next(sketch_iter)
        xp = resize(to_float(photos.images[pb]), p.image_size)
        xs = resize(to_float(sketches.images[sb]), p.image_size)
        if p.augment:
            xp, xs = augment(xp, gen), augment(xs, gen)
        xp, xs = dev.to(xp), dev.to(xs)
        yp, ys = dev.to(photos.labels[pb]), dev.to(sketches.labels[sb])
        ym = dev.to(torch.cat([torch.full((len(xp),), PHOTO), torch.full((len(xs),), SKETCH)]))
        with dev.autocast():  # cross_entropy runs in fp32 under autocast, on CPU and CUDA
            losses = {
                "photo_ce": F.cross_entropy(teachers.photo_teacher(xp), yp, label_smoothing=p.label_smoothing),
                "sketch_ce": F.cross_entropy(teachers.sketch_teacher(xs), ys, label_smoothing=p.label_smoothing),
                "modality_ce": F.cross_entropy(teachers.modality_net(torch.cat([xp, xs])), ym),
            }
        rt.check_finite(losses, epoch * steps_per_epoch + n_steps, "teacher_pretrain")
        dev.step(opt, sum(losses.values()), teachers)
        sched.step()
        for k, v in losses.items():
            sums[k] += float(v.detach())
        n_steps += 1
    return rt.mean_over_workers({k: v / max(1, n_steps) for k, v in sums.items()})


def evaluate_teachers(teachers: TeacherSet, data: TeacherData, size: int, device: torch.device) -> dict[str, float]:
    """Test accuracy of the three networks, summed over every worker's share."""
    teachers.eval()
    counts = {}
    mod_imgs = torch.cat([data.photos_test.images, data.sketches_test.images.expand(-1, 3, -1, -1)])
    mod_labels = torch.cat([torch.full((len(data.photos_test),), PHOTO),
                            torch.full((len(data.sketches_test),), SKETCH)])
    for name, net, imgs, labels in (
            ("photo_teacher", teachers.photo_teacher, data.photos_test.images, data.photos_test.labels),
            ("sketch_teacher", teachers.sketch_teacher, data.sketches_test.images, data.sketches_test.labels),
            ("modality_net", teachers.modality_net, mod_imgs, mod_labels)):
        counts[f"{name}_correct"], counts[f"{name}_total"] = accuracy(net, imgs, labels, size, device)
    summed = {k: v * rt.world()[1] for k, v in rt.mean_over_workers(counts).items()}
    return {f"{name}_test_acc": summed[f"{name}_correct"] / max(1.0, summed[f"{name}_total"])
            for name in ("photo_teacher", "sketch_teacher", "modality_net")}


def run_teacher_pretrain(ctx) -> dict[str, Any]:
    """Stage body: train the three networks on Ray, write ``teachers.pt`` + metrics + curves."""
    p = ctx.params.teacher_pretrain
    dataset_dir = ctx.path(ctx.params.dataset_dir)
    check_class_lists(p, open_dataset(dataset_dir).num_classes, str(dataset_dir))  # fail fast, before Ray starts
    outcome = ctx.train(teacher_loop, {"params": p, "seed": ctx.params.seed, "dataset_dir": str(dataset_dir)})
    state = outcome.state
    torch.save({k: state[k] for k in ("model", "optimizer", "scheduler", "epoch", "params", "num_classes", "class_names")},
               ctx.tmp_out / "teachers.pt")
    last = state["history"][-1]
    metrics = {k: round(last[k], 4) for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc", "modality_net_test_acc")}
    metrics.update(chance_acc=round(1.0 / state["num_classes"], 4), epochs=p.epochs,
                   train_seconds=round(outcome.seconds, 1), resumed=outcome.resumed)
    return ctx.write_training_outputs(state["history"], metrics, title="teacher_pretrain", xlabel="epoch",
                                      curves=["photo_ce", "sketch_ce", "modality_ce", "photo_teacher_test_acc",
                                              "sketch_teacher_test_acc"])
