"""Exact merge of per-shard top-k lists: the one ordering the library and the service share."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def merge_topk(
    results: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (D, I) pairs of shape (n, k_i) into one (n, k) top-k.

    Order: best score first (highest for "ip", lowest for "l2"), ties broken by smaller id.
    Missing entries (id -1) sort last and pad the output with -1 and the worst score.
    """
    if not results:
        raise ValueError("merge_topk needs at least one shard result")
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in results], axis=1)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in results], axis=1)
    worst = np.float32(-np.inf) if metric == "ip" else np.float32(np.inf)
    D = np.where(I < 0, worst, D)
    # Sort key: score descending for ip (negate), ascending for l2; id ascending breaks ties.
    primary = -D if metric == "ip" else D
    order = np.lexsort((I, primary), axis=-1)[:, :k]
    Dk, Ik = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    if Dk.shape[1] < k:
        pad = k - Dk.shape[1]
        Dk = np.pad(Dk, ((0, 0), (0, pad)), constant_values=worst)
        Ik = np.pad(Ik, ((0, 0), (0, pad)), constant_values=-1)
    return Dk, Ik
