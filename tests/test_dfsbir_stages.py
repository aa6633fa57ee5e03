"""The data-free stage functions in-process (local-mode Ray), including the ResNet path that real
data uses on GPUs: same code, params only."""
from __future__ import annotations

import json

import pytest
import yaml

from sbir.dfsbir.reconstruct import read_bank
from sbir.stage import run_stage


def _params(tmp_path, dataset, backbone: dict, image_size: int, teacher_extra: dict | None = None) -> str:
    params = {
        "seed": 0, "dataset_dir": str(dataset), "outputs_dir": str(tmp_path / "outputs"),
        "ray": {"num_workers": 0},
        "teacher_pretrain": {"backbone": backbone, "image_size": image_size, "epochs": 1, "batch_size": 16,
                             **(teacher_extra or {})},
        "reconstruct": {"steps": 2, "batch_size": 8, "log_every": 1, "bank_size": 24, "estimator_width": 4,
                        "latent_dim": 8},
        "distill": {"student": {"backbone": backbone, "embed_dim": 16}, "rounds": 2, "student_steps": 1,
                    "batch_size": 8, "log_every": 1},
        "upper_bound": {"student": {"backbone": backbone, "embed_dim": 16}, "max_steps": 4, "eval_every": 2,
                        "batch_size": 8},
        "evaluate": {"map_ks": [10], "precision_ks": [5]},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def _run_all(params: str) -> dict:
    argv = ["--params", params, "--no-mlflow"]
    for stage in ("teacher_pretrain", "reconstruct", "distill", "upper_bound"):
        run_stage(stage, argv)
    return run_stage("evaluate", argv)


def test_small_cnn_chain_writes_every_output(tmp_path, tiny_dataset):
    params = _params(tmp_path, tiny_dataset, {"name": "small_cnn", "width": 8, "depth": 3}, 32)
    metrics = _run_all(params)
    out = tmp_path / "outputs"
    assert metrics["num_queries"] == 4 * 8
    assert 0 <= metrics["crossx_dfl/mAP@all"] <= 1
    bank = read_bank(str(out / "reconstruct/bank.parquet"))
    assert bank["photo"].shape == (24, 3, 32, 32) and bank["sketch"].shape == (24, 1, 32, 32)
    for f in ("teacher_pretrain/teachers.pt", "reconstruct/pairs.png", "distill/students.pt",
              "upper_bound/students.pt", "evaluate/pr_curve.json", "evaluate/retrievals.png",
              "evaluate/embeddings/crossx_dfl_query.npy"):
        assert (out / f).is_file(), f
    rows = json.loads((out / "evaluate/pr_curve.json").read_text())
    classifier_variants = {"classifier_only", "classifier_only_t0.5", "classifier_only_t2", "classifier_only_t4",
                           "classifier_only_logits"}
    assert {r["method"] for r in rows} == classifier_variants | {"crossx_dfl", "upper_bound"}
    # the baseline to beat is the best classifier-only variant, named, with its own metrics
    best = metrics["classifier_only_best_variant"]
    assert best in classifier_variants
    assert metrics["classifier_only_best/mAP@all"] == max(metrics[f"{v}/mAP@all"] for v in classifier_variants)
    assert metrics["crossx_dfl_minus_classifier_only_best"] == pytest.approx(
        metrics["crossx_dfl/mAP@all"] - metrics["classifier_only_best/mAP@all"], abs=2e-4)


def test_classifier_only_variants_share_logits_and_temper_them():
    import torch

    from sbir.dfsbir.evaluate import classifier_embeddings
    from sbir.data.datasets import ImageSet

    class Teacher:  # fixed logits per image, both classes known
        known = torch.ones(2, dtype=torch.bool)

        def __call__(self, x):
            return x.mean(dim=(2, 3))[:, :2] * 4

    class Teachers:  # the sketch teacher sees sketches, the photo teacher photos
        sketch_teacher = photo_teacher = Teacher()

    images = torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8)
    s = ImageSet(images=images, labels=torch.zeros(5, dtype=torch.long), ids=[str(i) for i in range(5)])
    out = classifier_embeddings(Teachers(), s, s, 8, 2, [0.5, 1.0, 4.0], logits=True)
    assert set(out) == {"classifier_only_t0.5", "classifier_only", "classifier_only_t4", "classifier_only_logits"}
    logits = out["classifier_only_logits"][0]
    assert torch.allclose(out["classifier_only"][0], logits.softmax(1))
    assert torch.allclose(out["classifier_only_t4"][0], (logits / 4).softmax(1))
    # a lower temperature sharpens: the top class gets more mass
    assert (out["classifier_only_t0.5"][0].max(1).values >= out["classifier_only_t4"][0].max(1).values).all()


def test_resnet18_path_by_params_only(tmp_path, tiny_dataset):
    """ResNet-18 backbone, images resized to 64 px by the teachers: only params differ."""
    params = _params(tmp_path, tiny_dataset, {"name": "resnet18"}, 64)
    metrics = _run_all(params)
    assert 0 <= metrics["upper_bound/mAP@all"] <= 1


def test_resnet18_builds_and_loads_local_weights(tmp_path):
    import torch
    import torchvision

    from sbir.config import BackboneParams
    from sbir.models.backbones import Classifier

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = Classifier(BackboneParams(name="resnet18", weights_path=str(weights)), 5)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(FileNotFoundError, match="not found"):
        Classifier(BackboneParams(name="resnet18", weights_path=str(tmp_path / "missing.pth")), 5)


def test_partial_class_overlap_reports_each_class_group(tmp_path, tiny_dataset):
    """Photo teacher on classes 0-2, sketch teacher on 1-3: metrics per group, and the softmax baseline
    has no coordinate for a class its teacher never saw."""
    import torch

    from sbir.models.checkpoints import load_teachers

    params = _params(tmp_path, tiny_dataset, {"name": "small_cnn", "width": 8, "depth": 3}, 32,
                     {"photo_classes": [0, 1, 2], "sketch_classes": [1, 2, 3]})
    metrics = _run_all(params)
    for group in ("shared", "photo_only", "sketch_only"):
        for method in ("chance", "crossx_dfl", "upper_bound", "classifier_only_best"):
            assert 0 <= metrics[f"{method}/{group}/mAP@all"] <= 1
        assert metrics[f"classifier_only_best_variant/{group}"].startswith("classifier_only")
    teachers, _ = load_teachers(str(tmp_path / "outputs/teacher_pretrain/teachers.pt"))
    logits = teachers.eval().photo_teacher(torch.rand(2, 3, 32, 32))
    assert logits.softmax(1)[:, 3].max() < 1e-6  # class 3: never seen by the photo teacher
    bank = read_bank(str(tmp_path / "outputs/reconstruct/bank.parquet"))
    assert set(bank["photo_teacher_label"].tolist()) <= {0, 1, 2}
    assert set(bank["sketch_teacher_label"].tolist()) <= {1, 2, 3}


def test_class_groups_name_seen_unseen_and_overlap():
    import torch

    from sbir.dfsbir.evaluate import class_groups

    class Teachers:
        def __init__(self, photo, sketch):
            mask = lambda ids: torch.isin(torch.arange(5), torch.tensor(ids))  # noqa: E731
            self.photo_teacher = type("T", (), {"known": mask(photo)})()
            self.sketch_teacher = type("T", (), {"known": mask(sketch)})()

    assert class_groups(Teachers([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])) == {}
    assert class_groups(Teachers([0, 1, 2], [0, 1, 2])) == {"seen": [0, 1, 2], "unseen": [3, 4]}
    assert class_groups(Teachers([0, 1, 2], [1, 2, 3])) == {"shared": [1, 2], "photo_only": [0],
                                                            "sketch_only": [3], "unseen": [4]}


def test_teacher_accuracy_across_modalities_counts_only_the_classes_a_teacher_knows():
    import torch

    from sbir.data.datasets import ImageSet
    from sbir.dfsbir.evaluate import teacher_accuracy_across_modalities

    class ReadsTheMeanPixel(torch.nn.Module):
        """Predicts class round(mean pixel * 4): photos are drawn to be right, sketches wrong."""

        def __init__(self, known):
            super().__init__()
            self.known = torch.isin(torch.arange(5), torch.tensor(known))

        def forward(self, x):
            return torch.nn.functional.one_hot((x.mean((1, 2, 3)) * 4).round().long(), 5).float()

    labels = torch.tensor([0, 1, 2, 3, 4])
    photos = ImageSet((labels * 255 // 4).to(torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2).clone(), labels,
                      [f"p{i}" for i in range(5)])
    sketches = ImageSet(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), labels, [f"s{i}" for i in range(5)])
    teachers = type("Teachers", (), {"photo_teacher": ReadsTheMeanPixel([0, 1, 2, 3]),
                                     "sketch_teacher": ReadsTheMeanPixel([1, 2])})()
    acc = teacher_accuracy_across_modalities(teachers, sketches, photos, size=None)
    # sketches are blank (class 0): right only for class 0, which the sketch teacher does not know
    assert acc == {"photo_teacher/chance": 0.25, "photo_teacher/on_photos": 1.0, "photo_teacher/on_sketches": 0.25,
                   "sketch_teacher/chance": 0.5, "sketch_teacher/on_photos": 1.0, "sketch_teacher/on_sketches": 0.0}


def test_class_ids_outside_the_dataset_are_refused_before_ray(tmp_path, tiny_dataset):
    params = _params(tmp_path, tiny_dataset, {"name": "small_cnn", "width": 8, "depth": 3}, 32,
                     {"photo_classes": [0, 9]})
    with pytest.raises(ValueError, match=r"photo_classes has class ids \[9\]"):
        run_stage("teacher_pretrain", ["--params", params, "--no-mlflow"])


def test_teacher_backbone_lr_scale_and_frozen_batchnorm_statistics():
    """backbone_lr_scale puts both classifiers' backbones in a group of their own at lr * scale (one group at
    1.0, as before); freeze_bn_stats keeps their BatchNorm statistics through an epoch while the modality
    net's still move."""
    import torch

    from sbir.config import TeacherParams
    from sbir.data.datasets import ImageSet
    from sbir.dfsbir.teacher import TeacherData, parameter_groups, train_one_epoch
    from sbir.models.checkpoints import TeacherSet
    from sbir.train.precision import LoopDevice

    p = TeacherParams(backbone_lr_scale=0.1, freeze_bn_stats=True, batch_size=4, lr=1e-2)
    teachers = TeacherSet(p, 3)
    groups = parameter_groups(teachers, p)
    backbone_ids = {id(w) for net in (teachers.photo_teacher, teachers.sketch_teacher) for w in net.backbone.parameters()}
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), 1e-2]
    assert {id(w) for w in groups[0]["params"]} == backbone_ids
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(teachers.parameters()))
    assert len(parameter_groups(teachers, TeacherParams())) == 1

    def images(n: int, c: int) -> ImageSet:
        return ImageSet(torch.randint(0, 255, (n, c, 32, 32), dtype=torch.uint8), torch.arange(n) % 3,
                        [str(i) for i in range(n)])

    data = TeacherData(images(8, 3), images(8, 1), images(4, 3), images(4, 1))
    stats = lambda net: [m.running_mean.clone() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: stats(getattr(teachers, k)) for k in ("photo_teacher", "sketch_teacher", "modality_net")}
    opt = torch.optim.AdamW(groups, lr=p.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=2)
    train_one_epoch(teachers, opt, sched, data, p, 0, 0, torch.Generator().manual_seed(0),
                    LoopDevice.from_config({}, torch.device("cpu")), 2)
    for k in ("photo_teacher", "sketch_teacher"):
        assert all(torch.equal(a, b) for a, b in zip(before[k], stats(getattr(teachers, k))))
    assert not all(torch.equal(a, b) for a, b in zip(before["modality_net"], stats(teachers.modality_net)))


def test_reptile_synthesis_adapts_a_meta_learned_initialisation(tmp_path, tiny_dataset):
    """reconstruct.synthesis: reptile meta-learns the estimators' initialisation (meta_steps x inner_steps
    updates instead of `steps`); distill adapts a copy every adapt_every rounds and draws its fresh pairs
    from it. Both stages say what their synthesis cost."""
    import torch

    from sbir.dfsbir.reconstruct import build_estimators, reptile_update

    params = _params(tmp_path, tiny_dataset, {"name": "small_cnn", "width": 8, "depth": 3}, 32)
    argv = ["--params", params, "--no-mlflow", "--set", "reconstruct.synthesis=reptile",
            "--set", "reconstruct.reptile.meta_steps=3", "--set", "reconstruct.reptile.adapt_every=2",
            "--set", "distill.rounds=3"]
    run_stage("teacher_pretrain", argv)
    rec = run_stage("reconstruct", argv)
    out = tmp_path / "outputs"
    history = json.loads((out / "reconstruct/history.json").read_text())
    assert rec["synthesis"] == "reptile" and [h["step"] for h in history] == [0, 1, 2] and rec["synthesis_seconds"] > 0
    dist = run_stage("distill", argv)
    assert dist["rounds"] == 3 and dist["synthesis_seconds"] > 0
    curves = json.loads((out / "distill/history.json").read_text())
    assert all("est_semantic_ce" in h for h in curves)  # rounds 0 and 2 adapted; round 1 shows round 0's terms
    # the Reptile step moves parameters and BatchNorm statistics part of the way towards the adapted copy
    from sbir.config import ReconstructParams

    a = build_estimators(ReconstructParams(latent_dim=8, estimator_width=4), 4, 32)
    b = build_estimators(ReconstructParams(latent_dim=8, estimator_width=4), 4, 32)
    before = [t.clone() for t in a.state_dict().values()]
    reptile_update(a, b, 0.25)
    for old, new, target in zip(before, a.state_dict().values(), b.state_dict().values()):
        if old.is_floating_point():
            assert torch.allclose(new, old + 0.25 * (target - old), atol=1e-6)


def test_synthesis_pool_keeps_the_newest_pairs_with_their_steps_teacher_labels():
    """fast.bank: pool keeps the last `size` pairs made while training, oldest first, labelled by the logits
    of the step that made them, as the bank stores images (uint8, one sketch channel)."""
    import torch

    from sbir.dfsbir.reconstruct import SynthesisPool

    pool = SynthesisPool(10)
    for step in range(3):
        x_p, x_s = torch.full((6, 3, 8, 8), step / 4), torch.full((6, 3, 8, 8), 1 - step / 4)
        y = torch.arange(6) + 10 * step
        logits = torch.nn.functional.one_hot(y % 4, 4).float() * 5
        pool.add(x_p, x_s, y, {"photo_logits": logits, "sketch_logits": logits.flip(1)})
    pairs = pool.pairs()
    assert pairs["condition"].tolist() == [12, 13, 14, 15, 20, 21, 22, 23, 24, 25]  # the newest 10, in order
    assert pool.rows() == 12  # the oldest batch is dropped once the newer ones fill the pool
    assert pairs["photo"].dtype == torch.uint8 and pairs["photo"].shape == (10, 3, 8, 8)
    assert pairs["sketch"].shape == (10, 1, 8, 8) and int(pairs["sketch"][-1].max()) == round(0.5 * 255)
    assert pairs["photo_teacher_label"].tolist() == (pairs["condition"] % 4).tolist()
    assert pairs["sketch_teacher_label"].tolist() == (3 - pairs["condition"] % 4).tolist()
    assert torch.all(pairs["photo_teacher_conf"] > 0.9)
    restored = SynthesisPool(10, pairs)  # a resumed run starts from the checkpoint's pool
    assert restored.pairs()["condition"].tolist() == pairs["condition"].tolist()


def test_fast_synthesis_is_a_short_estimator_run_and_distill_on_the_bank_alone(tmp_path, tiny_dataset):
    """reconstruct.synthesis: fast runs `fast`'s steps, batch size, bank size and modality weight in place of
    the top-level ones; distill then trains the students on the bank only (no estimator steps, no fresh pairs) for
    `fast.distill_rounds` rounds in place of distill.rounds."""
    params = _params(tmp_path, tiny_dataset, {"name": "small_cnn", "width": 8, "depth": 3}, 32)
    argv = ["--params", params, "--no-mlflow", "--set", "reconstruct.synthesis=fast",
            "--set", "reconstruct.fast.steps=3", "--set", "reconstruct.fast.batch_size=6",
            "--set", "reconstruct.fast.bank_size=10", "--set", "reconstruct.fast.distill_rounds=2"]
    run_stage("teacher_pretrain", argv)
    rec = run_stage("reconstruct", argv)
    out = tmp_path / "outputs"
    history = json.loads((out / "reconstruct/history.json").read_text())
    assert rec["synthesis"] == "fast" and rec["bank_size"] == 10 and [h["step"] for h in history] == [0, 1, 2]
    assert rec["bank_source"] == "pool"  # the last 10 of the 18 pairs made while training
    assert "modality" not in history[0] and "class_alignment" in history[0]  # fast.modality_weight 0: not run
    assert len(read_bank(str(out / "reconstruct/bank.parquet"))["condition"]) == 10
    dist = run_stage("distill", argv)
    assert dist["rounds"] == 2
    curves = json.loads((out / "distill/history.json").read_text())
    assert curves and not any(k.startswith("est_") for h in curves for k in h)  # no estimator step ran
    assert all(h["student_total"] > 0 for h in curves)  # the students trained (on the bank)
