"""Business policy applied after the exact merge: which hits a user may see, in which order.

Visibility flags are enforced earlier, inside the shard search; this stage removes duplicates and
puts the results that geometric verification found to be copies of the query first.
A duplicate is a copy of a better hit: the same bytes (sha256), or a perceptual hash within
`copy_bits` of it (resized, recompressed, lightly cropped). Model similarity never decides it: a
trained head may put a whole category above any cosine threshold, and those are the results the
user asked for (embedding/copies.py).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from embedding.copies import hash_distance


def rank_results(
    scores: np.ndarray, ids: np.ndarray, k: int, meta: dict, *, copy_bits: Optional[int] = None,
    exclude_sha256: Optional[str] = None, dedupe: bool = True,
) -> tuple[list[list[dict]], list[int]]:
    """Turn merged (n, k') hits into at most k result dicts per query, keeping merge order, and
    count per query the hits collapsed into a better one before the k-th result (why a query can
    get fewer than k results from a corpus with more than k images).

    `meta` maps id -> (uri, sha256 or its 64-bit prefix as shards send it, perceptual hash or
    None); `exclude_sha256` is in the same form. Drops padding (-1), hits with the query's own bytes, hits whose sha256 repeats a better hit, and, with
    `copy_bits`, hits whose hash differs from a kept hit's in at most that many bits (keep the best).
    `dedupe=False` keeps duplicates: the exact merge order."""
    near = dedupe and copy_bits is not None
    out, collapsed = [], []
    for row_s, row_i in zip(scores.tolist(), ids.tolist()):
        seen: set[str] = set()
        kept_hashes: list[int] = []
        results, folded = [], 0
        for s, i in zip(row_s, row_i):
            if i < 0:
                continue
            uri, sha, phash = meta.get(i, ("", "", None))
            if sha and sha == exclude_sha256:
                continue
            if sha and dedupe and sha in seen:
                folded += 1
                continue
            if near and phash is not None:
                if kept_hashes and int(hash_distance(phash, kept_hashes).min()) <= copy_bits:
                    folded += 1
                    continue
                kept_hashes.append(phash)
            if sha:
                seen.add(sha)
            results.append({"id": int(i), "score": float(s), "uri": uri})
            if len(results) == k:
                break
        out.append(results)
        collapsed.append(folded)
    return out, collapsed


def verified_first(results: list[dict], inliers: dict, min_inliers: int) -> list[dict]:
    """Results whose geometric verification found at least `min_inliers` inliers (a copy of the
    query, however edited) move to the top; the others keep their order below them. Verified
    results carry their `inliers` and keep merge order among themselves, not inlier order: a
    crop of the original shares as many keypoints with the query as the original does, and
    ordering by inliers put crops above the exact original (76 of 88 first instead of 88 of 88 on
    the test corpus's mild edits)."""
    verified = [r for r in results if inliers.get(r["id"], 0) >= min_inliers]
    chosen = {r["id"] for r in verified}
    return [{**r, "inliers": inliers[r["id"]]} for r in verified] + [r for r in results if r["id"] not in chosen]
