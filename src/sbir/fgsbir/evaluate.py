"""fg_evaluate: instance-level retrieval on the test split.

Queries: the test sketches with a photo in the test gallery; gallery: every test photo. For each
model (the variants and ablations fgsbir_joint wrote, in a fixed order) the rank of the true photo
(``sbir.metrics.true_match_ranks``: ties count against the query) and Acc@K. The chance row is
exact: Acc@K = min(K, N) / N for a gallery of N photos. Embeddings, true indices and ranks are saved
(.npy) so every number can be recomputed.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sbir.data.datasets import ImageSet, split_pairs
from sbir.data.format import open_dataset
from sbir.fgsbir.params import FGEvaluateParams
from sbir.metrics import accuracy_at_k, cosine_similarity_matrix, true_match_ranks
from sbir.models.backbones import embed
from sbir.models.checkpoints import load_retrieval_checkpoint
from sbir.train import runtime as rt

ORDER = ["supervised", "semi", "full", "semi_no_weighting", "semi_no_consistency", "semi_no_policy_gradient",
         "semi_no_pseudo_triplet", "supervised_pretrain", "full_pretrain"]


def fine_grained_metrics(query_emb, gallery_emb, true_index, ks: Sequence[int] = (1, 5, 10)
                         ) -> tuple[dict[str, float], np.ndarray]:
    """Acc@K (keys ``acc@K``), mean and median rank, and the ranks themselves."""
    ranks = true_match_ranks(query_emb, gallery_emb, true_index)
    m = accuracy_at_k(ranks, ks)
    m["mean_rank"] = float(ranks.mean())
    m["median_rank"] = float(np.median(ranks))
    return m, ranks


def chance_metrics(gallery_size: int, ks: Sequence[int]) -> dict[str, float]:
    n = gallery_size
    out = {f"acc@{k}": min(k, n) / n for k in ks}
    out["mean_rank"] = (n + 1) / 2
    out["median_rank"] = (n + 1) / 2
    return out


def results_markdown(table: dict[str, dict[str, float]], ks: Sequence[int]) -> str:
    keys = [f"acc@{k}" for k in ks] + ["mean_rank"]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, vals in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{vals[k]:.4f}" if k.startswith("acc") else f"{vals[k]:.1f}"
                                              for k in keys) + " |")
    return "\n".join(lines) + "\n"


def model_checkpoints(ck_dir: Path) -> dict[str, Path]:
    """The F checkpoints fgsbir_joint wrote, by variant, in :data:`ORDER` (then the others by name)."""
    found = {f.stem: f for f in sorted(ck_dir.glob("*.pt")) if not f.stem.endswith("discriminator")}
    if not found:
        raise FileNotFoundError(f"{ck_dir} holds no model checkpoint: run the fgsbir_joint stage first")
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {n: found[n] for n in names}


@rt.with_worker_threads
def run_fg_evaluate(ctx) -> dict[str, Any]:
    """Stage body: Acc@K and ranks of every F variant; embeddings, rank histogram, retrieval grids."""
    p: FGEvaluateParams = ctx.params.fg_evaluate
    ds = open_dataset(ctx.path(ctx.params.dataset_dir))
    sketches, photos, q_rows, true_idx = split_pairs(ds, "test")
    if len(q_rows) == 0 or len(photos) == 0:
        raise ValueError(f"{ds.root}: no test sketch has its photo in the test split")
    checkpoints = model_checkpoints(ctx.input("fgsbir_joint", "checkpoints"))
    emb_dir = ctx.tmp_out / "embeddings"
    emb_dir.mkdir()
    np.save(emb_dir / "true_index.npy", true_idx.numpy())
    (emb_dir / "ids.json").write_text(json.dumps({"query_ids": [sketches.ids[i] for i in q_rows.tolist()],
                                                  "gallery_ids": photos.ids}))
    table: dict[str, dict[str, float]] = {"chance": chance_metrics(len(photos), p.ks)}
    ranks_by: dict[str, np.ndarray] = {}
    embs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, path in checkpoints.items():
        model, blob = load_retrieval_checkpoint(path)
        size = blob["arch"].get("image_size")
        q = embed(model.sketch_encoder, sketches.images[q_rows], size=size, batch=p.batch_size)
        g = embed(model.photo_encoder, photos.images, size=size, batch=p.batch_size)
        table[name], ranks_by[name] = fine_grained_metrics(q, g, true_idx, p.ks)
        embs[name] = (q, g)
        np.save(emb_dir / f"{name}_query.npy", q.numpy())
        np.save(emb_dir / f"{name}_gallery.npy", g.numpy())
        np.save(emb_dir / f"{name}_ranks.npy", ranks_by[name])
    write_plots(ctx.tmp_out, p, sketches, photos, q_rows, true_idx, ranks_by, embs, list(checkpoints))
    metrics: dict[str, Any] = {f"{m}/{k}": round(float(v), 4) for m, vals in table.items() for k, v in vals.items()}
    if p.generated_queries:
        metrics.update(generated_query_metrics(ctx, p, photos, checkpoints, int(sketches.images.shape[-1])))
    if "semi" in table and "supervised" in table:
        for k in p.ks:
            metrics[f"semi_minus_supervised/acc@{k}"] = round(table["semi"][f"acc@{k}"] - table["supervised"][f"acc@{k}"], 4)
    metrics["num_queries"], metrics["gallery_size"] = len(q_rows), len(photos)
    ctx.write_json("metrics.json", metrics)
    md = results_markdown(table, p.ks)
    (ctx.tmp_out / "results_table.md").write_text(md)
    print(md)
    return metrics


def generators(ctx) -> dict[str, Any]:
    """G as the sketch_generator stage left it (``pretrained``) and, when fgsbir_joint's semi variant ran
    policy gradient, G after it (``after_pg``)."""
    from sbir.models.checkpoints import load_generator, read_checkpoint

    g, _ = load_generator(ctx.input("sketch_generator", "generator.pt"))
    out = {"pretrained": g}
    extras = ctx.stage_dir("fgsbir_joint") / "checkpoints" / "semi_generator_discriminator.pt"
    if extras.exists() and "generator" in (blob := read_checkpoint(extras)):
        g_pg = copy.deepcopy(g)
        g_pg.load_state_dict(blob["generator"])
        out["after_pg"] = g_pg
    return out


def generated_query_metrics(ctx, p: FGEvaluateParams, photos: ImageSet, checkpoints: dict[str, Path],
                            sketch_size: int) -> dict[str, float]:
    """Each G draws one sketch of every test photo (seed 0, ``generated_temperature``, rendered as the
    pseudo pairs are); each F of supervised/semi/full ranks the test photos for it. A G that draws its
    photo has a low mean rank under the fully supervised F (chance: (N + 1) / 2)."""
    from sbir.fgsbir.generator_train import draw, render_sketches

    out: dict[str, float] = {}
    models = {n: load_retrieval_checkpoint(checkpoints[n]) for n in ("supervised", "semi", "full") if n in checkpoints}
    truth = torch.arange(len(photos))
    for g_name, g in generators(ctx).items():
        strokes, _, _ = draw(g, photos.images, p.generated_temperature, seed=0)
        images = render_sketches(strokes, sketch_size, ctx.params.pseudo_pairs.line_width)
        for f_name, (model, blob) in models.items():
            size = blob["arch"].get("image_size")
            q = embed(model.sketch_encoder, images, size=size, batch=p.batch_size)
            g_emb = embed(model.photo_encoder, photos.images, size=size, batch=p.batch_size)
            m, _ = fine_grained_metrics(q, g_emb, truth, p.ks)
            out.update({f"generated_{g_name}/{f_name}/{k}": round(float(v), 4) for k, v in m.items()})
    return out


def write_plots(out: Path, p: FGEvaluateParams, sketches: ImageSet, photos: ImageSet, q_rows: torch.Tensor,
                true_idx: torch.Tensor, ranks_by: dict[str, np.ndarray],
                embs: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> None:
    """The rank histogram (and its data for ``dvc plots show``) and the top-k retrieval grids of evenly
    spread queries, for the headline model (semi) and the supervised baseline."""
    from sbir.plots import plot_rank_histogram, plot_retrievals, rank_histogram_rows, write_plot_table

    # queries per rank, the last bin = ranks above max_rank_shown
    write_plot_table(out / "rank_histogram.json", "rank", *rank_histogram_rows(ranks_by, p.max_rank_shown))
    plot_rank_histogram(ranks_by, out / "rank_histogram.png", max_rank=p.max_rank_shown,
                        title="rank of the true photo (test sketches -> test photos)")
    pick = torch.linspace(0, len(q_rows) - 1, min(p.num_retrieval_examples, len(q_rows))).round().long()
    gallery_imgs = [photos.images[i].permute(1, 2, 0).numpy() for i in range(len(photos))]
    for name in [n for n in ("semi", "supervised") if n in embs] or names[:1]:
        q, g = embs[name]
        top = cosine_similarity_matrix(q[pick], g).topk(min(p.top_k_shown, len(photos)), dim=1).indices.numpy()
        correct = top == true_idx[pick].numpy()[:, None]
        plot_retrievals([sketches.images[q_rows[i], 0].numpy() for i in pick.tolist()], gallery_imgs, top, correct,
                        out / f"retrievals_{name}.png",
                        title=f"{name}: test sketch -> top-{top.shape[1]} test photos (green = its photo)")
