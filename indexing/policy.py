"""Business policy applied after the exact merge: which hits a user may see, in which order.

Visibility flags are enforced earlier, inside the shard search; this stage removes duplicates.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def rank_results(
    scores: np.ndarray, ids: np.ndarray, k: int, meta: dict, *,
    vectors: Optional[dict] = None, near_duplicate_cosine: Optional[float] = None,
    exclude_sha256: Optional[str] = None, dedupe: bool = True,
) -> list[list[dict]]:
    """Turn merged (n, k') hits into at most k result dicts per query, keeping merge order.

    Drops padding (-1), hits with the query's own bytes (`exclude_sha256`), hits whose sha256
    repeats a better hit, and, with `vectors`, hits whose cosine to a kept hit reaches
    `near_duplicate_cosine` (keep the best). `dedupe=False` keeps duplicates: the exact merge order."""
    out = []
    for row_s, row_i in zip(scores, ids):
        seen: set[str] = set()
        kept_vecs: list[np.ndarray] = []
        results = []
        for s, i in zip(row_s.tolist(), row_i.tolist()):
            if i < 0:
                continue
            uri, sha = meta.get(i, ("", ""))
            if sha and (sha == exclude_sha256 or (dedupe and sha in seen)):
                continue
            v = vectors.get(i) if (dedupe and vectors and near_duplicate_cosine) else None
            if v is not None:
                v = v / (np.linalg.norm(v) or 1.0)
                if any(float(v @ w) >= near_duplicate_cosine for w in kept_vecs):
                    continue
                kept_vecs.append(v)
            if sha:
                seen.add(sha)
            results.append({"id": int(i), "score": float(s), "uri": uri})
            if len(results) == k:
                break
        out.append(results)
    return out
