"""distill: CrossX-DFL students (photo encoder + sketch encoder) from reconstructed pairs only.

Each round alternates k estimator steps (the full estimator objective, now with the bounded
adversarial term against the current students) and m student steps on batches that mix freshly
reconstructed pairs with pairs replayed from the sample bank (a memory bank, as in fast data-free
KD). With ``reconstruct.synthesis: fast`` there is no alternation: the students learn from the bank
alone (:meth:`sbir.config.DistillParams.for_synthesis`). Student objective:

* Proxy-Anchor against proxies initialised from the teachers' final-layer rows (shared by both students
  or each student's own teacher's: ``proxy_init``), labels = the teachers' predictions on the samples,
  not the estimators' conditioning class;
* metric-agnostic distillation: each student's proxy-class distribution matches its own teacher's;
* a cross-modal triplet tying sketches to photos of the same class.

The data-dependent upper bound (``upper_bound.py``) trains the same student networks with the same
losses on the real training images.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from sbir.config import DistillParams, ReconstructParams, StudentTrainingParams
from sbir.dfsbir import losses as L
from sbir.dfsbir.reconstruct import (EstimatorObjective, adapt, build_estimators, read_bank, reptile_update,
                                    to_bank_images)
from sbir.models.backbones import EncoderPair, to_float
from sbir.models.checkpoints import TeacherSet, build_students, load_teachers, read_checkpoint
from sbir.models.estimators import EstimatorPair
from sbir.train import runtime as rt
from sbir.train.precision import LoopDevice

PROXY_SCALE = 16.0  # cosine -> logits scale for the proxy classifier (used by KD and the hardness term)


class SampleBank:
    """Fixed-capacity ring buffer of reconstructed pairs (uint8) with the teachers' labels."""

    KEYS = ("photo", "sketch", "photo_teacher_label", "sketch_teacher_label")

    def __init__(self, initial: dict[str, torch.Tensor], capacity: int) -> None:
        self.capacity = capacity
        self.data = {k: torch.empty((capacity, *initial[k].shape[1:]), dtype=initial[k].dtype) for k in self.KEYS}
        self.size = self.next = 0
        self.add({k: initial[k][-capacity:] for k in self.KEYS})

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        n = len(batch["photo"])
        slots = (self.next + torch.arange(n)) % self.capacity  # overwrite the oldest once full
        for k in self.KEYS:
            self.data[k][slots] = batch[k]
        self.next = (self.next + n) % self.capacity
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}


def shares_frozen_backbones(students: EncoderPair, teachers: TeacherSet, p: StudentTrainingParams) -> bool:
    """True when each student's normalisation and backbone are its teacher's, frozen, BatchNorm statistics
    included (the default students: teacher backbones plus a trained head). Then one backbone pass gives
    both the teacher's logits and the student's embedding (see :func:`student_losses`)."""
    if p.student.backbone_lr_scale > 0 or not p.student.freeze_bn_stats:
        return False

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)

    return all(same(enc.normalise, t.normalise) and same(enc.backbone, t.backbone)
               for enc, t in ((students.photo_encoder, teachers.photo_teacher),
                              (students.sketch_encoder, teachers.sketch_teacher)))


def student_losses(students: EncoderPair, proxies: L.StudentProxies, teachers: TeacherSet, x_p: torch.Tensor,
                   x_s: torch.Tensor, p: StudentTrainingParams, labels_p: torch.Tensor | None = None,
                   labels_s: torch.Tensor | None = None, shared_backbones: bool = False) -> dict[str, torch.Tensor]:
    """The student objective on one batch of aligned pairs (images float in [0,1]). With labels given and
    no KD weight (the upper bound) the teachers are not run: their forward passes were a quarter of a step.
    ``shared_backbones`` (see :func:`shares_frozen_backbones`): the teachers' backbone features feed the
    students' heads too, which saves the students' own backbone passes (the same numbers)."""
    if shared_backbones:
        # Classifier.forward and Encoder.forward, split after the backbone features they share
        with torch.no_grad():
            f_p, f_s = teachers.photo_teacher.features(x_p), teachers.sketch_teacher.features(x_s)
            lt_p, lt_s = teachers.photo_teacher.logits(f_p), teachers.sketch_teacher.logits(f_s)
        e_p = F.normalize(students.photo_encoder.project(f_p), dim=-1)
        e_s = F.normalize(students.sketch_encoder.project(f_s), dim=-1)
        return _student_terms(e_p, e_s, lt_p, lt_s, proxies, p, labels_p, labels_s)
    e_p, e_s = students(x_p, x_s)
    if labels_p is not None and labels_s is not None and p.weights.teacher_kd == 0:
        return _student_terms(e_p, e_s, None, None, proxies, p, labels_p, labels_s)
    with torch.no_grad():
        lt_p, lt_s = teachers.photo_teacher(x_p), teachers.sketch_teacher(x_s)
    return _student_terms(e_p, e_s, lt_p, lt_s, proxies, p, labels_p, labels_s)


def _student_terms(e_p: torch.Tensor, e_s: torch.Tensor, lt_p: torch.Tensor | None, lt_s: torch.Tensor | None,
                   proxies: L.StudentProxies, p: StudentTrainingParams, labels_p: torch.Tensor | None,
                   labels_s: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Proxy, teacher-KD (zero without teacher logits) and cross-modal terms; labels default to the
    teachers' predictions."""
    proxies_p, proxies_s = proxies.tensors()
    if lt_p is None or lt_s is None:
        y_p, y_s, kd = labels_p, labels_s, e_p.new_zeros(())
    else:
        y_p = lt_p.argmax(1) if labels_p is None else labels_p
        y_s = lt_s.argmax(1) if labels_s is None else labels_s
        kd = (L.teacher_kd(lt_p, L.proxy_logits(e_p, proxies_p, PROXY_SCALE), p.kd_temperature)
              + L.teacher_kd(lt_s, L.proxy_logits(e_s, proxies_s, PROXY_SCALE), p.kd_temperature))
    return {
        "proxy": proxies.loss(e_p, y_p, e_s, y_s),
        "teacher_kd": kd,
        "cross_modal": L.cross_modal_triplet(e_s, y_s, e_p, y_p, p.triplet_margin),
    }


def weighted_total(terms: dict[str, torch.Tensor], p: StudentTrainingParams) -> torch.Tensor:
    w = p.weights
    return w.proxy * terms["proxy"] + w.teacher_kd * terms["teacher_kd"] + w.cross_modal * terms["cross_modal"]


def add_to(sums: dict[str, float], prefix: str, terms: dict[str, torch.Tensor], scale: float) -> None:
    for k, v in terms.items():
        sums[f"{prefix}{k}"] = sums.get(f"{prefix}{k}", 0.0) + float(v.detach()) / scale


# ----------------------------------------------------------------------------- where student batches come from
class ReconstructedPairs:
    """The data-free source: the estimators (continued from reconstruct, now with the hardness term
    against the current students) make fresh pairs; half of each batch is replayed from the bank."""

    def __init__(self, config: dict, p: DistillParams, teachers: TeacherSet, num_classes: int,
                 dev: LoopDevice) -> None:
        device = dev.device
        est_blob = read_checkpoint(config["estimators_path"])
        rp: ReconstructParams = config["reconstruct_params"]
        self.estimators = build_estimators(rp, num_classes, est_blob["image_size"], teachers).to(device)
        self.estimators.load_state_dict(est_blob["estimators"])
        self.optimizer = torch.optim.Adam(self.estimators.parameters(), lr=p.estimator_lr, betas=(0.5, 0.999))
        self.objective = EstimatorObjective(teachers, rp, p.adversarial_weight, p.adversarial_bound)
        self.bank = SampleBank(read_bank(config["bank_path"]), p.bank_capacity)
        self.p, self.teachers, self.device, self.dev = p, teachers, device, dev
        self.rounds = p.rounds
        # reptile synthesis: self.estimators is the common initialisation, and the fresh pairs come from its
        # latest adapted copy (None until the first adaptation of this run)
        self.reptile = rp.reptile if rp.synthesis == "reptile" else None
        self.adapted: EstimatorPair | None = None
        self.last_terms: dict[str, torch.Tensor] = {}
        self.synthesis_seconds = 0.0  # estimator updates and fresh pairs: the synthesis cost of this run

    def checkpoint_targets(self) -> dict[str, Any]:
        return {"estimators": self.estimators, "estimator_optimizer": self.optimizer}

    def estimator_steps(self, students: EncoderPair, proxies: tuple[torch.Tensor, torch.Tensor],
                        gen: torch.Generator, rnd: int, sums: dict[str, float]) -> None:
        """k estimator steps: make samples the current students get wrong (bounded). Reptile synthesis: every
        ``adapt_every`` rounds, a copy of the initialisation adapted with the hardness term instead."""
        p = self.p
        t0 = time.time()
        students.eval().requires_grad_(False)
        self.estimators.train()
        if self.reptile is not None:
            self.adapt(students, proxies, gen, rnd, sums)
        for _ in range(p.estimator_steps if self.reptile is None else 0):
            z, y = self.estimators.sample_inputs(p.batch_size, gen, self.device)
            with self.dev.autocast():
                x_p, x_s = self.estimators(z, y)
                total, terms, _ = self.objective(x_p, x_s, y, z, students, proxies, PROXY_SCALE)
            rt.check_finite({**terms, "total": total}, rnd, "distill/estimators")
            self.dev.step(self.optimizer, total, self.estimators)
            add_to(sums, "est_", terms, max(1, p.estimator_steps))
        for n, q in students.named_parameters():
            q.requires_grad_(p.student.backbone_lr_scale > 0 or ".backbone." not in n)
        self.synthesis_seconds += time.time() - t0

    def adapt(self, students: EncoderPair, proxies: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator,
              rnd: int, sums: dict[str, float]) -> None:
        """Reptile synthesis: adapt a copy of the initialisation (every ``adapt_every`` rounds), move the
        initialisation towards it; the est_ curves show the latest adaptation's terms."""
        if rnd % self.reptile.adapt_every == 0 or self.adapted is None:
            self.adapted, _, terms, _, _ = adapt(self.estimators, self.objective, self.reptile, self.p.batch_size, gen,
                                                 self.dev, rnd, "distill/estimators", students=students,
                                                 proxies=proxies, proxy_scale=PROXY_SCALE)
            reptile_update(self.estimators, self.adapted, self.reptile.meta_lr)
            self.last_terms = {k: v.detach() for k, v in terms.items()}
        add_to(sums, "est_", self.last_terms, 1)

    @torch.no_grad()
    def student_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh pairs (added to the bank) and replayed ones; labels are the teachers' predictions."""
        t0 = time.time()
        n_replay = int(round(self.p.batch_size * self.p.replay_fraction))
        if n_replay == self.p.batch_size:  # replay_fraction 1: students learn from the bank alone, no synthesis
            replay = self.bank.sample(n_replay, gen)
            return self.dev.to(to_float(replay["photo"])), self.dev.to(to_float(replay["sketch"]))
        source = self.adapted if self.adapted is not None else self.estimators
        source.eval()
        z, y = source.sample_inputs(self.p.batch_size - n_replay, gen, self.device)
        with self.dev.autocast():
            fresh_p, fresh_s = source(z, y)
            fresh_p, fresh_s = fresh_p.float(), fresh_s.float()  # the bank holds what the teachers label
            fresh = to_bank_images(fresh_p, fresh_s)
            fresh["photo_teacher_label"] = self.teachers.photo_teacher(fresh_p).argmax(1).cpu()
            fresh["sketch_teacher_label"] = self.teachers.sketch_teacher(fresh_s).argmax(1).cpu()
        self.synthesis_seconds += time.time() - t0
        replay = self.bank.sample(n_replay, gen)
        self.bank.add(fresh)
        batch = {k: torch.cat([fresh[k], replay[k]]) for k in replay}
        return self.dev.to(to_float(batch["photo"])), self.dev.to(to_float(batch["sketch"]))


# ----------------------------------------------------------------------------- the loop
def build_proxies(p: StudentTrainingParams, teachers: TeacherSet, num_classes: int, seed: int) -> L.StudentProxies:
    """Shared proxies from one teacher's rows (or random), or each student's own teacher's rows."""
    gen = torch.Generator().manual_seed(seed)

    def proxy_anchor(rows: torch.Tensor | None) -> torch.nn.Module:
        return L.make_proxy_anchor(num_classes, p.student.embed_dim,
                                   L.init_proxies(rows, num_classes, p.student.embed_dim, gen),
                                   p.proxy_margin, p.proxy_alpha)

    photo_rows, sketch_rows = teachers.photo_teacher.head.weight, teachers.sketch_teacher.head.weight
    if p.proxy_init == "per_modality":
        return L.StudentProxies(proxy_anchor(photo_rows), proxy_anchor(sketch_rows))
    rows = {"photo_teacher": photo_rows, "sketch_teacher": sketch_rows, "random": None}[p.proxy_init]
    return L.StudentProxies(proxy_anchor(rows))


def build_student_side(p: StudentTrainingParams, teachers: TeacherSet, blob: dict[str, Any], seed: int,
                       device: torch.device, weight_decay: float = 1e-4
                       ) -> tuple[EncoderPair, L.StudentProxies, torch.optim.Optimizer]:
    """Students, their proxies (Proxy-Anchor) and one optimiser over what trains."""
    students = build_students(p.student, teachers, blob["params"]).to(device)
    proxies = build_proxies(p, teachers, blob["num_classes"], seed).to(device)
    backbone = [q for n, q in students.named_parameters() if ".backbone." in n]
    heads = [q for n, q in students.named_parameters() if ".backbone." not in n]
    groups = [{"params": heads, "lr": p.lr}]
    if p.student.backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": p.lr * p.student.backbone_lr_scale})
    else:
        for q in backbone:
            q.requires_grad_(False)
    if p.proxy_lr_scale > 0:
        groups.append({"params": proxies.parameters(), "lr": p.lr * p.proxy_lr_scale})
    else:
        proxies.requires_grad_(False)
    return students, proxies, torch.optim.AdamW(groups, weight_decay=weight_decay)


def student_steps(students: EncoderPair, proxies: L.StudentProxies, opt: torch.optim.Optimizer,
                  teachers: TeacherSet, source: ReconstructedPairs, p: DistillParams,
                  gen: torch.Generator, rnd: int, sums: dict[str, float], shared_backbones: bool = False) -> None:
    """m student steps on batches from ``source`` (in ``source.dev``'s precision)."""
    students.train()
    if p.student.freeze_bn_stats:
        for m in students.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    for _ in range(p.student_steps):
        x_p, x_s = source.student_batch(gen)
        with source.dev.autocast():
            terms = student_losses(students, proxies, teachers, x_p, x_s, p, shared_backbones=shared_backbones)
            total = weighted_total(terms, p)
        rt.check_finite({**terms, "total": total}, rnd, "distill/students")
        source.dev.step(opt, total, [students, proxies])
        add_to(sums, "student_", {**terms, "total": total}, p.student_steps)


def distill_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    p: DistillParams = config["params"].for_synthesis(config["reconstruct_params"])
    seed = int(config["seed"])
    torch.manual_seed(seed)
    teachers, blob = load_teachers(config["teachers_path"], device)
    students, proxies, opt = build_student_side(p, teachers, blob, seed, device)
    gen = torch.Generator().manual_seed(seed * 31 + rt.world()[0])
    source = ReconstructedPairs(config, p, teachers, blob["num_classes"], LoopDevice.from_config(config, device))
    targets = source.checkpoint_targets()
    state = rt.restore_into(students=students, proxies=proxies, optimizer=opt, **targets)
    start, history = (state["round"] + 1, state["history"]) if state else (0, [])
    for module in (students, proxies, *(t for t in targets.values() if isinstance(t, torch.nn.Module))):
        rt.broadcast_module(module)
    shared = shares_frozen_backbones(students, teachers, p)
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    for rnd in rt.progress(range(start, source.rounds), total=source.rounds - start, desc="distill"):
        source.estimator_steps(students, tuple(t.detach() for t in proxies.tensors()), gen, rnd, sums)
        student_steps(students, proxies, opt, teachers, source, p, gen, rnd, sums, shared)
        count += 1
        if (rnd + 1) % p.log_every == 0 or rnd + 1 == source.rounds:
            metrics = rt.mean_over_workers({k: v / count for k, v in sums.items()})
            metrics.update(round=rnd, seconds_per_round=(time.time() - t0) / count,
                           synthesis_seconds=rt.mean_over_workers({"s": source.synthesis_seconds})["s"])
            history.append(metrics)
            rt.report(metrics, {"students": students.state_dict(), "proxies": proxies.state_dict(),
                                "optimizer": opt.state_dict(), "round": rnd, "history": history,
                                "params": p.model_dump(mode="json"), "source": "reconstructed",
                                "num_classes": blob["num_classes"],
                                **{k: v.state_dict() for k, v in targets.items()}})
            sums, count, t0 = {}, 0, time.time()


def run_distill(ctx) -> dict[str, Any]:
    """Stage body for ``distill``: students from the reconstructions and the teachers only."""
    config: dict[str, Any] = {"params": ctx.params.distill, "seed": ctx.params.seed,
                              "teachers_path": str(ctx.input("teacher_pretrain", "teachers.pt")),
                              "estimators_path": str(ctx.input("reconstruct", "estimators.pt")),
                              "bank_path": str(ctx.input("reconstruct", "bank.parquet")),
                              "reconstruct_params": ctx.params.reconstruct}
    outcome = ctx.train(distill_loop, config)
    state = outcome.state
    torch.save({k: state[k] for k in ("students", "proxies", "optimizer", "round", "params", "source", "num_classes")},
               ctx.tmp_out / "students.pt")
    history = state["history"]
    metrics = {"final_student_total": round(history[-1]["student_total"], 4),
               "seconds_per_round": round(history[-1]["seconds_per_round"], 4),
               "rounds": state["round"] + 1, "train_seconds": round(outcome.seconds, 1), "resumed": outcome.resumed,
               # estimator updates and fresh pairs of this run (a resumed run: since its restart)
               "synthesis_seconds": round(history[-1]["synthesis_seconds"], 4)}
    return ctx.write_training_outputs(history, metrics, title=f"{ctx.stage} losses")
