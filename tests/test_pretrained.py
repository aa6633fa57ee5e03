"""The pretrained EfficientNet-Lite0 option (``backbone: {name: efficientnet_lite0, pretrained: true}``):
the hand-written efficientnet-pytorch -> timm name mapping, strict loading, the fixed input normalisation,
and a check that the packaged weights really are ImageNet's (Sketchy photos whose synset is an
ImageNet-1k class)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from sbir.config import BackboneParams, ParamsError, StudentParams, TeacherParams, load_params
from sbir.models import pretrained as P
from sbir.models.backbones import Classifier, EncoderPair

PRETRAINED = BackboneParams(name="efficientnet_lite0", pretrained=True)
# the check's thresholds: chance is 0.001 / 0.005 (1000 classes); measured 0.81 / 0.93 on the 42 photos
# (benchmarks/imagenet_check.py, docs/real-data.md "Pretrained backbones")
MIN_TOP1, MIN_TOP5 = 0.5, 0.75
CHECK_SIZE = 224


@pytest.fixture(scope="module")
def raw_state() -> dict[str, torch.Tensor]:
    return torch.load(P.packaged_weights_file(), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the name mapping
@pytest.mark.parametrize("src, dst", [
    ("_conv_stem.weight", "conv_stem.weight"),
    ("_bn0.running_var", "bn1.running_var"),
    ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),    # depthwise-separable block
    ("_blocks.0._bn1.weight", "blocks.0.0.bn1.weight"),
    ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
    ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
    ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),       # inverted residuals
    ("_blocks.1._bn0.weight", "blocks.1.0.bn1.weight"),
    ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
    ("_blocks.6._depthwise_conv.weight", "blocks.3.1.conv_dw.weight"),
    ("_blocks.7._bn1.running_mean", "blocks.3.2.bn2.running_mean"),
    ("_blocks.14._project_conv.weight", "blocks.5.3.conv_pwl.weight"),
    ("_blocks.15._bn2.num_batches_tracked", "blocks.6.0.bn3.num_batches_tracked"),
    ("_conv_head.weight", "conv_head.weight"),
    ("_bn1.bias", "bn2.bias"),
    ("_fc.weight", "classifier.weight"),
])
def test_name_mapping(src, dst):
    assert P.timm_key(src, expanded_blocks=set(range(1, 16))) == dst


@pytest.mark.parametrize("bad", ["_blocks.16._expand_conv.weight", "_blocks.0._expand_conv.weight",
                                 "_blocks.3._se_reduce.weight", "_stem.weight", "_fc"])
def test_name_mapping_rejects_unknown_keys(bad):
    with pytest.raises(KeyError):
        P.timm_key(bad, expanded_blocks=set(range(1, 16)))


def test_stage_depths_are_timms():
    import timm

    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    assert tuple(len(stage) for stage in net.blocks) == P.LITE0_STAGE_DEPTHS


def test_packaged_file_maps_onto_timm_by_name(raw_state):
    import timm

    own = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = P.to_timm_state(raw_state)
    assert len(raw_state) == len(mapped) == len(own) == 296
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == v.shape for k, v in own.items())
    # an independent cross-check: both namings list the tensors in the same order (PRETRAINED.md), so the
    # name mapping must coincide with the positional pairing
    assert list(mapped) == list(own)
    assert P.to_timm_state(mapped) == mapped  # a timm-named file passes through


def test_wrong_mapping_fails_the_strict_load(raw_state, tmp_path):
    """Blocks assigned to the wrong stages (wrong stage depths) or swapped across stages: shapes differ."""
    net = P.efficientnet_lite0(1000)
    with pytest.raises(ValueError, match=r"wrong-depths.*shape mismatches"):
        P.load_strict(net, P.to_timm_state(raw_state, (1, 2, 2, 3, 4, 3, 1)), "wrong-depths")
    state = P.to_timm_state(raw_state)
    swapped = _swap(state, "blocks.2.0.", "blocks.3.0.")
    with pytest.raises(ValueError, match=r"swapped.*shape mismatches"):
        P.load_strict(net, swapped, "swapped")
    # a file missing a tensor, or with a foreign one: fails loudly naming the file
    bad = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in raw_state.items() if k != "_blocks.9._bn1.weight"}, bad)
    with pytest.raises(ValueError, match=r"truncated\.pth.*1 missing.*blocks\.4\.1\.bn2\.weight"):
        Classifier(BackboneParams(name="efficientnet_lite0", weights_path=str(bad)), 3)
    foreign = tmp_path / "foreign.pth"
    torch.save({**raw_state, "_blocks.3._se_reduce.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pth.*_se_reduce"):
        Classifier(BackboneParams(name="efficientnet_lite0", weights_path=str(foreign)), 3)


def _swap(state: dict[str, torch.Tensor], a: str, b: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        out[b + k[len(a):] if k.startswith(a) else a + k[len(b):] if k.startswith(b) else k] = v
    return out


def _bn_roles_mixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plausible mapping error that shapes cannot catch: in every inverted-residual block the BN after
    the expansion and the BN after the depthwise conv (same width) exchanged."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if k.startswith("blocks.") and parts[1] != "0" and parts[3] in ("bn1", "bn2"):
            parts[3] = "bn2" if parts[3] == "bn1" else "bn1"
        out[".".join(parts)] = v
    return out


# ----------------------------------------------------------------------------- the option
def test_pretrained_option_builds_and_runs_at_64px(raw_state):
    clf = Classifier(PRETRAINED, 5).eval()
    assert clf.backbone.out_dim == 1280 and clf.uses_fixed_normalisation
    assert torch.equal(clf.backbone.net.conv_stem.weight, raw_state["_conv_stem.weight"])
    assert torch.equal(clf.backbone.net.blocks[5][3].bn2.running_var, raw_state["_blocks.14._bn1.running_var"])
    with torch.no_grad():
        assert clf(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    pair = EncoderPair(PRETRAINED, 16, "mlp").eval()
    with torch.no_grad():
        ph, sk = pair(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert ph.shape == sk.shape == (2, 16) and torch.allclose(ph.norm(dim=1), torch.ones(2))


def test_data_statistics_do_not_replace_the_pretrained_normalisation():
    from sbir.dfsbir.teacher import set_normalisation
    from sbir.models.checkpoints import TeacherSet, build_students

    teachers = TeacherSet(TeacherParams(backbone=PRETRAINED, modality_backbone=BackboneParams(width=4, depth=2)), 3)
    images = SimpleNamespace(images=torch.randint(0, 100, (8, 3, 16, 16), dtype=torch.uint8))
    set_normalisation(teachers, SimpleNamespace(photos=images, sketches=images))
    for norm in (teachers.photo_teacher.normalise, teachers.sketch_teacher.normalise):
        assert torch.equal(norm.mean.flatten(), torch.full((3,), 0.5)) and torch.equal(norm.std.flatten(),
                                                                                       torch.full((3,), 0.5))
    assert teachers.modality_net.normalise.mean.flatten()[0] < 0.4  # a small_cnn still takes the data's
    # a fresh pretrained student beside data-normalised small_cnn teachers keeps its own statistics
    small = TeacherSet(TeacherParams(backbone=BackboneParams(width=4, depth=2),
                                     modality_backbone=BackboneParams(width=4, depth=2)), 3)
    set_normalisation(small, SimpleNamespace(photos=images, sketches=images))
    students = build_students(StudentParams(backbone=PRETRAINED, embed_dim=8, init_from_teacher=False), small, None)
    assert students.photo_encoder.uses_fixed_normalisation
    assert torch.equal(students.photo_encoder.normalise.std.flatten(), torch.full((3,), 0.5))


def test_default_backbone_unchanged():
    assert BackboneParams().pretrained is False
    clf = Classifier(BackboneParams(), 3)
    assert not clf.uses_fixed_normalisation
    clf.normalise.set_stats(torch.full((3,), 0.2), torch.full((3,), 0.1))
    assert torch.allclose(clf.normalise.mean.flatten(), torch.full((3,), 0.2))


def test_params_validation(tmp_path):
    with pytest.raises(ValidationError, match="only efficientnet_lite0"):
        BackboneParams(name="resnet18", pretrained=True)
    with pytest.raises(ValidationError, match="both set"):
        BackboneParams(name="efficientnet_lite0", pretrained=True, weights_path="x.pth")
    p = tmp_path / "params.yaml"
    p.write_text("teacher_pretrain:\n  backbone: {name: small_cnn, pretrained: true}\n")
    with pytest.raises(ParamsError, match=r"teacher_pretrain.backbone.*only efficientnet_lite0"):
        load_params(p)
    p.write_text("distill:\n  student:\n    backbone: {name: efficientnet_lite0, pretrained: true}\n")
    assert load_params(p).distill.student.backbone == PRETRAINED


def test_local_weights_file_in_either_naming(raw_state, tmp_path):
    ref = Classifier(PRETRAINED, 3).backbone.state_dict()
    for name, state in (("ep.pth", raw_state), ("timm.pth", P.to_timm_state(raw_state))):
        torch.save(state, tmp_path / name)
        clf = Classifier(BackboneParams(name="efficientnet_lite0", weights_path=str(tmp_path / name)), 3)
        got = clf.backbone.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- the ImageNet check
def test_imagenet_synsets_come_with_timm():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = info.label_names()
    assert len(synsets) == 1000
    assert (synsets[340], synsets[849], synsets[630]) == ("n02391049", "n04398044", "n03680355")
    assert info.index_to_description(849) == "teapot" and info.index_to_description(340) == "zebra"


@pytest.fixture(scope="module")
def imagenet_photos(shared_data):
    root = shared_data / "sketchy_256_subset" / "photo"
    if not root.is_dir():
        msg = f"{root} not found (the Sketchy sample of ../shared/data)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    images, labels, paths = P.imagenet_photos(root, CHECK_SIZE)
    # the sample's teapots (n04398044) and loafers (n03680355) are ImageNet-1k classes; its other classes'
    # synsets (airplane, cat, horse ...) are not
    assert len(labels) >= 40 and set(labels.tolist()) == {630, 849}, paths
    return images, labels


def test_packaged_weights_are_imagenets(imagenet_photos):
    acc = P.topk_accuracy(P.imagenet_classifier(), *imagenet_photos)
    assert acc[1] >= MIN_TOP1 and acc[5] >= MIN_TOP5, acc


def test_the_check_has_teeth(imagenet_photos):
    """A mapping that loads strictly (equal shapes) but pairs tensors with the wrong layers fails the check."""
    clf = P.imagenet_classifier()
    state = P.read_weights(P.packaged_weights_file())
    backbone = {k: v for k, v in _bn_roles_mixed(state).items() if not k.startswith("classifier.")}
    P.load_strict(clf.backbone.net, backbone, "bn-roles-mixed")
    acc = P.topk_accuracy(clf, *imagenet_photos)
    assert acc[1] < MIN_TOP1 / 2 and acc[5] < MIN_TOP5 / 2, acc
