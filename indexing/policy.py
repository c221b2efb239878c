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
    near = dedupe and bool(vectors) and near_duplicate_cosine is not None
    out = []
    for row_s, row_i in zip(scores.tolist(), ids.tolist()):
        cand = [(s, i) for s, i in zip(row_s, row_i) if i >= 0]
        if near:
            # One Gram matrix per query instead of a Python loop over pairs of candidates.
            have = [i in vectors for _, i in cand]
            v = np.stack([vectors[i] for (_, i), h in zip(cand, have) if h]) if any(have) else np.zeros((0, 1), np.float32)
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            close = (v @ v.T) >= near_duplicate_cosine
            row_of = np.cumsum(have) - 1
        seen: set[str] = set()
        kept_rows: list[int] = []
        results = []
        for pos, (s, i) in enumerate(cand):
            uri, sha = meta.get(i, ("", ""))
            if sha and (sha == exclude_sha256 or (dedupe and sha in seen)):
                continue
            if near and have[pos]:
                r = int(row_of[pos])
                if kept_rows and close[r, kept_rows].any():
                    continue
                kept_rows.append(r)
            if sha:
                seen.add(sha)
            results.append({"id": int(i), "score": float(s), "uri": uri})
            if len(results) == k:
                break
        out.append(results)
    return out
