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
    if logits:
        out[classifier_variant_name(None)] = (q_logits, g_logits)
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
    main_key = "mAP@all"
    ratio = table["crossx_dfl"][main_key] / max(1e-12, table["upper_bound"][main_key])
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
    metrics = {f"{m}/{k}": round(float(v), 4) for m, vals in table.items() for k, v in vals.items()
               if not k.startswith("num_")}
    metrics["crossx_dfl_over_upper_bound"] = round(ratio, 4)
    metrics["crossx_dfl_minus_classifier_only"] = round(table["crossx_dfl"][main_key] - table["classifier_only"][main_key], 4)
    best = max((m for m in table if m.startswith("classifier_only")), key=lambda m: table[m][main_key])
    metrics.update({f"classifier_only_best/{k}": round(float(v), 4) for k, v in table[best].items()
                    if not k.startswith("num_")})
    metrics["classifier_only_best_variant"] = best  # chosen on the test queries: the strongest baseline to beat
    metrics["crossx_dfl_minus_classifier_only_best"] = round(table["crossx_dfl"][main_key] - table[best][main_key], 4)
    metrics["num_queries"], metrics["gallery_size"] = len(sketches), len(photos)
    ctx.write_json("metrics.json", metrics)
    (ctx.tmp_out / "results_table.md").write_text(results_markdown(table, p))
    print(results_markdown(table, p))
    return metrics


def results_markdown(table: dict[str, dict[str, float]], p: EvaluateParams) -> str:
    keys = ["mAP@all"] + [f"mAP@{k}" for k in p.map_ks] + [f"P@{k}" for k in p.precision_ks]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, vals in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{vals[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
