"""Semi-supervised FG-SBIR (sbir.fgsbir): loss terms, metrics, the data-free init and a tiny run of
the four stages (sketch_generator -> pseudo_pairs -> fgsbir_joint -> fg_evaluate) in local mode."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from sbir.data.datasets import ImageSet
from sbir.fgsbir.evaluate import chance_metrics, fine_grained_metrics
from sbir.data.datasets import fine_grained_pairs
from sbir.fgsbir.generator_train import render_sketches, simplify_all
from sbir.fgsbir.joint import PairDiscriminator, initial_model, random_shift, variant_specs
from sbir.fgsbir.losses import (consistency_loss, discriminator_loss, discriminator_weights, retrieval_reward,
                                sample_negatives, triplet_loss)
from sbir.fgsbir.params import FGJointParams


# ----------------------------------------------------------------------------- loss terms
def test_discriminator_weights_normalised_monotone_clipped():
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0], requires_grad=True)
    w = discriminator_weights(logits)
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(w, p / p.mean())
    assert w.mean().item() == pytest.approx(1.0) and not w.requires_grad
    assert torch.all(w[1:] > w[:-1])  # a more "real" pair weighs more
    # clipping: one dominant pair cannot take over the batch
    logits = torch.tensor([-9.0, -9.0, -9.0, 9.0])
    w, free = discriminator_weights(logits, clip=2.0), discriminator_weights(logits)
    assert free.mean().item() == pytest.approx(1.0) and free[3] > 3.9
    assert w[3].item() == pytest.approx(2.0) and torch.allclose(w[:3], free[:3])
    # equal scores: uniform weights
    assert torch.allclose(discriminator_weights(torch.full((5,), 0.7)), torch.ones(5))
    # normalised by D's scores of the batch's labelled pairs: fakes as real as those weigh 1, obvious ones ~0
    w = discriminator_weights(torch.tensor([2.0, -6.0]), reference_logits=torch.tensor([2.0, 2.0]))
    assert w[0].item() == pytest.approx(1.0) and w[1].item() < 0.01


def test_triplet_loss_sampled_in_batch_and_weights():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # gallery: positives (== anchors), then the sampled negatives (first one == anchor 0 itself)
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    h0, h1 = 0.2 + 0.0 - 0.0, max(0.0, 0.2 + 0.0 - 2.0)
    assert triplet_loss(a, gallery, 0.2, negatives="sampled").item() == pytest.approx((h0 + h1) / 2)
    assert triplet_loss(a, gallery, 0.2, torch.tensor([0.0, 2.0]), negatives="sampled").item() == pytest.approx(0.0)
    assert triplet_loss(a, gallery, 0.2, torch.tensor([2.0, 0.0]), negatives="sampled").item() == pytest.approx(h0)
    # in_batch: anchor 0 is violated by gallery rows 2 and 3 (hinge 0.2 each, mean 0.2); anchor 1 by none
    assert triplet_loss(a, gallery, 0.2).item() == pytest.approx(0.1)
    # rows that show the anchor's own photo again are not negatives
    same = torch.tensor([[True, False, True, True], [False, True, False, False]])
    assert triplet_loss(a, gallery, 0.2, same=same).item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        triplet_loss(a, gallery, 0.2, negatives="nope")


def test_consistency_loss_matches_manual_kl_and_grads_only_student():
    g = torch.Generator().manual_seed(0)
    ts, tp = F.normalize(torch.randn(4, 8, generator=g), dim=1), F.normalize(torch.randn(4, 8, generator=g), dim=1)
    # identical student and teacher: zero
    assert consistency_loss(ts, tp, ts, tp, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    ss = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_(True)
    sp = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_(True)
    tau = 0.5
    loss = consistency_loss(ss, sp, ts, tp, tau)
    pt = torch.softmax(ts @ tp.T / tau, 1)
    ps = torch.softmax(ss @ sp.T / tau, 1)
    manual = (pt * (pt.log() - ps.log())).sum(1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert loss.item() > 0
    t_leaf = ts.clone().requires_grad_(True)
    consistency_loss(ss, sp, t_leaf, tp, tau).backward()
    assert ss.grad is not None and sp.grad is not None and t_leaf.grad is None


def test_discriminator_loss_real_fake_and_mismatched():
    real, fake, mis = torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 0.5]), torch.tensor([0.0, -3.0])
    base = (F.binary_cross_entropy_with_logits(real, torch.ones(2))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros(2)))
    assert torch.equal(discriminator_loss(real, fake), base)
    assert torch.equal(discriminator_loss(real, fake, mis),
                       base + F.binary_cross_entropy_with_logits(mis, torch.zeros(2)))


def test_retrieval_reward():
    e = torch.eye(4)
    assert torch.allclose(retrieval_reward(e, e, "inverse_rank", 0.2), torch.ones(4))
    assert torch.allclose(retrieval_reward(e, e, "neg_triplet", 0.2), torch.zeros(4))
    # sketch 0 closer to photo 1 than to its own photo: rank 2, negative reward
    s = e.clone()
    s[0] = F.normalize(torch.tensor([0.3, 1.0, 0.0, 0.0]), dim=0)
    r = retrieval_reward(s, e, "inverse_rank", 0.2)
    assert r[0].item() == pytest.approx(0.5) and torch.allclose(r[1:], torch.ones(3))
    assert retrieval_reward(s, e, "neg_triplet", 0.2)[0].item() < 0
    # extra gallery rows are extra negatives: a tie counts against the sketch ...
    r = retrieval_reward(e[:2], torch.cat([e[:2], e[:1]]), "inverse_rank", 0.2)
    assert r.tolist() == [0.5, 1.0]
    # ... unless that row is the sketch's own photo again
    same = torch.tensor([[True, False, True], [False, True, False]])
    assert retrieval_reward(e[:2], torch.cat([e[:2], e[:1]]), "inverse_rank", 0.2, same=same).tolist() == [1.0, 1.0]


def test_sample_negatives_and_shift():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 3, 5, 1] * 20)
    neg = sample_negatives(pos, labels, torch.arange(6), 1.0, g)
    assert torch.all(neg != pos)
    same_possible = pos != 5  # class 2 has one photo: falls back to any other photo
    assert torch.all(labels[neg][same_possible] == labels[pos][same_possible])
    x = torch.rand(3, 3, 8, 8)
    assert random_shift(x, 0, g) is x and random_shift(x, 2, g).shape == x.shape


def test_discriminator_shapes_and_variant_specs():
    d = PairDiscriminator(8)
    assert d(torch.rand(5, 1, 32, 32), torch.rand(5, 3, 32, 32)).shape == (5,)
    assert d(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32)).shape == (2,)
    specs = {s.name: s for s in variant_specs(FGJointParams(ablations=["no_weighting"], supervised_steps=7,
                                                            joint_steps=5))}
    assert list(specs) == ["supervised_pretrain", "supervised", "full_pretrain", "full", "semi", "semi_no_weighting"]
    assert not specs["semi_no_weighting"].weighting and specs["semi_no_weighting"].consistency
    oracle = variant_specs(FGJointParams(ablations=["oracle_sketches"]))[-1]
    assert oracle.name == "semi_oracle_sketches" and oracle.oracle and not oracle.policy_gradient
    # equal budgets: every reported model = its pretrain phase + joint_steps
    assert specs["semi"].start_from == specs["supervised"].start_from == "supervised_pretrain"
    assert specs["full"].start_from == "full_pretrain" and specs["full_pretrain"].steps == 7
    assert specs["semi"].steps == specs["supervised"].steps == specs["full"].steps == 5
    with pytest.raises(ValueError, match="supervised"):
        FGJointParams(variants=["semi"])


# ----------------------------------------------------------------------------- pairs and rendering
def _set(ids, labels, photo_ids=None, labelled=None):
    n = len(ids)
    return ImageSet(images=torch.zeros(n, 1, 4, 4, dtype=torch.uint8), labels=torch.tensor(labels), ids=ids,
                    photo_ids=photo_ids or [], labelled=None if labelled is None else torch.tensor(labelled))


def test_fine_grained_pairs_use_the_photos_labelled_flag():
    photos = _set(["a", "b", "c"], [0, 0, 1], labelled=[True, False, False])
    # every sketch keeps its photo_id (the layout where 'labelled' alone decides) + one unpaired sketch
    sketches = _set(["sa", "sb", "sc", "sx"], [0, 0, 1, 1], photo_ids=["a", "b", "c", None])
    s, p = fine_grained_pairs(sketches, photos, labelled_only=True)
    assert s.tolist() == [0] and p.tolist() == [0]
    s, p = fine_grained_pairs(sketches, photos, labelled_only=False)
    assert s.tolist() == [0, 1, 2] and p.tolist() == [0, 1, 2]


def test_render_and_simplify():
    s3 = np.array([[100, 100, 0], [20, 0, 0], [0, 20, 1], [-20, 0, 1]], np.float32)
    out = simplify_all([s3, None], 1.0)
    assert out[1] is None and out[0][0, :2].tolist() == [0.0, 0.0]
    img = render_sketches(out[:1], 32, 1.0)
    assert img.shape == (1, 1, 32, 32) and img.dtype == torch.uint8 and img.min() < 128 and img.max() == 255
    # translation does not change the rendering (the rasteriser fits the bounding box)
    assert torch.equal(img, render_sketches([s3], 32, 1.0))


# ----------------------------------------------------------------------------- metrics
def test_acc_at_k_hand_made():
    gallery = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0],     # true 0: rank 1
                            [0, 0.5, 1.0, 0],   # true 1: photo 2 closer -> rank 2
                            [1.0, 0, 1.0, 0],   # true 2: tie with photo 0 -> counts against: rank 2
                            [1.0, 1.0, 1.0, 0.1]])  # true 3: rank 4
    m, ranks = fine_grained_metrics(queries, gallery, torch.tensor([0, 1, 2, 3]), ks=(1, 2, 3))
    assert ranks.tolist() == [1, 2, 2, 4]
    assert m["acc@1"] == pytest.approx(0.25) and m["acc@2"] == pytest.approx(0.75)
    assert m["acc@3"] == pytest.approx(0.75) and m["mean_rank"] == pytest.approx(2.25)
    # constant embeddings: every rank is the gallery size
    _, ranks = fine_grained_metrics(torch.ones(3, 2), torch.ones(5, 2), torch.tensor([0, 2, 4]))
    assert ranks.tolist() == [5, 5, 5]
    c = chance_metrics(480, (1, 5, 10))
    assert c["acc@1"] == pytest.approx(1 / 480) and c["acc@10"] == pytest.approx(10 / 480)


# ----------------------------------------------------------------------------- data-free init
def test_data_free_init_loads_students(tmp_path):
    from sbir.config import DistillParams
    from sbir.models.backbones import EncoderPair

    p = DistillParams.model_validate({"student": {"backbone": {"width": 8, "depth": 2}, "embed_dim": 16}})
    students = EncoderPair(p.student.backbone, p.student.embed_dim, p.student.head)
    with torch.no_grad():
        for t in students.parameters():
            t.normal_()
    path = tmp_path / "students.pt"
    torch.save({"students": students.state_dict(), "params": p.model_dump(mode="json")}, path)
    photos = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    sketches = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    model, arch = initial_model("data_free", photos, sketches, students_path=path)
    assert arch == {"backbone": p.student.backbone.model_dump(mode="json"), "embed_dim": 16,
                    "head": p.student.head, "image_size": 16}
    for (k, a), b in zip(model.state_dict().items(), students.state_dict().values()):
        assert torch.equal(a, b), k
    scratch, scratch_arch = initial_model("scratch", photos, sketches, student=p.student)
    assert scratch_arch == arch
    assert not torch.equal(scratch.photo_encoder.backbone.features[0].weight,
                           students.photo_encoder.backbone.features[0].weight)


# ----------------------------------------------------------------------------- tiny end to end
TINY_PARAMS = {
    "ray": {"num_workers": 0},
    "distill": {"student": {"backbone": {"name": "small_cnn", "width": 8, "depth": 3}, "embed_dim": 16}},
    "sketch_generator": {"encoder_init": "scratch", "encoder_channels": [8, 16], "feature_stride": 4, "latent_dim": 8, "decoder_hidden": 16, "attention_dim": 8,
                         "num_mixtures": 3, "max_len": 20, "steps": 4, "batch_size": 8, "log_every": 2,
                         "kl_anneal_steps": 4, "eval_pairs": 8, "num_preview": 3},
    "pseudo_pairs": {"batch_size": 32, "num_preview": 4, "teacher_check": False},
    "fgsbir_joint": {"init": "scratch", "supervised_steps": 3, "joint_steps": 3, "batch_size": 8,
                     "pseudo_batch_size": 8, "log_every": 2, "ablations": ["no_weighting", "oracle_sketches"],
                     "discriminator": {"augment_shift": 1},
                     "policy_gradient": {"every": 2, "batch_size": 4, "baseline": "moving_average",
                                         "photos": "unlabelled"}},
    "fg_evaluate": {"ks": [1, 5, 10], "num_retrieval_examples": 3},
}


def test_tiny_pipeline_end_to_end(tiny_dataset, tmp_path):
    from sbir.fgsbir.pseudo_pairs import read_pseudo_pairs
    from sbir.models.checkpoints import load_generator, load_retrieval_checkpoint
    from sbir.stage import run_stage

    out = tmp_path / "outputs"
    params = {"dataset_dir": str(tiny_dataset), "outputs_dir": str(out), **TINY_PARAMS}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    argv = ["--params", str(pfile), "--no-mlflow"]

    m = run_stage("sketch_generator", argv)
    assert m["steps"] == 4 and m["num_pairs"] > 0 and math.isfinite(m["train_total"])
    assert math.isfinite(m["photo_loss_gain"]) and 0.0 <= m["attention_entropy"] <= 1.0
    g, blob = load_generator(out / "sketch_generator/generator.pt")
    assert blob["config"]["max_len"] == 20 and float(g.offset_scale[0]) > 0
    assert (out / "sketch_generator/samples.png").stat().st_size > 0

    m = run_stage("pseudo_pairs", argv)
    table = pq.read_table(out / "pseudo_pairs/pseudo_pairs.parquet")
    photos = pq.read_table(tiny_dataset / "photos.parquet", columns=["id", "split", "labelled"]).to_pylist()
    unlabelled = {r["id"] for r in photos if r["split"] == "train" and not r["labelled"]}
    assert set(table.column("photo_id").to_pylist()) == unlabelled and m["num_pseudo_pairs"] == len(unlabelled)
    assert table.column("discriminator_score").null_count == len(unlabelled)
    pseudo = read_pseudo_pairs(out / "pseudo_pairs/pseudo_pairs.parquet", with_strokes=True)
    assert pseudo["images"].shape[1:] == (1, 32, 32) and len(pseudo["strokes"]) == len(unlabelled)

    m = run_stage("fgsbir_joint", argv)
    for name in ("supervised_pretrain", "supervised", "full_pretrain", "full", "semi", "semi_no_weighting",
                 "semi_oracle_sketches"):
        model, ck = load_retrieval_checkpoint(out / f"fgsbir_joint/checkpoints/{name}.pt")
        assert ck["variant"] == name and ck["init"] == "scratch"
    assert m["num_pseudo_pairs"] == len(unlabelled) and 0 < m["num_labelled_pairs"] <= m["num_all_pairs"]
    scores = pq.read_table(out / "fgsbir_joint/pseudo_scores.parquet").column("discriminator_score").to_numpy()
    assert len(scores) == len(unlabelled) and np.all((scores >= 0) & (scores <= 1))
    assert math.isfinite(m["semi/first_g_reward"]) and math.isfinite(m["semi/final_g_reward_retrieval"])
    assert 0.0 <= m["semi/mean_pseudo_weight"] <= 2.0 and 0.0 <= m["semi_oracle_sketches/mean_pseudo_weight"] <= 2.0

    m = run_stage("fg_evaluate", argv)
    for name in ("chance", "supervised", "semi", "full", "semi_no_weighting"):
        for k in (1, 5, 10):
            assert 0.0 <= m[f"{name}/acc@{k}"] <= 1.0
    assert m["gallery_size"] == 32 and m["num_queries"] == 32
    for g_name in ("pretrained", "after_pg"):  # G's sketches of the test photos as queries, before and after PG
        assert 1.0 <= m[f"generated_{g_name}/full/mean_rank"] <= 32 and 0.0 <= m[f"generated_{g_name}/semi/acc@5"] <= 1.0
    emb = out / "fg_evaluate/embeddings"
    q, g_ = np.load(emb / "semi_query.npy"), np.load(emb / "semi_gallery.npy")
    from sbir.metrics import accuracy_at_k, true_match_ranks

    ranks = true_match_ranks(q, g_, np.load(emb / "true_index.npy"))
    assert accuracy_at_k(ranks, (5,))["acc@5"] == pytest.approx(m["semi/acc@5"], abs=1e-4)
    assert (out / "fg_evaluate/rank_histogram.png").stat().st_size > 0
    assert (out / "fg_evaluate/retrievals_semi.png").stat().st_size > 0
    assert json.loads((out / "fg_evaluate/metrics.json").read_text())["semi/acc@1"] == m["semi/acc@1"]


def test_joint_needs_earlier_outputs(tiny_dataset, tmp_path):
    from sbir.stage import run_stage

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump({"dataset_dir": str(tiny_dataset), "outputs_dir": str(tmp_path / "o"),
                                     "ray": {"num_workers": 0}}))
    with pytest.raises(FileNotFoundError, match="students.pt"):
        run_stage("fgsbir_joint", ["--params", str(pfile), "--no-mlflow"])


def test_teacher_agreement_scores_pseudo_and_real_sketches(tmp_path):
    """pseudo_pairs.teacher_check: the sketch teacher's accuracy on pseudo sketches against their photo's
    class, the real train sketches for reference, and chance over the classes the teacher knows."""
    from sbir.config import TeacherParams
    from sbir.fgsbir.pseudo_pairs import teacher_agreement
    from sbir.models.checkpoints import TeacherSet

    p = TeacherParams(sketch_classes=[0, 1, 2, 3])
    torch.manual_seed(0)
    teachers = TeacherSet(p, 5)
    torch.save({"params": p.model_dump(mode="json"), "num_classes": 5, "model": teachers.state_dict()},
               tmp_path / "teachers.pt")
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10) % 5
    teachers.eval()
    with torch.no_grad():
        pred = teachers.sketch_teacher(images.float().div(255).expand(-1, 3, -1, -1)).argmax(1)
    real = ImageSet(ids=[str(i) for i in range(10)], images=images, labels=labels)
    out = teacher_agreement(tmp_path / "teachers.pt", images, labels, real)
    assert out["sketch_teacher_acc_pseudo"] == pytest.approx(float((pred == labels).float().mean()), abs=1e-4)
    assert out["sketch_teacher_acc_real_train"] == out["sketch_teacher_acc_pseudo"]
    assert out["chance_class_acc"] == 0.25


def test_generator_global_context_is_the_frozen_photo_teacher(tmp_path):
    """sketch_generator.global_context photo_teacher: G's latent reads the whole photo teacher's pooled features
    (copied in, frozen, saved with G and rebuilt by load_generator), next to a scratch attention encoder."""
    from sbir.config import TeacherParams
    from sbir.fgsbir.generator_train import copy_teacher_encoder, generator_config
    from sbir.fgsbir.params import GeneratorParams
    from sbir.models.checkpoints import TeacherSet, load_generator
    from sbir.models.sketch_generator import PhotoToSketchGenerator

    tp = TeacherParams()
    torch.manual_seed(0)
    teachers = TeacherSet(tp, 4).eval()
    p = GeneratorParams(encoder_init="scratch", global_context="photo_teacher", feature_stride=8)
    cfg = generator_config(p, 32, tp.model_dump(mode="json"))
    g = PhotoToSketchGenerator(cfg)
    copy_teacher_encoder(g, teachers, encoder=False)
    teacher_w = teachers.photo_teacher.backbone.state_dict()
    assert all(torch.equal(v, teacher_w[k]) for k, v in g.global_encoder.module[1].state_dict().items())
    assert not any(w.requires_grad for w in g.global_encoder.parameters())
    assert g.to_mu.in_features == 64 + teachers.photo_teacher.backbone.out_dim  # scratch map + teacher features
    photos = torch.rand(3, 3, 32, 32)
    _, mu, _ = g.eval().encode(photos)
    torch.save({"config": cfg.to_dict(), "model": g.state_dict()}, tmp_path / "generator.pt")
    loaded, _ = load_generator(tmp_path / "generator.pt")
    assert torch.allclose(loaded.encode(photos)[1], mu)
    with pytest.raises(ValueError, match="teacher_pretrain"):
        generator_config(p, 32, None)


def test_best_of_candidates_keeps_the_sketch_the_teachers_agree_on_most():
    """pseudo_pairs.candidates: K samples per photo (the first one is G's single sample, same seed); the
    one kept scores highest under class_agreement, and it is that candidate's own sketch."""
    from pydantic import ValidationError

    from sbir.config import TeacherParams
    from sbir.fgsbir.generator_train import draw, generator_config, render_sketches
    from sbir.fgsbir.params import GeneratorParams, PseudoPairsParams
    from sbir.fgsbir.pseudo_pairs import class_agreement, draw_best_of
    from sbir.models.checkpoints import TeacherSet
    from sbir.models.sketch_generator import PhotoToSketchGenerator

    torch.manual_seed(0)
    tp = TeacherParams()
    teachers = (TeacherSet(tp, 4).eval(), {"params": tp.model_dump(mode="json")})
    gp = GeneratorParams(encoder_init="scratch", encoder_channels=[8, 16], feature_stride=4, latent_dim=8,
                         decoder_hidden=16, attention_dim=8, num_mixtures=3, max_len=12)
    g = PhotoToSketchGenerator(generator_config(gp, 32, None)).eval()
    photos = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)

    single = draw_best_of(g, photos, PseudoPairsParams(candidates=1), 32, seed=3)
    strokes, _, _ = draw(g, photos, 0.4, seed=3)
    assert torch.equal(single["images"], render_sketches(strokes, 32, 1.0)) and single["agreement"] is None

    best = draw_best_of(g, photos, PseudoPairsParams(candidates=3), 32, seed=3, teachers=teachers)
    per_candidate, candidate_strokes = [], []
    for k in range(3):
        s_k, _, _ = draw(g, photos, 0.4, seed=3 + 7919 * k)
        candidate_strokes.append(s_k)
        per_candidate.append(render_sketches(s_k, 32, 1.0))
    scores = torch.stack([class_agreement(*teachers, photos, im) for im in per_candidate])
    assert torch.allclose(best["agreement"], scores.max(0).values)
    for i, k in enumerate(best["chosen"].tolist()):
        assert torch.equal(best["images"][i], per_candidate[k][i])
        assert np.array_equal(best["strokes"][i], candidate_strokes[k][i])
    assert best["chosen"].tolist() == scores.argmax(0).tolist()

    with pytest.raises(ValueError, match="teachers"):
        draw_best_of(g, photos, PseudoPairsParams(candidates=2), 32, seed=3)
    with pytest.raises(ValidationError, match="greedy"):
        PseudoPairsParams(candidates=2, greedy=True)


def test_pool_refresh_if_better_keeps_the_sketch_the_teachers_agree_on_more(monkeypatch):
    """policy_gradient.refresh_if_better: G's new sketch replaces its photo's pool sketch only where the
    teachers' class agreement is higher (and the stored score follows); plain refresh replaces every pool
    slot. The agreement is stubbed by the sketch's mean pixel value so the expected choice is known."""
    from types import SimpleNamespace

    import sbir.fgsbir.joint as joint

    def agreement(teachers, blob, photos, sketches):
        return sketches.float().mean((1, 2, 3))

    monkeypatch.setattr(joint, "class_agreement", agreement)
    photos = torch.zeros((5, 3, 8, 8), dtype=torch.uint8)
    old = torch.stack([torch.full((1, 8, 8), v, dtype=torch.uint8) for v in (100, 100, 100)])  # slots 0..2
    new = torch.stack([torch.full((1, 8, 8), v, dtype=torch.uint8) for v in (150, 250, 50, 120)])
    photo_rows, slots = torch.tensor([1, 0, 3, 4]), torch.tensor([0, -1, 1, 2])  # photo 0 has no pool slot
    vr = joint.VariantRun.__new__(joint.VariantRun)
    vr.data = SimpleNamespace(photos=SimpleNamespace(images=photos))
    vr.teachers, vr.pool, vr.pool_agreement = ("t", {}), old.clone(), torch.full((3,), 100.0)
    assert vr.refresh_pool(slots, photo_rows, new) == pytest.approx(2 / 3)  # slots 0 and 2 improve, 1 does not
    assert vr.pool[:, 0, 0, 0].tolist() == [150, 100, 120]
    assert vr.pool_agreement.tolist() == [150.0, 100.0, 120.0]

    vr.pool, vr.pool_agreement = old.clone(), None  # plain refresh: every pool photo's new sketch goes in
    assert vr.refresh_pool(slots, photo_rows, new) == 1.0 and vr.pool[:, 0, 0, 0].tolist() == [150, 50, 120]
