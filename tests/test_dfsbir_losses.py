"""Each CrossX-DFL loss term on small tensors: sign, bounds, and which network gets the gradient."""
import math

import pytest
import torch

from sbir.config import BackboneParams, ReconstructParams, TeacherParams
from sbir.dfsbir import losses as L
from sbir.dfsbir.reconstruct import EstimatorObjective
from sbir.models.checkpoints import TeacherSet
from sbir.models.backbones import EncoderPair
from sbir.models.estimators import EstimatorPair

C = 4


def test_semantic_ce_lower_for_correct_class():
    y = torch.tensor([0, 1])
    good = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    assert L.semantic_ce(good, y) < L.semantic_ce(good.flip(0), y)


def test_class_balance_zero_when_uniform_positive_when_collapsed():
    balanced = torch.eye(C) * 20
    collapsed = torch.zeros(C, C)
    collapsed[:, 0] = 20
    assert L.class_balance(balanced) == pytest.approx(0.0, abs=1e-4)
    assert L.class_balance(collapsed) == pytest.approx(math.log(C), abs=1e-3)


def test_activation_rewards_larger_features():
    assert L.activation(torch.ones(2, 3) * 2) < L.activation(torch.ones(2, 3))


def test_modality_guidance_sign():
    right = L.modality_guidance(torch.tensor([[5.0, -5.0]]), torch.tensor([[-5.0, 5.0]]))
    wrong = L.modality_guidance(torch.tensor([[-5.0, 5.0]]), torch.tensor([[5.0, -5.0]]))
    assert right < 0.01 < wrong


def test_class_alignment_zero_for_equal_and_detach_blocks_one_side():
    a = torch.randn(3, C, requires_grad=True)
    assert float(L.class_alignment(a, a.detach().clone())) == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(3, C, requires_grad=True)
    L.class_alignment(a, b, detach="photo").backward()
    assert a.grad is None and b.grad is not None


def test_adversarial_hardness_is_bounded_and_rewards_disagreement():
    t = torch.tensor([[10.0, 0, 0, 0]])
    agree = L.adversarial_hardness(t, t.clone(), bound=2.0)
    disagree = L.adversarial_hardness(t, torch.tensor([[0, 10.0, 0, 0]]), bound=2.0)
    assert disagree < agree
    assert float(disagree) == pytest.approx(-2.0)  # clamped at the bound, cannot diverge


def test_diversity_prefers_different_samples():
    z = torch.randn(4, 8)
    same = torch.ones(4, 3, 2, 2) * 0.5
    diff = torch.rand(4, 3, 2, 2)
    assert L.diversity(diff, z) < L.diversity(same, z) == 0


def test_bn_prior_zero_at_running_stats():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    prior = L.BNStatsPrior(net)
    x = torch.randn(256, 1, 4, 4)
    with prior.collecting():
        net(x)
    far = prior.loss()
    net[1].running_mean.copy_(net[0](x).mean((0, 2, 3)).detach())
    net[1].running_var.copy_(net[0](x).var((0, 2, 3), unbiased=False).detach())
    with prior.collecting():
        net(x)
    assert prior.loss() < 1e-4 < far
    prior.remove()


def test_bn_prior_hooks_act_only_while_collecting():
    """Passes of the same network outside the objective (distill runs the teachers on every student batch)
    add no terms: before, they piled up when no estimator step read them (fast synthesis: +2.7 GB in 240 rounds,
    benchmarks/results/distill_memory.json)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    calls: list[int] = []
    prior = L.BNStatsPrior(net, moments=lambda x: (calls.append(1) or x.mean((0, 2, 3)), x.var((0, 2, 3))))
    for _ in range(3):
        net(torch.randn(8, 1, 4, 4))
    assert prior.terms == [] and calls == []
    with prior.collecting():
        net(torch.randn(8, 1, 4, 4))
        net(torch.randn(8, 1, 4, 4))
    net(torch.randn(8, 1, 4, 4))
    assert len(prior.terms) == 2 and len(calls) == 2
    with prior.collecting():  # a new pass drops the terms of the last
        net(torch.randn(8, 1, 4, 4))
    assert len(prior.terms) == 1
    prior.remove()



def test_channel_moments_match_torch_and_their_hand_written_gradient():
    x = (torch.randn(6, 3, 4, 5, dtype=torch.double) * 2 + 3).requires_grad_(True)
    mean, var = L.ChannelMoments.apply(x)
    assert torch.allclose(mean, x.mean((0, 2, 3))) and torch.allclose(var, x.var((0, 2, 3), unbiased=False))
    assert torch.autograd.gradcheck(L.ChannelMoments.apply, (x,))
    # bf16 channels-last input (a conv output under autocast): fp32 statistics, a bf16 gradient of its layout
    xb = x.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    mean_b, var_b = L.ChannelMoments.apply(xb)
    assert mean_b.dtype == var_b.dtype == torch.float32
    (mean_b.sum() + var_b.sum()).backward()
    xf = xb.detach().float().requires_grad_(True)
    (xf.mean((0, 2, 3)).sum() + xf.var((0, 2, 3), unbiased=False).sum()).backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.allclose(xb.grad.float(), xf.grad, rtol=0.02, atol=1e-3)

def test_proxy_anchor_pulls_to_own_proxy_and_kd_zero_when_matching():
    proxies = torch.eye(C, 8)
    loss_fn = L.make_proxy_anchor(C, 8, proxies)
    labels = torch.arange(C)
    on = torch.nn.functional.normalize(torch.eye(C, 8), dim=1)
    off = on.roll(1, 0)
    assert loss_fn(on, labels) < loss_fn(off, labels)
    logits = torch.randn(5, C)
    assert L.teacher_kd(logits, logits, 4.0) == pytest.approx(0.0, abs=1e-5)


def test_cross_modal_triplet_zero_when_classes_separated():
    e = torch.nn.functional.normalize(torch.eye(C, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1])  # batches hold several samples per class
    e = torch.stack([e[0], e[0], e[1], e[1]])
    assert L.cross_modal_triplet(e, labels, e, labels, 0.2) == 0
    assert L.cross_modal_triplet(e, labels, e.flip(0), labels, 0.2) > 0


def test_init_proxies_projects_teacher_rows():
    w = torch.randn(C, 32)
    p = L.init_proxies(w, C, 8, torch.Generator().manual_seed(0))
    assert p.shape == (C, 8) and torch.allclose(p.norm(dim=1), torch.ones(C))


def test_estimator_objective_gradient_reaches_estimators_only():
    tp = TeacherParams(backbone=BackboneParams(width=8, depth=3), modality_backbone=BackboneParams(width=4, depth=2))
    teachers = TeacherSet(tp, C).eval().requires_grad_(False)
    rp = ReconstructParams(latent_dim=8, estimator_width=4, weights={"bn_prior": 1.0})
    estimators = EstimatorPair(8, C, 4, 16)
    students = EncoderPair(BackboneParams(width=8, depth=3), 8)
    students.requires_grad_(False)
    z, y = estimators.sample_inputs(8)
    x_p, x_s = estimators(z, y)
    objective = EstimatorObjective(teachers, rp, adversarial_weight=1.0)  # as distill builds it
    total, terms, _ = objective(x_p, x_s, y, z, students, (torch.randn(C, 8),) * 2)
    assert set(terms) == {"semantic_ce", "class_balance", "activation", "modality", "class_alignment", "diversity",
                          "bn_prior", "adversarial"}
    total.backward()
    assert all(p.grad is not None for p in estimators.photo_estimator.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teachers.parameters())
    assert all(p.grad is None for p in students.parameters())


def test_estimator_objective_judges_with_the_classes_each_teacher_knows():
    """Class-split teachers: the estimator objective's class terms use the masked logits, as the teachers'
    forward gives them. The head rows of classes a teacher never saw were never trained; raw, a large one
    would own the class terms (seen with pretrained teachers: semantic cross-entropy ~1,000 and a bank at
    chance)."""
    torch.manual_seed(0)
    tp = TeacherParams(backbone=BackboneParams(width=8, depth=3), modality_backbone=BackboneParams(width=4, depth=2),
                       photo_classes=[0, 1, 2], sketch_classes=[0, 1, 2])
    teachers = TeacherSet(tp, C).eval().requires_grad_(False)
    with torch.no_grad():  # the unseen class's untrained row outscores every known class
        for t in (teachers.photo_teacher, teachers.sketch_teacher):
            t.head.bias[3] = 50.0
    rp = ReconstructParams(latent_dim=8, estimator_width=4, weights={"bn_prior": 0.0})
    estimators = EstimatorPair(8, C, 4, 16)
    estimators.classes = teachers.known_classes()
    z, y = estimators.sample_inputs(8)
    x_p, x_s = estimators(z, y)
    _, terms, out = EstimatorObjective(teachers, rp)(x_p, x_s, y, z)
    with torch.no_grad():
        masked_p, masked_s = teachers.photo_teacher(x_p), teachers.sketch_teacher(x_s)
    assert torch.equal(out["photo_logits"], masked_p) and torch.equal(out["sketch_logits"], masked_s)
    expected = torch.nn.functional.cross_entropy(masked_p, y) + torch.nn.functional.cross_entropy(masked_s, y)
    assert torch.allclose(terms["semantic_ce"], expected) and terms["semantic_ce"] < 10


def test_class_alignment_of_overlapping_teachers_compares_the_classes_both_know():
    """Photo teacher on classes 0-2, sketch teacher on 1-3: the pair's alignment is the KL over classes 1-2
    (over all four, each teacher's mass on a class the other never saw meets a -1e4 logit: KL ~ 1e3+)."""
    torch.manual_seed(0)
    tp = TeacherParams(backbone=BackboneParams(width=8, depth=3), modality_backbone=BackboneParams(width=4, depth=2),
                       photo_classes=[0, 1, 2], sketch_classes=[1, 2, 3])
    teachers = TeacherSet(tp, C).eval().requires_grad_(False)
    rp = ReconstructParams(latent_dim=8, estimator_width=4, weights={"bn_prior": 0.0})
    estimators = EstimatorPair(8, C, 4, 16)
    z, y = estimators.sample_inputs(16)
    x_p, x_s = estimators(z, y)
    _, terms, out = EstimatorObjective(teachers, rp)(x_p, x_s, y, z)
    both = (y == 1) | (y == 2)
    expected = L.class_alignment(out["photo_logits"][both][:, 1:3], out["sketch_logits"][both][:, 1:3])
    assert torch.allclose(terms["class_alignment"], expected) and terms["class_alignment"] < 10


def test_sample_bank_ring_buffer_keeps_newest():
    from sbir.dfsbir.distill import SampleBank

    def batch(start, n):
        v = torch.arange(start, start + n)
        return {"photo": v.view(n, 1, 1, 1).expand(n, 3, 2, 2).to(torch.uint8),
                "sketch": v.view(n, 1, 1, 1).to(torch.uint8).expand(n, 1, 2, 2),
                "photo_teacher_label": v, "sketch_teacher_label": v}

    bank = SampleBank(batch(0, 3), capacity=5)
    assert bank.size == 3
    bank.add(batch(3, 4))  # 7 items into 5 slots: 0 and 1 are gone
    assert bank.size == 5
    assert sorted(bank.data["photo_teacher_label"].tolist()) == [2, 3, 4, 5, 6]
    s = bank.sample(10, torch.Generator().manual_seed(0))
    assert set(s["sketch_teacher_label"].tolist()) <= {2, 3, 4, 5, 6}


def test_students_on_the_teachers_frozen_backbones_share_one_backbone_pass():
    """The default students (teacher backbones, frozen, plus a trained head): the shared pass gives the same
    losses and the same head gradients as running students and teachers apart; trainable backbones or
    different weights never take it."""
    from sbir.config import DistillParams
    from sbir.dfsbir.distill import build_proxies, shares_frozen_backbones, student_losses, weighted_total
    from sbir.models.checkpoints import build_students

    torch.manual_seed(0)
    bb = BackboneParams(width=8, depth=3)
    tp = TeacherParams(backbone=bb, modality_backbone=BackboneParams(width=4, depth=2), photo_classes=[0, 1, 2])
    teachers = TeacherSet(tp, C)  # a photo teacher that never saw class 3: its logit is masked either way
    for m in teachers.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    teachers.eval().requires_grad_(False)
    p = DistillParams.model_validate({"student": {"backbone": bb.model_dump(), "embed_dim": 8, "head": "mlp",
                                                  "init_from_teacher": True, "backbone_lr_scale": 0.0,
                                                  "freeze_bn_stats": True}})
    students = build_students(p.student, teachers, {"backbone": bb.model_dump()})
    students.eval()
    for q in students.photo_encoder.backbone.parameters():
        q.requires_grad_(False)
    for q in students.sketch_encoder.backbone.parameters():
        q.requires_grad_(False)
    proxies = build_proxies(p, teachers, C, seed=0)
    assert shares_frozen_backbones(students, teachers, p)
    x_p, x_s = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    results = []
    for shared in (False, True):
        students.zero_grad()
        terms = student_losses(students, proxies, teachers, x_p, x_s, p, shared_backbones=shared)
        weighted_total(terms, p).backward()
        results.append(({k: v.detach() for k, v in terms.items()},
                        [q.grad.clone() for q in students.photo_encoder.project.parameters()]))
    (plain, g_plain), (fast, g_fast) = results
    assert plain.keys() == fast.keys() and all(torch.allclose(plain[k], fast[k], atol=1e-6) for k in plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_fast))
    trainable = p.model_copy(update={"student": p.student.model_copy(update={"backbone_lr_scale": 0.1})})
    assert not shares_frozen_backbones(students, teachers, trainable)
    with torch.no_grad():
        next(students.sketch_encoder.backbone.parameters()).add_(0.01)
    assert not shares_frozen_backbones(students, teachers, p)
