"""Tests of sbir.metrics. The expected values are worked out by hand in the comments."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sbir.metrics import (
    _expected_random_metrics,
    _metrics_from_ranked,
    accuracy_at_k,
    category_retrieval_metrics,
    chance_category_metrics,
    cosine_similarity_matrix,
    precision_recall_curve,
    true_match_ranks,
)


def ranked_gallery(n: int) -> np.ndarray:
    """n 2-D gallery vectors whose cosine similarity to the query [1, 0]
    strictly decreases with the index: cos(g_i) = 1 / sqrt(1 + (0.1 i)^2)."""
    return np.stack([np.ones(n), 0.1 * np.arange(n)], axis=1).astype(np.float32)


QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def metrics_for_pattern(pattern, ks_map=(2,), ks_precision=(1, 2, 3)):
    """Metrics for one query (label 1) whose ranked gallery has the relevance `pattern`."""
    labels = np.array(pattern, dtype=np.int64)  # 1 = relevant, 0 = other class
    return category_retrieval_metrics(QUERY, [1], ranked_gallery(len(pattern)), labels,
                                      ks_map=ks_map, ks_precision=ks_precision)


# ---------------------------------------------------------------- similarity
def test_cosine_similarity_matrix_normalises_and_accepts_numpy():
    q = np.array([[3.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([[1.0, 1.0], [5.0, 0.0]], dtype=torch.float64)
    s = cosine_similarity_matrix(q, g)
    assert isinstance(s, torch.Tensor) and s.shape == (2, 2)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(s, torch.tensor([[r, 1.0], [r, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- hand-made examples
def test_hand_computed_single_query():
    # ranked relevance 1 0 1 0 0, 2 relevant items
    # precision@1 = 1/1, precision@3 = 2/3
    # AP@all = (1 + 2/3) / 2 = 5/6
    # AP@2   = (1) / min(2, 2) = 1/2
    # P@1 = 1, P@2 = 1/2, P@3 = 2/3
    m = metrics_for_pattern([1, 0, 1, 0, 0])
    assert m["mAP@all"] == pytest.approx(5 / 6)
    assert m["mAP@2"] == pytest.approx(1 / 2)
    assert m["P@1"] == pytest.approx(1.0)
    assert m["P@2"] == pytest.approx(1 / 2)
    assert m["P@3"] == pytest.approx(2 / 3)
    assert m["num_queries_without_relevant"] == 0


def test_hand_computed_two_queries_mean():
    # gallery ranked for the query [1,0]: labels  a b a b b  (index 0 most similar)
    # query 1 (label a): relevance 1 0 1 0 0 -> AP@all = (1 + 2/3)/2 = 5/6,
    #                                            AP@2 = 1/2, P@2 = 1/2
    # query 2 (label b): the same query vector, relevance 0 1 0 1 1
    #   precision at ranks 2,4,5: 1/2, 2/4, 3/5 -> AP@all = (1/2 + 1/2 + 3/5)/3 = 8/15
    #   AP@2 = (1/2) / min(2, 3) = 1/4, P@2 = 1/2
    # means: mAP@all = (5/6 + 8/15)/2 = 41/60, mAP@2 = (1/2 + 1/4)/2 = 3/8, P@2 = 1/2
    g = ranked_gallery(5)
    gl = np.array(["a", "b", "a", "b", "b"])
    m = category_retrieval_metrics(np.repeat(QUERY, 2, axis=0), ["a", "b"], g, gl,
                                   ks_map=(2,), ks_precision=(2,))
    assert m["mAP@all"] == pytest.approx(41 / 60)
    assert m["mAP@2"] == pytest.approx(3 / 8)
    assert m["P@2"] == pytest.approx(1 / 2)


def test_default_key_names():
    m = metrics_for_pattern([1, 0, 1], ks_map=(200,), ks_precision=(100, 200))
    assert set(m) == {"mAP@all", "mAP@200", "P@100", "P@200", "num_queries_without_relevant"}
    # the gallery is smaller than k: the top k is the whole gallery, divided by k
    assert m["P@100"] == pytest.approx(2 / 100)
    assert m["P@200"] == pytest.approx(2 / 200)


def test_ap_at_k_divides_by_min_k_and_relevant_count():
    # relevance 0 1 0 0 0 1 1 1, 4 relevant items, k = 3
    # within the top 3 only rank 2 is relevant: precision@2 = 1/2
    # AP@3 = (1/2) / min(3, 4) = 1/6
    m = metrics_for_pattern([0, 1, 0, 0, 0, 1, 1, 1], ks_map=(3,), ks_precision=(3,))
    assert m["mAP@3"] == pytest.approx(1 / 6)
    assert m["P@3"] == pytest.approx(1 / 3)


def test_ap_all_is_not_truncated_after_10_hits():
    # relevance: 10 relevant items, then 1 irrelevant, then 2 relevant (12 relevant)
    # full AP@all = (10 * 1 + 11/12 + 12/13) / 12
    # the buggy public version stops after 10 hits and gives 10/10 = 1.0
    pattern = [1] * 10 + [0] + [1, 1]
    m = metrics_for_pattern(pattern, ks_map=(), ks_precision=())
    expected = (10 + 11 / 12 + 12 / 13) / 12
    assert m["mAP@all"] == pytest.approx(expected)
    assert m["mAP@all"] < 1.0


# ---------------------------------------------------------------- ties
def test_all_equal_embeddings_give_pessimistic_values():
    # every similarity is exactly 1; gallery labels 0 1 0 1 1, query label 0
    # pessimistic order puts the 3 irrelevant items first: 1 1 1 0 0 -> relevance 0 0 0 1 1
    # AP@all = (1/4 + 2/5) / 2 = 13/40 ; AP@2 = 0 ; P@2 = 0 ; P@5 = 2/5
    g = np.tile([[1.0, 0.0]], (5, 1))
    m = category_retrieval_metrics(QUERY, [0], g, [0, 1, 0, 1, 1], ks_map=(2,), ks_precision=(2, 5))
    assert m["mAP@all"] == pytest.approx(13 / 40)
    assert m["mAP@2"] == 0.0
    assert m["P@2"] == 0.0
    assert m["P@5"] == pytest.approx(2 / 5)


def test_partial_tie_only_reorders_tied_block():
    # similarities to the query: item0 = 1 (relevant), items 1,2 tied at cos 45 deg
    # (item1 relevant, item2 irrelevant), item3 = 0 (irrelevant)
    # pessimistic ranking: relevance 1, 0, 1, 0 -> AP@all = (1 + 2/3)/2 = 5/6
    g = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    m = category_retrieval_metrics(QUERY, [7], g, [7, 7, 3, 3], ks_map=(), ks_precision=())
    assert m["mAP@all"] == pytest.approx(5 / 6)


# ---------------------------------------------------------------- no relevant item
def test_query_without_relevant_counts_as_zero():
    # query A: relevance 1 0 1 0 0 -> AP@all 5/6, P@1 = 1 ; query B (label 9): nothing relevant -> 0
    # mean over 2 queries: mAP@all = 5/12, P@1 = 1/2
    g = ranked_gallery(5)
    m = category_retrieval_metrics(np.repeat(QUERY, 2, axis=0), [1, 9], g, [1, 0, 1, 0, 0],
                                   ks_map=(2,), ks_precision=(1,))
    assert m["num_queries_without_relevant"] == 1
    assert m["mAP@all"] == pytest.approx(5 / 12)
    assert m["mAP@2"] == pytest.approx(1 / 4)
    assert m["P@1"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------- batching
def test_batching_gives_same_result():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 8)).astype(np.float32)
    g = rng.normal(size=(53, 8)).astype(np.float32)
    ql = rng.integers(0, 5, 37)
    gl = rng.integers(0, 4, 53)  # label 4 has no relevant item
    full = category_retrieval_metrics(q, ql, g, gl, ks_map=(5, 20), ks_precision=(5, 10), batch_size=1000)
    for bs in (1, 7, 16):
        part = category_retrieval_metrics(q, ql, g, gl, ks_map=(5, 20), ks_precision=(5, 10), batch_size=bs)
        assert part.keys() == full.keys()
        for k in full:
            assert part[k] == pytest.approx(full[k], abs=1e-12)
    r1, p1 = precision_recall_curve(q, ql, g, gl, num_points=11, batch_size=1000)
    r2, p2 = precision_recall_curve(q, ql, g, gl, num_points=11, batch_size=5)
    np.testing.assert_allclose(p1, p2, atol=1e-12)


def test_torch_inputs_work():
    q = torch.eye(3)
    m = category_retrieval_metrics(q, torch.tensor([0, 1, 2]), torch.eye(3), torch.tensor([0, 1, 2]),
                                   ks_map=(1,), ks_precision=(1,))
    assert m["mAP@all"] == pytest.approx(1.0) and m["P@1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- PR curve
def test_precision_recall_curve_hand_example():
    # relevance 1 0 1 0 0: precision 1, 1/2, 2/3, 1/2, 2/5 ; recall .5 .5 1 1 1
    # interpolated precision(r) = max precision over ranks with recall >= r
    #   r = 0, 0.5 -> 1 ;  r = 1 -> max(2/3, 1/2, 2/5) = 2/3
    recall, precision = precision_recall_curve(QUERY, [1], ranked_gallery(5), [1, 0, 1, 0, 0], num_points=3)
    np.testing.assert_allclose(recall, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 1.0, 2 / 3])


def test_precision_recall_curve_skips_queries_without_relevant():
    g = ranked_gallery(5)
    _, p = precision_recall_curve(np.repeat(QUERY, 2, axis=0), [1, 9], g, [1, 0, 1, 0, 0], num_points=3)
    np.testing.assert_allclose(p, [1.0, 1.0, 2 / 3])
    r, p = precision_recall_curve(QUERY, [9], g, [1, 0, 1, 0, 0], num_points=4)
    assert r.shape == p.shape == (4,) and np.all(p == 0)


# ---------------------------------------------------------------- fine-grained
def test_true_match_ranks_hand_example():
    # gallery similarities to QUERY strictly decrease with the index (ranked_gallery)
    # true item 0 -> rank 1 ; true item 3 -> rank 4
    g = ranked_gallery(6)
    ranks = true_match_ranks(np.repeat(QUERY, 2, axis=0), g, [0, 3])
    assert ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, [1, 4])


def test_true_match_ranks_ties_count_against_query():
    # items 0, 1 and 2 tie for the best similarity (1.0); item 3 is worse
    # true item 1: the 2 other tied items count as above it -> rank 1 + 2 = 3
    # all-identical gallery of 4: rank 4 whichever is true
    g = np.array([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(true_match_ranks(QUERY, g, [1]), [3])
    np.testing.assert_array_equal(true_match_ranks(QUERY, g, [3]), [4])
    same = np.ones((4, 2))
    np.testing.assert_array_equal(true_match_ranks(np.ones((2, 2)), same, [0, 2]), [4, 4])


def test_true_match_ranks_batching():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    ti = rng.integers(0, 30, 20)
    np.testing.assert_array_equal(true_match_ranks(q, g, ti, batch_size=3), true_match_ranks(q, g, ti))


def test_accuracy_at_k_hand_example():
    # ranks 1, 2, 5, 11 ; acc@1 = 1/4, acc@5 = 3/4, acc@10 = 3/4
    acc = accuracy_at_k(np.array([1, 2, 5, 11]))
    assert acc == {"acc@1": 0.25, "acc@5": 0.75, "acc@10": 0.75}
    assert accuracy_at_k([3, 3], ks=(2, 3)) == {"acc@2": 0.0, "acc@3": 1.0}


# ---------------------------------------------------------------- chance
def test_chance_matches_exhaustive_enumeration():
    # the mean over all 7!/(3!4!) = 35 distinct rankings of 3 relevant among 7
    # equals the analytic expectation
    n, r = 7, 3
    rows = []
    for pos in itertools.combinations(range(n), r):
        row = np.zeros(n)
        row[list(pos)] = 1
        rows.append(row)
    rel = torch.tensor(np.array(rows), dtype=torch.float64)
    per_q = _metrics_from_ranked(rel, ks_map=(2, 5, 10), ks_precision=(1, 4, 10))
    expected = _expected_random_metrics(n, r, (2, 5, 10), (1, 4, 10))
    for key, v in per_q.items():
        assert float(v.mean()) == pytest.approx(expected[key], abs=1e-12), key


def test_chance_category_metrics_simple_cases():
    # one relevant item among n=4: AP = E[1/rank] = (1 + 1/2 + 1/3 + 1/4)/4 = 25/48
    # P@2 = 2 * (1/4) / 2 = 1/4
    # a second query with no relevant item counts 0
    m = chance_category_metrics([0, 5], [0, 1, 1, 1], ks_map=(4,), ks_precision=(2,))
    assert m["mAP@all"] == pytest.approx(25 / 48 / 2)
    assert m["mAP@4"] == pytest.approx(25 / 48 / 2)
    assert m["P@2"] == pytest.approx(1 / 4 / 2)
    assert m["num_queries_without_relevant"] == 1
    # every gallery item relevant -> 1 everywhere
    m = chance_category_metrics([2], [2, 2, 2])
    assert m["mAP@all"] == pytest.approx(1.0) and m["mAP@200"] == pytest.approx(1.0)


def test_chance_close_to_random_embeddings():
    rng = np.random.default_rng(2)
    gl = rng.integers(0, 5, 60)
    ql = rng.integers(0, 5, 400)
    chance = chance_category_metrics(ql, gl, ks_map=(10,), ks_precision=(10,))
    m = category_retrieval_metrics(rng.normal(size=(400, 16)), ql, rng.normal(size=(60, 16)), gl,
                                   ks_map=(10,), ks_precision=(10,))
    for key in ("mAP@all", "mAP@10", "P@10"):
        assert m[key] == pytest.approx(chance[key], abs=0.03), key


# ---------------------------------------------------------------- properties
labels_strategy = st.lists(st.integers(0, 4), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(gallery_labels=labels_strategy, data=st.data())
def test_perfect_embeddings_give_map_one(gallery_labels, data):
    present = sorted(set(gallery_labels))
    query_labels = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=10))
    onehot = np.eye(5, dtype=np.float32)
    m = category_retrieval_metrics(onehot[query_labels], query_labels, onehot[gallery_labels],
                                   gallery_labels, ks_map=(1, 3, 200), ks_precision=(1,))
    assert m["mAP@all"] == pytest.approx(1.0)
    for key in ("mAP@1", "mAP@3", "mAP@200", "P@1"):
        assert m[key] == pytest.approx(1.0)
    assert m["num_queries_without_relevant"] == 0


@settings(max_examples=40, deadline=None)
@given(gallery_labels=labels_strategy, data=st.data())
def test_map_invariant_to_gallery_permutation(gallery_labels, data):
    n = len(gallery_labels)
    nq = data.draw(st.integers(1, 6))
    # small integer entries make exact ties (and duplicate rows) common
    ints = st.integers(-2, 2)
    q = np.array(data.draw(st.lists(st.lists(ints, min_size=3, max_size=3), min_size=nq, max_size=nq)),
                 dtype=np.float32)
    g = np.array(data.draw(st.lists(st.lists(ints, min_size=3, max_size=3), min_size=n, max_size=n)),
                 dtype=np.float32)
    ql = data.draw(st.lists(st.integers(0, 5), min_size=nq, max_size=nq))
    perm = np.array(data.draw(st.permutations(list(range(n)))), dtype=np.int64)
    gl = np.array(gallery_labels)
    a = category_retrieval_metrics(q, ql, g, gl, ks_map=(1, 4), ks_precision=(2,))
    b = category_retrieval_metrics(q, ql, g[perm], gl[perm], ks_map=(1, 4), ks_precision=(2,))
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-9), key
