"""distill: CrossX-DFL students (photo encoder + sketch encoder) from reconstructed pairs only.

Each round alternates k estimator steps (the full estimator objective, now with the bounded
adversarial term against the current students) and m student steps on batches that mix freshly
reconstructed pairs with pairs replayed from the sample bank (a memory bank, as in fast data-free
KD). Student objective:

* Proxy-Anchor against shared proxies initialised from a teacher's final-layer rows (labels = the
  teachers' predictions on the samples, not the estimators' conditioning class);
* metric-agnostic distillation: each student's proxy-class distribution matches its own teacher's;
* a cross-modal triplet tying sketches to photos of the same class.

The data-dependent upper bound (``upper_bound`` stage) runs the same student steps and losses on the
real training images instead (``source='real'``).
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

import torch

from sbir.config import DistillParams, ReconstructParams, StudentParams
from sbir.data.datasets import load_image_set
from sbir.data.format import open_dataset
from sbir.dfsbir import losses as L
from sbir.dfsbir.reconstruct import EstimatorObjective, build_estimators, read_bank
from sbir.dfsbir.teacher import TeacherSet, load_teachers
from sbir.models.backbones import EncoderPair, resize, to_float
from sbir.train import runtime as rt

PROXY_SCALE = 16.0  # cosine -> logits scale for the proxy classifier (used by KD and the hardness term)


def build_students(p: StudentParams, teachers: TeacherSet | None, teacher_params: dict | None) -> EncoderPair:
    students = EncoderPair(p.backbone, p.embed_dim, p.head)
    if p.init_from_teacher and teachers is not None:
        if teacher_params is not None and teacher_params["backbone"] != p.backbone.model_dump(mode="json"):
            raise ValueError("distill.student.init_from_teacher needs the student backbone to equal "
                             f"teacher_pretrain.backbone ({teacher_params['backbone']} vs {p.backbone.model_dump()})")
        for enc, teacher in ((students.photo_encoder, teachers.photo_teacher),
                             (students.sketch_encoder, teachers.sketch_teacher)):
            enc.backbone.load_state_dict(teacher.backbone.state_dict())
            enc.normalise.load_state_dict(teacher.normalise.state_dict())
    elif teachers is not None:  # fresh backbone, but still the normalisation its inputs will need
        students.photo_encoder.normalise.load_state_dict(teachers.photo_teacher.normalise.state_dict())
        students.sketch_encoder.normalise.load_state_dict(teachers.sketch_teacher.normalise.state_dict())
    return students


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


def student_losses(students: EncoderPair, proxy_loss: torch.nn.Module, teachers: TeacherSet, x_p: torch.Tensor,
                   x_s: torch.Tensor, p: DistillParams, labels_p: torch.Tensor | None = None,
                   labels_s: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The student objective on one batch of aligned pairs (images float in [0,1])."""
    with torch.no_grad():
        lt_p, lt_s = teachers.photo_teacher(x_p), teachers.sketch_teacher(x_s)
    y_p = lt_p.argmax(1) if labels_p is None else labels_p
    y_s = lt_s.argmax(1) if labels_s is None else labels_s
    e_p, e_s = students(x_p, x_s)
    proxies = proxy_loss.proxies
    return {
        "proxy": proxy_loss(torch.cat([e_p, e_s]), torch.cat([y_p, y_s])),
        "teacher_kd": L.teacher_kd(lt_p, L.proxy_logits(e_p, proxies, PROXY_SCALE), p.kd_temperature)
        + L.teacher_kd(lt_s, L.proxy_logits(e_s, proxies, PROXY_SCALE), p.kd_temperature),
        "cross_modal": L.cross_modal_triplet(e_s, y_s, e_p, y_p, p.triplet_margin),
    }


def _float_batch(batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    return to_float(batch["photo"]).to(device), to_float(batch["sketch"]).to(device)


def distill_loop(config: dict) -> None:
    device = rt.setup_worker(config)
    p = DistillParams.model_validate(config["params"])
    source: Literal["reconstructed", "real"] = config["source"]
    seed = int(config["seed"])
    torch.manual_seed(seed)
    teachers, blob = load_teachers(config["teachers_path"], device)
    num_classes = blob["num_classes"]
    students = build_students(p.student, teachers, blob["params"]).to(device)
    gen = torch.Generator().manual_seed(seed * 31 + rt.world()[0])
    init_w = {"photo_teacher": teachers.photo_teacher.head.weight, "sketch_teacher": teachers.sketch_teacher.head.weight,
              "random": None}[p.proxy_init]
    proxy_loss = L.make_proxy_anchor(num_classes, p.student.embed_dim,
                                     L.init_proxies(init_w, num_classes, p.student.embed_dim,
                                                    torch.Generator().manual_seed(seed)),
                                     p.proxy_margin, p.proxy_alpha).to(device)
    backbone = [q for n, q in students.named_parameters() if ".backbone." in n]
    heads = [q for n, q in students.named_parameters() if ".backbone." not in n]
    groups = [{"params": heads, "lr": p.lr}]
    if p.student.backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": p.lr * p.student.backbone_lr_scale})
    else:
        for q in backbone:
            q.requires_grad_(False)
    if p.proxy_lr_scale > 0:
        groups.append({"params": proxy_loss.parameters(), "lr": p.lr * p.proxy_lr_scale})
    else:
        proxy_loss.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)

    estimators = est_opt = objective = bank = None
    photos = sketches = None
    if source == "reconstructed":
        est_blob = torch.load(config["estimators_path"], map_location="cpu", weights_only=False)
        rp = ReconstructParams.model_validate(config["reconstruct_params"])
        estimators = build_estimators(rp, num_classes, est_blob["image_size"]).to(device)
        estimators.load_state_dict(est_blob["estimators"])
        est_opt = torch.optim.Adam(estimators.parameters(), lr=p.estimator_lr, betas=(0.5, 0.999))
        objective = EstimatorObjective(teachers, rp)
        bank = SampleBank(read_bank(config["bank_path"]), p.bank_capacity)
        rounds = p.rounds
    else:
        ds = open_dataset(config["dataset_dir"])
        photos = load_image_set(ds, "photos", ["train"])
        sketches = load_image_set(ds, "sketches", ["train"])
        rounds = p.upper_bound_rounds or p.rounds

    start, history = 0, []
    state = rt.restore()
    if state is not None:
        students.load_state_dict(state["students"])
        proxy_loss.load_state_dict(state["proxies"])
        opt.load_state_dict(state["optimizer"])
        if estimators is not None:
            estimators.load_state_dict(state["estimators"])
            est_opt.load_state_dict(state["estimator_optimizer"])
        start, history = state["round"] + 1, state["history"]
    rt.broadcast_module(students)
    rt.broadcast_module(proxy_loss)
    if estimators is not None:
        rt.broadcast_module(estimators)
    run = config.get("mlflow_run")
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    w = p.weights
    by_class_photo = None
    if photos is not None:
        by_class_photo = [torch.nonzero(photos.labels == c).flatten() for c in range(num_classes)]
    for rnd in rt.progress(range(start, rounds), total=rounds - start, desc=f"distill ({source})"):
        # ---- k estimator steps: make samples the current students get wrong (bounded)
        if estimators is not None:
            students.eval().requires_grad_(False)
            estimators.train()
            for _ in range(p.estimator_steps):
                z, y = estimators.sample_inputs(p.batch_size, gen, device)
                x_p, x_s = estimators(z, y)
                total, terms, _ = objective(x_p, x_s, y, z, students, proxy_loss.proxies.detach(), PROXY_SCALE)
                rt.check_finite({**terms, "total": total}, rnd, "distill/estimators")
                est_opt.zero_grad(set_to_none=True)
                total.backward()
                rt.sync_gradients(estimators)
                est_opt.step()
                for k, v in terms.items():
                    sums[f"est_{k}"] = sums.get(f"est_{k}", 0.0) + float(v.detach()) / max(1, p.estimator_steps)
            for n, q in students.named_parameters():
                q.requires_grad_(p.student.backbone_lr_scale > 0 or ".backbone." not in n)
        # ---- m student steps
        students.train()
        if p.student.freeze_bn_stats:
            for m in students.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for _ in range(p.student_steps):
            labels_p = labels_s = None
            if estimators is not None:
                n_replay = int(round(p.batch_size * p.replay_fraction))
                with torch.no_grad():
                    estimators.eval()
                    z, y = estimators.sample_inputs(p.batch_size - n_replay, gen, device)
                    fresh_p, fresh_s = estimators(z, y)
                    fresh = {"photo": (fresh_p * 255).round().to(torch.uint8).cpu(),
                             "sketch": (fresh_s[:, :1] * 255).round().to(torch.uint8).cpu()}
                    fresh["photo_teacher_label"] = teachers.photo_teacher(fresh_p).argmax(1).cpu()
                    fresh["sketch_teacher_label"] = teachers.sketch_teacher(fresh_s).argmax(1).cpu()
                replay = bank.sample(n_replay, gen)
                bank.add(fresh)
                batch = {k: torch.cat([fresh[k], replay[k]]) for k in replay}
                x_p, x_s = _float_batch(batch, device)
            else:
                sb = torch.randint(0, len(sketches), (p.batch_size,), generator=gen)
                # a real pair: the sketch and a photo of its class (its own photo when paired data exist
                # matters only at instance level; category-level distillation needs class-aligned pairs)
                labels_s = sketches.labels[sb]
                pb = torch.stack([by_class_photo[c][torch.randint(0, len(by_class_photo[c]), (1,), generator=gen)][0]
                                  for c in labels_s.tolist()])
                labels_p = photos.labels[pb]
                size = int(blob["params"]["image_size"])  # students see what their teachers saw
                x_p = resize(to_float(photos.images[pb]), size).to(device)
                x_s = resize(to_float(sketches.images[sb]), size).to(device)
                labels_p, labels_s = labels_p.to(device), labels_s.to(device)
            terms = student_losses(students, proxy_loss, teachers, x_p, x_s, p, labels_p, labels_s)
            total = w.proxy * terms["proxy"] + w.teacher_kd * terms["teacher_kd"] + w.cross_modal * terms["cross_modal"]
            rt.check_finite({**terms, "total": total}, rnd, "distill/students")
            opt.zero_grad(set_to_none=True)
            total.backward()
            rt.sync_gradients([students, proxy_loss])
            opt.step()
            for k, v in {**terms, "total": total}.items():
                sums[f"student_{k}"] = sums.get(f"student_{k}", 0.0) + float(v.detach()) / p.student_steps
        count += 1
        if (rnd + 1) % p.log_every == 0 or rnd + 1 == rounds:
            metrics = rt.mean_over_workers({k: v / count for k, v in sums.items()})
            metrics.update(round=rnd, seconds_per_round=(time.time() - t0) / count)
            history.append(metrics)
            if run is not None and rt.is_rank0():
                run.log_metrics(metrics, step=rnd)
            save = {"students": students.state_dict(), "proxies": proxy_loss.state_dict(), "optimizer": opt.state_dict(),
                    "round": rnd, "history": history, "params": p.model_dump(mode="json"), "source": source,
                    "num_classes": num_classes}
            if estimators is not None:
                save.update(estimators=estimators.state_dict(), estimator_optimizer=est_opt.state_dict())
            rt.report(metrics, save)
            sums, count, t0 = {}, 0, time.time()


def load_students(path: str) -> tuple[EncoderPair, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    p = DistillParams.model_validate(blob["params"])
    students = EncoderPair(p.student.backbone, p.student.embed_dim, p.student.head)
    students.load_state_dict(blob["students"])
    return students.eval(), blob


def run_distill(ctx, source: Literal["reconstructed", "real"] = "reconstructed") -> dict[str, Any]:
    """Stage body for ``distill`` (reconstructed pairs) and ``upper_bound`` (real training pairs)."""
    from sbir.plots import plot_loss_curves

    p = ctx.params.distill
    teachers_path = ctx.stage_dir("teacher_pretrain") / "teachers.pt"
    config: dict[str, Any] = {"params": p.model_dump(mode="json"), "seed": ctx.params.seed,
                              "teachers_path": str(teachers_path), "source": source, "mlflow_run": ctx.run}
    needed = [teachers_path]
    if source == "reconstructed":
        rec = ctx.stage_dir("reconstruct")
        config.update(estimators_path=str(rec / "estimators.pt"), bank_path=str(rec / "bank.parquet"),
                      reconstruct_params=ctx.params.reconstruct.model_dump(mode="json"))
        needed += [rec / "estimators.pt", rec / "bank.parquet"]
    else:
        config["dataset_dir"] = str(ctx.path(ctx.params.dataset_dir))
    for f in needed:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: run the earlier stages first")
    name = "distill" if source == "reconstructed" else "upper_bound"
    digest = ctx.params_digest({"distill": p.model_dump(mode="json"), "source": source,
                                "reconstruct": ctx.params.reconstruct.model_dump(mode="json")})
    outcome = rt.run_training(name, distill_loop, config, ctx.params.ray, digest, resume=ctx.resume)
    state = outcome.state
    torch.save({k: state[k] for k in ("students", "proxies", "optimizer", "round", "params", "source", "num_classes")},
               ctx.tmp_out / "students.pt")
    history = state["history"]
    (ctx.tmp_out / "history.json").write_text(json.dumps(history, indent=2))
    keys = [k for k in history[-1] if k not in ("round", "seconds_per_round")]
    plot_loss_curves({k: [h.get(k, float("nan")) for h in history] for k in keys}, ctx.tmp_out / "curves.png",
                     title=f"{name} losses", xlabel="log interval")
    metrics = {"final_student_total": round(history[-1]["student_total"], 4),
               "seconds_per_round": round(history[-1]["seconds_per_round"], 4),
               "rounds": state["round"] + 1, "train_seconds": round(outcome.seconds, 1), "resumed": outcome.resumed}
    (ctx.tmp_out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
