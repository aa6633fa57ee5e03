"""upper_bound: the data-dependent upper bound of CrossX-DFL.

The students' architecture (photo + sketch encoder) with every layer trainable, trained on the real
training images with their labels and augmentation: a standard category-level SBIR model, the ceiling
a data-free method is measured against. A share of the training sketches and photos is held out;
the validation mAP@all (held-out sketches -> held-out photos) is measured every ``eval_every`` steps,
training stops when it has not improved for ``patience`` points, and the best students are written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from sbir.config import UpperBoundParams
from sbir.data.datasets import ImageSet, load_image_set
from sbir.data.format import open_dataset
from sbir.dfsbir import losses as L
from sbir.dfsbir.distill import add_to, build_student_side, student_losses, weighted_total
from sbir.dfsbir.teacher import augment
from sbir.metrics import category_retrieval_metrics
from sbir.models.backbones import EncoderPair, embed, resize, to_float
from sbir.models.checkpoints import load_teachers
from sbir.train import runtime as rt
from sbir.train.precision import LoopDevice


def holdout_split(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): ``share`` of each class held out, chosen by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = max(1, int(round(share * len(idx)))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def split_known(photos: ImageSet, sketches: ImageSet, teachers, share: float, seed: int
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, validation) indices of the photos and of the sketches. In the class-split studies the
    upper bound sees only what the teachers saw (each modality the classes its teacher was trained
    on) and validates on the classes both know."""
    known_p, known_s = teachers.photo_teacher.known.cpu(), teachers.sketch_teacher.known.cpu()
    out = []
    for images, known, other, salt in ((photos, known_p, known_s, 0), (sketches, known_s, known_p, 1)):
        rows = torch.nonzero(known[images.labels]).flatten()
        train, val = holdout_split(images.labels[rows], share, seed + salt)
        val = val[other[images.labels[rows[val]]]]  # validation pairs need both modalities
        out.append((rows[train], rows[val]))
    return out[0], out[1]


@dataclass
class LabelledPairs:
    """Real training sketches, each paired with a random training photo of its class (category level)."""

    photos: ImageSet
    sketches: ImageSet
    photo_idx: torch.Tensor
    sketch_idx: torch.Tensor
    size: int

    def __post_init__(self) -> None:
        labels = self.photos.labels[self.photo_idx]
        self.by_class = {c: self.photo_idx[labels == c] for c in labels.unique().tolist()}

    def batch(self, n: int, gen: torch.Generator, augmented: bool) -> tuple[torch.Tensor, ...]:
        """(photos, sketches, photo labels, sketch labels). A sketch whose class has no training photo
        (a class only the sketch teacher knows, in the class-split studies) gets any photo."""
        sb = self.sketch_idx[torch.randint(0, len(self.sketch_idx), (n,), generator=gen)]
        labels_s = self.sketches.labels[sb]
        pb = torch.stack([self._photo_of(c, gen) for c in labels_s.tolist()])
        x_p = resize(to_float(self.photos.images[pb]), self.size)
        x_s = resize(to_float(self.sketches.images[sb]), self.size)
        if augmented:
            x_p, x_s = augment(x_p, gen), augment(x_s, gen)
        return x_p, x_s, self.photos.labels[pb], labels_s

    def _photo_of(self, c: int, gen: torch.Generator) -> torch.Tensor:
        rows = self.by_class.get(c, self.photo_idx)
        return rows[torch.randint(0, len(rows), (1,), generator=gen)][0]


def validation_map(students: EncoderPair, photos: ImageSet, sketches: ImageSet, photo_idx: torch.Tensor,
                   sketch_idx: torch.Tensor, size: int, device: torch.device) -> float:
    """mAP@all of held-out sketches against held-out photos."""
    students.eval()
    with torch.no_grad():
        q = embed(lambda x: students.sketch_encoder(x.to(device)).cpu(), sketches.images[sketch_idx], size=size)
        g = embed(lambda x: students.photo_encoder(x.to(device)).cpu(), photos.images[photo_idx], size=size)
    students.train()
    return category_retrieval_metrics(q, sketches.labels[sketch_idx], g, photos.labels[photo_idx])["mAP@all"]


def upper_bound_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    dev = LoopDevice.from_config(config, device)
    p: UpperBoundParams = config["params"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    teachers, blob = load_teachers(config["teachers_path"], device)
    size = int(blob["params"]["image_size"])
    students, proxies, opt = build_student_side(p, teachers, blob, seed, device, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.max_steps)
    ds = open_dataset(config["dataset_dir"])
    photos = load_image_set(ds, "photos", ["train"], workers=dev.decode_workers)
    sketches = load_image_set(ds, "sketches", ["train"], workers=dev.decode_workers)
    (p_train, p_val), (s_train, s_val) = split_known(photos, sketches, teachers, p.val_share, seed)
    pairs = LabelledPairs(photos, sketches, p_train, s_train, size)
    state = rt.restore_into(students=students, proxies=proxies, optimizer=opt, scheduler=sched)
    start, history = (state["step"] + 1, state["history"]) if state else (0, [])
    best = state["best"] if state else {"val_mAP": -1.0, "step": -1, "students": None}
    for module in (students, proxies):
        rt.broadcast_module(module)
    gen = torch.Generator().manual_seed(seed * 31 + rt.world()[0])
    sums: dict[str, float] = {}
    t0 = time.time()
    for step in rt.progress(range(start, p.max_steps), total=p.max_steps - start, desc="upper_bound"):
        train_step(students, proxies, opt, teachers, pairs, p, gen, step, sums, dev)
        sched.step()
        if (step + 1) % p.eval_every and step + 1 != p.max_steps:
            continue
        val = rt.mean_over_workers({"val": validation_map(students, photos, sketches, p_val, s_val, size, device)})
        if val["val"] > best["val_mAP"]:
            best = {"val_mAP": val["val"], "step": step, "students": _copy_state(students),
                    "proxies": _copy_state(proxies)}
        metrics = {**rt.mean_over_workers({k: v / p.eval_every for k, v in sums.items()}), "val_mAP@all": val["val"],
                   "best_val_mAP@all": best["val_mAP"], "step": step,
                   "seconds_per_step": (time.time() - t0) / p.eval_every}
        history.append(metrics)
        rt.report(metrics, {"students": students.state_dict(), "proxies": proxies.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                            "history": history, "best": best, "params": p.model_dump(mode="json"),
                            "num_classes": blob["num_classes"]})
        sums, t0 = {}, time.time()
        if (step - best["step"]) >= p.patience * p.eval_every:
            break  # validation flat for `patience` points: every worker sees the same averaged curve


def train_step(students: EncoderPair, proxies: L.StudentProxies, opt: torch.optim.Optimizer, teachers,
               pairs: LabelledPairs, p: UpperBoundParams, gen: torch.Generator, step: int, sums: dict[str, float],
               dev: LoopDevice) -> None:
    x_p, x_s, labels_p, labels_s = (dev.to(t) for t in pairs.batch(p.batch_size, gen, p.augment))
    with dev.autocast():
        terms = student_losses(students, proxies, teachers, x_p, x_s, p, labels_p, labels_s)
        total = weighted_total(terms, p)
    rt.check_finite({**terms, "total": total}, step, "upper_bound")
    dev.step(opt, total, [students, proxies])
    add_to(sums, "student_", {**terms, "total": total}, 1)


def _copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


def run_upper_bound(ctx) -> dict[str, Any]:
    """Stage body: train the upper bound on Ray, write the best students (by validation mAP@all)."""
    p: UpperBoundParams = ctx.params.upper_bound
    config = {"params": p, "seed": ctx.params.seed, "dataset_dir": str(ctx.path(ctx.params.dataset_dir)),
              "teachers_path": str(ctx.input("teacher_pretrain", "teachers.pt"))}
    outcome = ctx.train(upper_bound_loop, config)
    state, best = outcome.state, outcome.state["best"]
    torch.save({"students": best["students"], "proxies": best["proxies"], "round": best["step"],
                "params": state["params"], "source": "real", "num_classes": state["num_classes"]},
               ctx.tmp_out / "students.pt")
    history = state["history"]
    metrics = {"best_val_mAP@all": round(best["val_mAP"], 4), "best_step": best["step"] + 1,
               "steps": state["step"] + 1, "stopped_early": state["step"] + 1 < p.max_steps,
               "seconds_per_step": round(history[-1]["seconds_per_step"], 4),
               "train_seconds": round(outcome.seconds, 1), "resumed": outcome.resumed}
    return ctx.write_training_outputs(history, metrics, title="upper_bound (validation mAP@all and losses)",
                                      xlabel="step")
