"""Ranking metrics against hand-worked examples and scikit-learn."""
import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from evaluation.metrics import (
    average_precision, cg_at_k, dcg_at_k, ndcg_at_k, precision_at_k, recall_at_k, reciprocal_rank,
)

REL = [3, 2, 3, 0, 1, 2]


def test_cg():
    assert cg_at_k(REL, 6) == 11
    assert cg_at_k(REL, 3) == 8


def test_dcg_by_hand():
    # 3/1 + 2/log2(3) + 3/2 + 0/log2(5) + 1/log2(6) + 2/log2(7)
    want = 3 + 2 / math.log2(3) + 1.5 + 0 + 1 / math.log2(6) + 2 / math.log2(7)
    assert dcg_at_k(REL, 6) == pytest.approx(want)
    assert dcg_at_k(REL, 6) == pytest.approx(6.861, abs=1e-3)


def test_ndcg_by_hand():
    # ideal order 3, 3, 2, 2, 1, 0: IDCG@6 = 3 + 3/log2(3) + 1 + 2/log2(5) + 1/log2(6) = 7.141
    assert ndcg_at_k(REL, 6) == pytest.approx(6.861 / 7.141, abs=1e-3)
    assert ndcg_at_k([3, 3, 2, 2, 1, 0], 6) == pytest.approx(1.0)


def test_ndcg_ideal_counts_unretrieved_relevant_items():
    # Retrieved two items, both grade 3, but the query had a third judged grade-3 item.
    assert ndcg_at_k([3, 3], 3) == pytest.approx(1.0)
    want = (3 + 3 / math.log2(3)) / (3 + 3 / math.log2(3) + 3 / 2)
    assert ndcg_at_k([3, 3], 3, ideal=[3, 3, 3, 0]) == pytest.approx(want)


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_ndcg_matches_sklearn(rng, k):
    for _ in range(20):
        grades = rng.integers(0, 4, size=12).astype(float)
        scores = rng.normal(size=12)
        ranked = grades[np.argsort(-scores)]
        got = ndcg_at_k(ranked, k, ideal=grades)
        assert got == pytest.approx(ndcg_score([grades], [scores], k=k))


def test_precision_recall_ap_rr():
    rel = [1, 0, 1, 0, 0, 1]
    assert precision_at_k(rel, 3) == pytest.approx(2 / 3)
    assert precision_at_k(rel, 10) == pytest.approx(3 / 10)
    assert recall_at_k(rel, 3, num_relevant=4) == pytest.approx(0.5)
    # AP over 4 relevant items (one never retrieved): (1/1 + 2/3 + 3/6) / 4
    assert average_precision(rel, num_relevant=4) == pytest.approx((1 + 2 / 3 + 0.5) / 4)
    assert average_precision(rel) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert reciprocal_rank([0, 0, 2, 1]) == pytest.approx(1 / 3)
    assert reciprocal_rank([0, 0]) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        dcg_at_k(REL, 0)
    with pytest.raises(ValueError):
        recall_at_k(REL, 3, num_relevant=0)
    with pytest.raises(ValueError):
        cg_at_k([1, -1], 2)
