"""The data-dependent upper bound's held-out split and the per-modality proxies."""
import torch

from sbir.config import DistillParams
from sbir.dfsbir import losses as L
from sbir.dfsbir.upper_bound import holdout_split


def test_holdout_split_holds_out_a_share_of_every_class_disjointly():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 1)
    train, val = holdout_split(labels, 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=3).tolist() == [4, 2, 0]  # a lone example stays in train
    assert torch.equal(holdout_split(labels, 0.2, seed=0)[1], val)
    assert not torch.equal(holdout_split(labels, 0.2, seed=1)[1], val)


def _proxy_anchor(rows):
    return L.make_proxy_anchor(3, 4, rows)


def test_shared_proxies_are_one_tensor_and_per_modality_ones_are_the_teachers_rows():
    rows_p, rows_s = torch.eye(3, 4), torch.eye(3, 4).flip(0)
    shared = L.StudentProxies(_proxy_anchor(rows_p))
    a, b = shared.tensors()
    assert a is b
    per = L.StudentProxies(_proxy_anchor(rows_p), _proxy_anchor(rows_s))
    a, b = per.tensors()
    assert torch.equal(a, rows_p) and torch.equal(b, rows_s)
    e = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # per modality: each student's loss against its own proxies only
    loss = per.loss(e, y, e, y)
    loss.backward()
    assert per.photo.proxies.grad is not None and per.sketch.proxies.grad is not None
    assert torch.isclose(loss, per.photo(e, y) + per.sketch(e, y))


def test_per_modality_is_a_valid_proxy_init():
    assert DistillParams(proxy_init="per_modality").proxy_init == "per_modality"


def test_split_known_keeps_each_modality_to_its_teachers_classes():
    """Class-split studies: the upper bound trains each modality on the classes its teacher knows and
    validates on the classes both know (a class no teacher saw stays unseen)."""
    from sbir.data.datasets import ImageSet
    from sbir.dfsbir.upper_bound import split_known

    labels = torch.tensor([c for c in range(4) for _ in range(10)])
    images = ImageSet(images=torch.zeros(40, 1, 4, 4, dtype=torch.uint8), labels=labels,
                      ids=[str(i) for i in range(40)])
    mask = lambda ids: torch.isin(torch.arange(4), torch.tensor(ids))  # noqa: E731
    teachers = type("Teachers", (), {"photo_teacher": type("T", (), {"known": mask([0, 1])})(),
                                     "sketch_teacher": type("T", (), {"known": mask([1, 2])})()})()
    (p_train, p_val), (s_train, s_val) = split_known(images, images, teachers, 0.2, seed=0)
    assert set(labels[p_train].tolist()) == {0, 1} and set(labels[s_train].tolist()) == {1, 2}
    assert set(labels[p_val].tolist()) == {1} and set(labels[s_val].tolist()) == {1}
    everything = type("Teachers", (), {"photo_teacher": type("T", (), {"known": mask([0, 1, 2, 3])})(),
                                       "sketch_teacher": type("T", (), {"known": mask([0, 1, 2, 3])})()})()
    (p_train, p_val), _ = split_known(images, images, everything, 0.2, seed=0)
    assert torch.equal(p_val, holdout_split(labels, 0.2, seed=0)[1])  # the default split is unchanged
