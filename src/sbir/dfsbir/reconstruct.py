"""reconstruct: data-free estimation of class-aligned photo/sketch pairs from the frozen teachers.

Reads only the teacher checkpoint and params (no dataset: the data-free guarantee). Trains the photo
and sketch estimators with the objective of METHOD.md and writes them plus a Parquet bank of
reconstructed pairs and a per-class PNG grid. The adversarial hardness term needs students, which
do not exist yet here; it becomes active in ``distill`` (its weight and bound are distill params),
which continues the alternation. ``synthesis: fast`` is a short run of the same objective (fewer, smaller
steps at a higher lr, a smaller bank, by default the pairs made while training: :class:`SynthesisPool`)
after which distill learns from the bank alone.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from sbir.config import ReconstructParams, ReptileSynthesisParams
from sbir.data.format import decode_image, encode_png
from sbir.dfsbir import losses as L
from sbir.models.checkpoints import TeacherSet, load_teachers
from sbir.models.estimators import EstimatorPair
from sbir.train import runtime as rt
from sbir.train.precision import LoopDevice

BANK_SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("condition", pa.int32()), ("photo_teacher_label", pa.int32()),
    ("sketch_teacher_label", pa.int32()), ("photo_teacher_conf", pa.float32()), ("sketch_teacher_conf", pa.float32()),
    ("photo", pa.binary()), ("sketch", pa.binary()),
])


class EstimatorObjective:
    """Every term of the estimator objective on one batch of reconstructed pairs."""

    def __init__(self, teachers: TeacherSet, p: ReconstructParams, adversarial_weight: float = 0.0,
                 adversarial_bound: float = 2.0) -> None:
        self.teachers, self.p = teachers, p
        # the hardness term (weight 0 without students: reconstruct) acts in distill, with distill's params
        self.weights = {**p.weights.model_dump(), "adversarial": adversarial_weight}
        self.adversarial_bound = adversarial_bound
        self.w = p.weights
        self.bn_priors = ([L.BNStatsPrior(teachers.photo_teacher), L.BNStatsPrior(teachers.sketch_teacher)]
                          if self.w.bn_prior > 0 else [])

    def __call__(self, x_p: torch.Tensor, x_s: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                 students: nn.Module | None = None, proxies: tuple[torch.Tensor, torch.Tensor] | None = None,
                 proxy_scale: float = 16.0) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        t, w = self.teachers, self.w
        with contextlib.ExitStack() as priors:  # the BN prior's statistics: of these two passes only
            for prior in self.bn_priors:
                priors.enter_context(prior.collecting())
            f_p, f_s = t.photo_teacher.features(x_p), t.sketch_teacher.features(x_s)
        l_p, l_s = t.photo_teacher.logits(f_p), t.sketch_teacher.logits(f_s)
        # class-split studies: each teacher judges only the classes it knows; alignment needs both, and compares
        # the two distributions over the classes both know (the masked ones have no common support: KL explodes)
        known_p, known_s = t.photo_teacher.known[y], t.sketch_teacher.known[y]
        shared = t.photo_teacher.known & t.sketch_teacher.known
        terms = {
            "semantic_ce": on_rows(known_p, L.semantic_ce, l_p, y) + on_rows(known_s, L.semantic_ce, l_s, y),
            "class_balance": L.class_balance(l_p) + L.class_balance(l_s),
            "activation": L.activation(f_p) + L.activation(f_s),
        }
        if w.modality > 0:  # (weight 0 skips the modality network's two passes; the terms keep their order)
            terms["modality"] = L.modality_guidance(t.modality_net(x_p), t.modality_net(x_s))
        terms["class_alignment"] = on_rows(known_p & known_s, L.class_alignment, *on_columns(shared, l_p, l_s),
                                           detach=self.p.alignment_detach)
        if w.diversity > 0:
            terms["diversity"] = L.diversity(x_p, z) + L.diversity(x_s[:, :1], z)
        if self.bn_priors:
            terms["bn_prior"] = sum(prior.loss() for prior in self.bn_priors)
        if students is not None and proxies is not None and self.weights["adversarial"] > 0:
            e_p, e_s = students(x_p, x_s)
            proxies_p, proxies_s = proxies  # the photo and the sketch student's (the same tensor when shared)
            terms["adversarial"] = (
                L.adversarial_hardness(l_p, L.proxy_logits(e_p, proxies_p, proxy_scale), self.adversarial_bound)
                + L.adversarial_hardness(l_s, L.proxy_logits(e_s, proxies_s, proxy_scale), self.adversarial_bound))
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, terms, {"photo_logits": l_p.detach(), "sketch_logits": l_s.detach()}


def on_rows(mask: torch.Tensor, term, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
    """``term`` over the rows where ``mask`` holds (all rows: the tensors as they are; none: 0)."""
    if bool(mask.all()):
        return term(*tensors, **kwargs)
    if not bool(mask.any()):
        return tensors[0].sum() * 0.0
    return term(*(x[mask] for x in tensors), **kwargs)


def on_columns(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors' columns where ``mask`` holds (all: the tensors as they are)."""
    return tensors if bool(mask.all()) else tuple(x[:, mask] for x in tensors)


def build_estimators(p: ReconstructParams, num_classes: int, image_size: int,
                     teachers: TeacherSet | None = None) -> EstimatorPair:
    """The estimator pair; with ``teachers``, drawing only the classes at least one teacher knows."""
    estimators = EstimatorPair(p.latent_dim, num_classes, p.estimator_width, image_size)
    if teachers is not None:
        estimators.classes = teachers.known_classes()
    return estimators


def adapt(init: EstimatorPair, objective: EstimatorObjective, reptile: ReptileSynthesisParams, batch_size: int,
          gen: torch.Generator, dev: LoopDevice, step: int, stage: str, **adversary: Any
          ) -> tuple[EstimatorPair, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Reptile synthesis: a copy of the common initialisation adapted to one batch (one draw of noise and
    classes) for ``reptile.inner_steps`` steps of a fresh Adam. Returns the copy and the last step's total,
    terms, teacher logits and classes. ``adversary``: the students and proxies of the hardness term."""
    adapted = copy.deepcopy(init).train()
    opt = torch.optim.Adam(adapted.parameters(), lr=reptile.inner_lr, betas=(0.5, 0.999))
    z, y = adapted.sample_inputs(batch_size, gen, dev.device)
    for _ in range(reptile.inner_steps):
        with dev.autocast():
            x_p, x_s = adapted(z, y)
            total, terms, out = objective(x_p, x_s, y, z, **adversary)
        rt.check_finite({**terms, "total": total}, step, stage)
        dev.step(opt, total, adapted)
    return adapted, total, terms, out, y


@torch.no_grad()
def reptile_update(init: nn.Module, adapted: nn.Module, meta_lr: float) -> None:
    """Move the initialisation towards the adapted copy (Reptile); BatchNorm statistics too."""
    for mine, theirs in zip(list(init.parameters()) + list(init.buffers()),
                            list(adapted.parameters()) + list(adapted.buffers())):
        if mine.is_floating_point():
            mine.lerp_(theirs, meta_lr)
        else:
            mine.copy_(theirs)


class SynthesisPool:
    """The last ``size`` pairs the estimators made while training, as the bank stores them (``synthesis: fast``
    with ``fast.bank: pool``): labelled by the teachers' logits of the step that made them, so the bank
    costs no pass of its own (Fast-Datafree keeps its synthetic data the same way)."""

    def __init__(self, size: int, state: dict[str, torch.Tensor] | None = None) -> None:
        self.size = size
        self.batches: list[dict[str, torch.Tensor]] = [state] if state else []

    def add(self, x_p: torch.Tensor, x_s: torch.Tensor, y: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        batch = {"condition": y.cpu(), **to_bank_images(x_p.detach().float(), x_s.detach().float())}
        for name, logits in (("photo_teacher", out["photo_logits"]), ("sketch_teacher", out["sketch_logits"])):
            conf, label = logits.float().softmax(1).max(1)
            batch[f"{name}_label"], batch[f"{name}_conf"] = label.cpu(), conf.cpu()
        self.batches.append(batch)
        while len(self.batches) > 1 and self.rows() - len(self.batches[0]["condition"]) >= self.size:
            self.batches.pop(0)  # the oldest batch is no longer needed to fill the pool

    def rows(self) -> int:
        return sum(len(b["condition"]) for b in self.batches)

    def pairs(self) -> dict[str, torch.Tensor]:
        """The newest ``size`` pairs (fewer if fewer were made), oldest first."""
        return {k: torch.cat([b[k] for b in self.batches])[-self.size:] for k in self.batches[0]}


def to_bank_images(x_p: torch.Tensor, x_s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images in [0, 1] as the bank stores them: uint8, the sketch's one grey channel."""
    return {"photo": (x_p * 255).round().to(torch.uint8).cpu(),
            "sketch": (x_s[:, :1] * 255).round().to(torch.uint8).cpu()}


def reconstruct_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    dev = LoopDevice.from_config(config, device)
    p: ReconstructParams = config["params"].recipe()
    seed = int(config["seed"])
    torch.manual_seed(seed)
    teachers, blob = load_teachers(config["teachers_path"], device)
    image_size = int(blob["params"]["image_size"])
    estimators = build_estimators(p, blob["num_classes"], image_size, teachers).to(device)
    opt = torch.optim.Adam(estimators.parameters(), lr=p.lr, betas=(0.5, 0.999))  # (reptile: no outer Adam)
    objective = EstimatorObjective(teachers, p)
    state = rt.restore_into(estimators=estimators, optimizer=opt)
    start, history = (state["step"] + 1, state["history"]) if state else (0, [])
    compute = history[-1]["compute_seconds"] if history else 0.0
    pool = (SynthesisPool(p.bank_size, state.get("pool") if state else None)
            if p.synthesis == "fast" and p.fast.bank == "pool" else None)
    rt.broadcast_module(estimators)
    gen = torch.Generator().manual_seed(seed * 7919 + rt.world()[0])
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    steps = p.reptile.meta_steps if p.synthesis == "reptile" else p.steps
    for step in rt.progress(range(start, steps), total=steps - start, desc="reconstruct"):
        t_step = time.time()
        if p.synthesis == "reptile":  # one meta step: adapt a copy to a batch, move the initialisation towards it
            adapted, total, terms, out, y = adapt(estimators, objective, p.reptile, p.batch_size, gen, dev, step,
                                                  "reconstruct")
            reptile_update(estimators, adapted, p.reptile.meta_lr)
        else:
            estimators.train()
            z, y = estimators.sample_inputs(p.batch_size, gen, device)
            with dev.autocast():
                x_p, x_s = estimators(z, y)
                total, terms, out = objective(x_p, x_s, y, z)
            rt.check_finite({**terms, "total": total}, step, "reconstruct")
            dev.step(opt, total, estimators)
            if pool is not None:
                pool.add(x_p, x_s, y, out)
        compute += time.time() - t_step
        acc_p = (out["photo_logits"].argmax(1) == y).float().mean()
        acc_s = (out["sketch_logits"].argmax(1) == y).float().mean()
        agree = (out["photo_logits"].argmax(1) == out["sketch_logits"].argmax(1)).float().mean()
        for k, v in {**terms, "total": total, "photo_teacher_acc": acc_p, "sketch_teacher_acc": acc_s,
                     "pair_agreement": agree}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        if (step + 1) % p.log_every == 0 or step + 1 == steps:
            metrics = rt.mean_over_workers({k: v / count for k, v in sums.items()})
            # compute_seconds: the estimator updates so far, without reports (the synthesis cost)
            metrics.update(step=step, seconds_per_step=(time.time() - t0) / count, compute_seconds=compute)
            history.append(metrics)
            rt.report(metrics, {"estimators": estimators.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "history": history, "params": p.model_dump(mode="json"),
                                "num_classes": blob["num_classes"], "image_size": image_size,
                                **({"pool": pool.pairs()} if pool is not None else {})})
            sums, count, t0 = {}, 0, time.time()


@torch.no_grad()
def generate_pairs(estimators: EstimatorPair, teachers: TeacherSet, n: int, seed: int, batch: int = 256,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """n reconstructed pairs as uint8 images plus each teacher's label and confidence."""
    estimators.eval()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("condition", "photo", "sketch", "photo_teacher_label",
                                                          "sketch_teacher_label", "photo_teacher_conf", "sketch_teacher_conf")}
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z, y = estimators.sample_inputs(b, gen, device)
        x_p, x_s = estimators(z, y)
        pp, ps = teachers.photo_teacher(x_p).softmax(1), teachers.sketch_teacher(x_s).softmax(1)
        out["condition"].append(y.cpu())
        for k, images in to_bank_images(x_p, x_s).items():
            out[k].append(images)
        for name, prob in (("photo_teacher", pp), ("sketch_teacher", ps)):
            conf, lab = prob.max(1)
            out[f"{name}_label"].append(lab.cpu())
            out[f"{name}_conf"].append(conf.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def write_bank(path: str, bank: dict[str, torch.Tensor]) -> None:
    n = len(bank["condition"])
    cols = {
        "pair_id": pa.array(np.arange(n), pa.int64()),
        "condition": pa.array(bank["condition"].numpy().astype(np.int32)),
        "photo_teacher_label": pa.array(bank["photo_teacher_label"].numpy().astype(np.int32)),
        "sketch_teacher_label": pa.array(bank["sketch_teacher_label"].numpy().astype(np.int32)),
        "photo_teacher_conf": pa.array(bank["photo_teacher_conf"].numpy().astype(np.float32)),
        "sketch_teacher_conf": pa.array(bank["sketch_teacher_conf"].numpy().astype(np.float32)),
        "photo": pa.array([encode_png(x.permute(1, 2, 0).numpy()) for x in bank["photo"]], pa.binary()),
        "sketch": pa.array([encode_png(x[0].numpy()) for x in bank["sketch"]], pa.binary()),
    }
    pq.write_table(pa.Table.from_pydict(cols, schema=BANK_SCHEMA), path, row_group_size=2048, compression="zstd")


def read_bank(path: str) -> dict[str, torch.Tensor]:
    """The sample bank as uint8 image tensors (photo N×3×H×W, sketch N×1×H×W) and label tensors."""
    table = pq.read_table(path)
    missing = set(BANK_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a sample bank (missing columns {sorted(missing)})")
    photos = np.stack([decode_image(b, "RGB", f"{path} photo") for b in table.column("photo").to_pylist()])
    sketches = np.stack([decode_image(b, "L", f"{path} sketch") for b in table.column("sketch").to_pylist()])
    out = {"photo": torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous(),
           "sketch": torch.from_numpy(sketches)[:, None].contiguous()}
    for c in ("condition", "photo_teacher_label", "sketch_teacher_label"):
        out[c] = torch.from_numpy(table.column(c).to_numpy().astype(np.int64))
    for c in ("photo_teacher_conf", "sketch_teacher_conf"):
        out[c] = torch.from_numpy(table.column(c).to_numpy().copy())  # writable: Arrow hands out a read-only view
    return out


def pairs_grid(bank: dict[str, torch.Tensor], class_names: list[str], path, per_class: int = 4) -> None:
    """PNG grid: per class, reconstructed photo / sketch pairs side by side."""
    from sbir.plots import image_grid

    rows, labels = [], []
    for c, name in enumerate(class_names):
        idx = torch.nonzero(bank["condition"] == c).flatten()[:per_class]
        row = []
        for i in idx.tolist():
            row += [bank["photo"][i].permute(1, 2, 0).numpy(), bank["sketch"][i][0].numpy()]
        rows.append(row)
        labels.append(name)
    cols = [x for k in range(per_class) for x in (f"photo {k}", f"sketch {k}")]
    image_grid(rows, path, row_labels=labels, col_labels=cols)


def run_reconstruct(ctx) -> dict[str, Any]:
    p = ctx.params.reconstruct
    teachers_path = ctx.input("teacher_pretrain", "teachers.pt")
    outcome = ctx.train(reconstruct_loop, {"params": p, "seed": ctx.params.seed, "teachers_path": str(teachers_path)})
    state = outcome.state
    teachers, blob = load_teachers(teachers_path)
    estimators = build_estimators(p, state["num_classes"], state["image_size"], teachers)
    estimators.load_state_dict(state["estimators"])
    torch.save({"estimators": state["estimators"], "optimizer": state["optimizer"], "step": state["step"],
                "params": state["params"], "num_classes": state["num_classes"], "image_size": state["image_size"]},
               ctx.tmp_out / "estimators.pt")
    t0 = time.time()
    bank_size = p.recipe().bank_size  # (synthesis: fast draws its own, smaller bank)
    # fast with its pool: the pairs made while training (their cost is in compute_seconds already)
    bank = state.get("pool") or generate_pairs(estimators, teachers, bank_size, seed=ctx.params.seed + 1)
    bank_seconds = time.time() - t0
    write_bank(str(ctx.tmp_out / "bank.parquet"), bank)
    pairs_grid(bank, blob["class_names"], ctx.tmp_out / "pairs.png")
    history = state["history"]
    cond = bank["condition"]
    metrics = {
        "bank_photo_teacher_acc": round(float((bank["photo_teacher_label"] == cond).float().mean()), 4),
        "bank_sketch_teacher_acc": round(float((bank["sketch_teacher_label"] == cond).float().mean()), 4),
        "bank_pair_agreement": round(float((bank["photo_teacher_label"] == bank["sketch_teacher_label"]).float().mean()), 4),
        "final_total_loss": round(history[-1]["total"], 4),
        "seconds_per_step": round(history[-1]["seconds_per_step"], 4),
        "bank_size": len(cond), "bank_seconds": round(bank_seconds, 2), "synthesis": p.synthesis,
        "bank_source": "pool" if "pool" in state else "draw",
        # the estimators' updates plus drawing the bank (not its PNG encoding or the grid): what a faster
        # synthesis has to cut (benchmarks/fast_synthesis.py)
        "synthesis_seconds": round(history[-1]["compute_seconds"] + bank_seconds, 2),
        "bank_write_seconds": round(time.time() - t0 - bank_seconds, 2),
        "train_seconds": round(outcome.seconds, 1), "resumed": outcome.resumed,
    }
    return ctx.write_training_outputs(history, metrics, title="reconstruct (estimator objective)")
