"""Ranking metrics on the graded relevances of one ranked list, best first.

`relevances[i]` is the grade of the item at rank i+1 (0 = not relevant). Gains are linear and the
discount is log2(rank + 1), so rank 1 is undiscounted.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _rel(relevances: Sequence[float]) -> np.ndarray:
    r = np.asarray(relevances, dtype=np.float64).reshape(-1)
    if (r < 0).any():
        raise ValueError("relevance grades must be >= 0")
    return r


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def cg_at_k(relevances: Sequence[float], k: int) -> float:
    """Cumulative gain: CG@k = sum_{i=1..k} rel_i."""
    _check_k(k)
    return float(_rel(relevances)[:k].sum())


def dcg_at_k(relevances: Sequence[float], k: int) -> float:
    """Discounted cumulative gain: DCG@k = sum_{i=1..k} rel_i / log2(i + 1)."""
    _check_k(k)
    r = _rel(relevances)[:k]
    return float((r / np.log2(np.arange(2, len(r) + 2))).sum())


def ndcg_at_k(relevances: Sequence[float], k: int, ideal: Optional[Sequence[float]] = None) -> float:
    """nDCG@k = DCG@k / IDCG@k, where IDCG@k is the DCG@k of the ideal ordering.

    `ideal` holds the grades of every judged item of the query (retrieved or not), so relevant
    items the system never returned still lower the score (trec_eval). Without it, the ideal is
    `relevances` sorted descending. Returns 0 when the ideal gain is 0.
    """
    best = np.sort(_rel(relevances if ideal is None else ideal))[::-1]
    idcg = dcg_at_k(best, k)
    return dcg_at_k(relevances, k) / idcg if idcg > 0 else 0.0


def precision_at_k(relevances: Sequence[float], k: int) -> float:
    """P@k = |{i <= k : rel_i > 0}| / k (a list shorter than k counts the missing ranks as misses)."""
    _check_k(k)
    return float((_rel(relevances)[:k] > 0).sum() / k)


def recall_at_k(relevances: Sequence[float], k: int, num_relevant: int) -> float:
    """R@k = |{i <= k : rel_i > 0}| / num_relevant, the relevant items in the whole collection."""
    _check_k(k)
    if num_relevant <= 0:
        raise ValueError(f"num_relevant must be > 0, got {num_relevant}")
    return float((_rel(relevances)[:k] > 0).sum() / num_relevant)


def average_precision(relevances: Sequence[float], num_relevant: Optional[int] = None) -> float:
    """AP = (1/R) * sum over relevant ranks i of P@i, with R = num_relevant (default: relevant
    items in the list). Relevant items never retrieved contribute 0, as in trec_eval."""
    hits = _rel(relevances) > 0
    R = int(hits.sum()) if num_relevant is None else num_relevant
    if R <= 0:
        return 0.0
    ranks = np.flatnonzero(hits) + 1
    return float((np.arange(1, len(ranks) + 1) / ranks).sum() / R)


def reciprocal_rank(relevances: Sequence[float]) -> float:
    """RR = 1 / rank of the first relevant item, 0 when none is retrieved."""
    hits = np.flatnonzero(_rel(relevances) > 0)
    return float(1.0 / (hits[0] + 1)) if len(hits) else 0.0
