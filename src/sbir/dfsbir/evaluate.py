"""evaluate (category level): test sketches query test photos by cosine similarity.

Rows of the results table: chance, classifier-only (each teacher's class-probability vector as the
embedding: two independent teachers' features share no space, their class outputs do), CrossX-DFL
(the distilled students) and the data-dependent upper bound (the students' architecture trained on
the real training pairs, ``upper_bound.py``). Reads only the test split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbir.config import EvaluateParams
from sbir.data.datasets import ImageSet, load_image_set
from sbir.data.format import open_dataset
from sbir.metrics import category_retrieval_metrics, chance_category_metrics, cosine_similarity_matrix, precision_recall_curve
from sbir.models.backbones import embed
from sbir.models.checkpoints import load_students, load_teachers


def classifier_variant_name(temperature: float | None) -> str:
    """``classifier_only`` (softmax at T=1, the historical row), ``classifier_only_t<T>``, ``classifier_only_logits``."""
    if temperature is None:
        return "classifier_only_logits"
    return "classifier_only" if temperature == 1.0 else f"classifier_only_t{temperature:g}"


def classifier_embeddings(teachers, sketches: ImageSet, photos: ImageSet, size: int, batch: int,
                          temperatures: list[float], logits: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The paper's classifier-only baselines: each teacher's class scores on real images as the embedding,
    as softmax(logits / T) for each T and (``logits``) the raw logits; the logits are computed once."""
    q_logits = embed(teachers.sketch_teacher, sketches.images, size=size, batch=batch)
    g_logits = embed(teachers.photo_teacher, photos.images, size=size, batch=batch)
    out = {classifier_variant_name(t): ((q_logits / t).softmax(1), (g_logits / t).softmax(1)) for t in temperatures}
    if logits:  # a class a teacher never saw has no coordinate: 0, not its masked logit
        out[classifier_variant_name(None)] = (q_logits.where(teachers.sketch_teacher.known.cpu(), 0.0),
                                              g_logits.where(teachers.photo_teacher.known.cpu(), 0.0))
    return out


def teacher_accuracy_across_modalities(teachers, sketches: ImageSet, photos: ImageSet, size: int | None,
                                       batch: int = 256) -> dict[str, float]:
    """Each teacher's test accuracy on its own modality and on the other one, over the classes it knows
    (and chance over those). A class only one teacher knows reaches the other modality's student in
    data-free training only through this: the reconstructions of the other modality are judged by their
    own teacher alone, so a teacher at chance on the other modality carries no class signal across."""
    out: dict[str, float] = {}
    for name, teacher in (("photo_teacher", teachers.photo_teacher), ("sketch_teacher", teachers.sketch_teacher)):
        known = teacher.known.cpu()
        out[f"{name}/chance"] = round(1.0 / int(known.sum()), 4)
        for modality, images in (("photos", photos), ("sketches", sketches)):
            rows = known[images.labels]
            logits = embed(teacher, images.images[rows], size=size, batch=batch)
            out[f"{name}/on_{modality}"] = round(float((logits.argmax(1) == images.labels[rows]).float().mean()), 4)
    return out


def class_groups(teachers) -> dict[str, list[int]]:
    """The class-split studies' groups (empty when both teachers know every class): classes both
    teachers know (``shared``; ``seen`` when the lists are equal), only the photo or the sketch teacher
    knows, and neither (``unseen``)."""
    known_p, known_s = teachers.photo_teacher.known.cpu(), teachers.sketch_teacher.known.cpu()
    if bool((known_p & known_s).all()):
        return {}
    masks = {"seen" if bool((known_p == known_s).all()) else "shared": known_p & known_s,
             "photo_only": known_p & ~known_s, "sketch_only": known_s & ~known_p, "unseen": ~known_p & ~known_s}
    return {name: torch.nonzero(mask).flatten().tolist() for name, mask in masks.items() if bool(mask.any())}


def group_metrics(embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], q_labels: torch.Tensor,
                  g_labels: torch.Tensor, groups: dict[str, list[int]], p: EvaluateParams) -> dict[str, dict]:
    """Per method and group: the group's query sketches against the group's gallery photos."""
    out: dict[str, dict] = {}
    for group, classes in groups.items():
        q_in, g_in = torch.isin(q_labels, torch.tensor(classes)), torch.isin(g_labels, torch.tensor(classes))
        if not q_in.any() or not g_in.any():
            continue
        out[f"chance/{group}"] = chance_category_metrics(q_labels[q_in], g_labels[g_in], ks_map=p.map_ks,
                                                         ks_precision=p.precision_ks)
        for name, (q, g) in embeddings.items():
            out[f"{name}/{group}"] = category_retrieval_metrics(q[q_in], q_labels[q_in], g[g_in], g_labels[g_in],
                                                                 ks_map=p.map_ks, ks_precision=p.precision_ks,
                                                                 batch_size=p.batch_size)
    return out


def method_embeddings(sketches: ImageSet, photos: ImageSet, teachers_path: Path, students: dict[str, Path],
                      batch: int, temperatures: list[float] = (1.0,), logits: bool = False
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(query sketch embeddings, gallery photo embeddings) per method."""
    teachers, blob = load_teachers(str(teachers_path))
    size = int(blob["params"]["image_size"])
    out = classifier_embeddings(teachers, sketches, photos, size, batch, list(temperatures), logits)
    for name, path in students.items():
        model, _ = load_students(str(path))
        out[name] = (embed(model.sketch_encoder, sketches.images, size=size, batch=batch),
                     embed(model.photo_encoder, photos.images, size=size, batch=batch))
    return out


def run_evaluate(ctx) -> dict[str, Any]:
    from sbir.plots import plot_pr_curves, plot_retrievals

    p: EvaluateParams = ctx.params.evaluate
    ds = open_dataset(ctx.path(ctx.params.dataset_dir))
    sketches = load_image_set(ds, "sketches", ["test"])
    photos = load_image_set(ds, "photos", ["test"])
    if len(sketches) == 0 or len(photos) == 0:
        raise ValueError(f"{ds.root}: the test split needs sketches and photos ({len(sketches)}, {len(photos)})")
    students = {"crossx_dfl": ctx.input("distill", "students.pt"), "upper_bound": ctx.input("upper_bound", "students.pt")}
    embeddings = method_embeddings(sketches, photos, ctx.input("teacher_pretrain", "teachers.pt"), students,
                                   p.batch_size, p.classifier_temperatures, p.classifier_logits)
    q_labels, g_labels = sketches.labels, photos.labels
    table: dict[str, dict[str, float]] = {
        "chance": chance_category_metrics(q_labels, g_labels, ks_map=p.map_ks, ks_precision=p.precision_ks)}
    curves = {}
    emb_dir = ctx.tmp_out / "embeddings"
    emb_dir.mkdir()
    np.save(emb_dir / "query_labels.npy", q_labels.numpy())
    np.save(emb_dir / "gallery_labels.npy", g_labels.numpy())
    (emb_dir / "ids.json").write_text(json.dumps({"query_ids": sketches.ids, "gallery_ids": photos.ids}))
    for name, (q, g) in embeddings.items():
        table[name] = category_retrieval_metrics(q, q_labels, g, g_labels, ks_map=p.map_ks,
                                                 ks_precision=p.precision_ks, batch_size=p.batch_size)
        curves[name] = precision_recall_curve(q, q_labels, g, g_labels)
        np.save(emb_dir / f"{name}_query.npy", q.numpy())
        np.save(emb_dir / f"{name}_gallery.npy", g.numpy())
    table.update(group_metrics(embeddings, q_labels, g_labels,
                               class_groups(load_teachers(str(ctx.input("teacher_pretrain", "teachers.pt")))[0]), p))
    # precision-recall curves as a DVC plot (long format: one row per method and recall level)
    rows = [{"method": m, "recall": float(r), "precision": float(pr)} for m, (rec, prec) in curves.items()
            for r, pr in zip(rec, prec)]
    (ctx.tmp_out / "pr_curve.json").write_text(json.dumps(rows))
    # the same curves wide (one column per method) for `dvc plots show` (dvc.yaml plots: pr_curve)
    from sbir.plots import write_plot_table

    recall = next(iter(curves.values()))[0]
    write_plot_table(ctx.tmp_out / "pr_by_method.json", "recall", recall, {m: prec for m, (_, prec) in curves.items()})
    plot_pr_curves(curves, ctx.tmp_out / "pr_curves.png")
    # top-10 retrievals for a few queries (one per class where possible)
    q, g = embeddings["crossx_dfl"]
    picks = []
    for c in range(ds.num_classes):
        idx = torch.nonzero(q_labels == c).flatten()
        if len(idx):
            picks.append(int(idx[0]))
        if len(picks) >= p.num_retrieval_examples:
            break
    sims = cosine_similarity_matrix(q[picks], g)
    top = sims.topk(min(10, len(photos)), dim=1).indices.numpy()
    correct = (g_labels.numpy()[top] == q_labels.numpy()[picks][:, None])
    plot_retrievals([sketches.images[i, 0].numpy() for i in picks],
                    [photos.images[i].permute(1, 2, 0).numpy() for i in range(len(photos))], top, correct,
                    ctx.tmp_out / "retrievals.png", title="CrossX-DFL: test sketch -> top-10 test photos")
    metrics = summary_metrics(table)
    metrics["num_queries"], metrics["gallery_size"] = len(sketches), len(photos)
    ctx.write_json("metrics.json", metrics)
    (ctx.tmp_out / "results_table.md").write_text(results_markdown(table, p))
    print(results_markdown(table, p))
    return metrics


def summary_metrics(table: dict[str, dict[str, float]], main_key: str = "mAP@all") -> dict[str, Any]:
    """Every row's metrics, flat, plus ``classifier_only_best`` (the best classifier-only variant, per
    class group too: the strongest baseline to beat) and the headline differences and ratio."""
    metrics: dict[str, Any] = {f"{m}/{k}": round(float(v), 4) for m, vals in table.items() for k, v in vals.items()
                               if not k.startswith("num_")}
    cx = table["crossx_dfl"][main_key]
    metrics["crossx_dfl_over_upper_bound"] = round(cx / max(1e-12, table["upper_bound"][main_key]), 4)
    metrics["crossx_dfl_minus_classifier_only"] = round(cx - table["classifier_only"][main_key], 4)
    for group in [""] + sorted({m.split("/", 1)[1] for m in table if "/" in m}):
        suffix = f"/{group}" if group else ""
        variants = [m for m in table if m.startswith("classifier_only") and ("/" in m) == bool(group)
                    and m.endswith(suffix)]
        best = max(variants, key=lambda m: table[m][main_key])  # chosen on the test queries
        metrics.update({f"classifier_only_best{suffix}/{k}": round(float(v), 4) for k, v in table[best].items()
                        if not k.startswith("num_")})
        metrics[f"classifier_only_best_variant{suffix}"] = best.split("/")[0]
        metrics[f"crossx_dfl_minus_classifier_only_best{suffix}"] = round(
            table[f"crossx_dfl{suffix}"][main_key] - table[best][main_key], 4)
    return metrics


def results_markdown(table: dict[str, dict[str, float]], p: EvaluateParams) -> str:
    keys = ["mAP@all"] + [f"mAP@{k}" for k in p.map_ks] + [f"P@{k}" for k in p.precision_ks]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, vals in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{vals[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
