"""Business policy applied after the exact merge: which hits a user may see, in which order.

Visibility flags are enforced earlier, inside the shard search; this stage removes duplicates and
puts the results that geometric verification found to be copies of the query first.
A duplicate is a copy of a better hit: the same bytes (sha256), or a perceptual hash within
`copy_bits` of it (resized, recompressed, lightly cropped). Model similarity never decides it: a
trained head may put a whole category above any cosine threshold, and those are the results the
user asked for (embedding/copies.py).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from embedding.copies import hash_distance


def fetch_size(k: int, fetch_factor: int, dedupe: bool, exclude_query: bool) -> int:
    """Candidates to fetch from the shards for k results: k * `fetch_factor` when duplicates or
    the query's own bytes may be dropped (so k remain), else k."""
    return k * fetch_factor if dedupe or exclude_query else k


def rank_results(
    scores: np.ndarray, ids: np.ndarray, k: int, meta: dict, *, copy_bits: Optional[int] = None,
    query_sha256: Union[None, str, Sequence[Optional[str]]] = None, exclude_query: bool = False,
    dedupe: bool = True,
) -> tuple[list[list[dict]], list[int]]:
    """Turn merged (n, k') hits into at most k result dicts per query, keeping merge order, and
    count per query the hits collapsed into a better one before the k-th result (why a query can
    get fewer than k results from a corpus with more than k images).

    `meta` maps id -> (uri, sha256 or its 64-bit prefix as shards send it, perceptual hash or
    None); `query_sha256`, the query's own bytes, is in the same form (one for every row, or a
    list of one per row). Drops padding (-1), hits whose sha256 repeats a better hit, and, with
    `copy_bits`, hits whose hash differs from a kept hit's in at most that many bits (keep the
    best). Hits with the query's own bytes are dropped
    with `exclude_query`, else they come first and lead their copies: an indexed image's vector
    adds its centre crops (model.index_views), so a recompressed copy can score a hair above the
    exact image. `dedupe=False` keeps duplicates: the exact merge order."""
    near = dedupe and copy_bits is not None
    out, collapsed = [], []
    shas = query_sha256 if isinstance(query_sha256, (list, tuple)) else [query_sha256] * len(scores)
    for row_s, row_i, own_sha in zip(scores.tolist(), ids.tolist(), shas):
        if own_sha and dedupe and not exclude_query:
            own = [meta.get(i, ("", "", None))[1] == own_sha for i in row_i]
            order = sorted(range(len(row_i)), key=lambda j: not own[j])
            row_s, row_i = [row_s[j] for j in order], [row_i[j] for j in order]
        seen: set[str] = set()
        kept_hashes: list[int] = []
        results, folded = [], 0
        for s, i in zip(row_s, row_i):
            if i < 0:
                continue
            uri, sha, phash = meta.get(i, ("", "", None))
            if exclude_query and sha and sha == own_sha:
                continue
            if sha and dedupe and sha in seen:
                folded += 1
                continue
            if near and phash is not None:
                if kept_hashes and int(hash_distance(phash, kept_hashes).min()) <= copy_bits:
                    folded += 1
                    if sha:
                        seen.add(sha)  # the same bytes again are a copy too
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


def verified_first(results: list[dict], found: dict, min_inliers: int) -> list[dict]:
    """Results whose geometric verification found at least `min_inliers` inliers (a copy of the
    query, however edited) move to the top, carrying `same_photo` (the reason they outrank higher
    scores), `inliers` and `coverage`; the others keep
    their order below them. `found` maps a result id to its (inliers, coverage). Among verified
    copies the one that explains the most of the query comes first (coverage in tenths, then
    inliers): a crop of the original can share as many keypoints with the query as the original
    does (ordered by inliers alone, crops came before the exact original for 12 of 88 mild edits
    on the test corpus), but its inliers span only the part of the query it shows."""
    verified = [r for r in results if found.get(r["id"], (0, 0.0))[0] >= min_inliers]
    verified.sort(key=lambda r: (-round(found[r["id"]][1], 1), -found[r["id"]][0]))
    chosen = {r["id"] for r in verified}
    return [{**r, "same_photo": True, "inliers": found[r["id"]][0], "coverage": found[r["id"]][1]} for r in verified] + \
        [r for r in results if r["id"] not in chosen]


def verification_shortlist(ranked: list[dict], meta: dict, own_sha: Optional[int], top: int
                           ) -> tuple[list[dict], list[dict], list[dict]]:
    """What a verified image search checks: (the results holding the query's own bytes, marked
    `same_photo` (they need no verifying: an image with few keypoints would not verify against
    itself), the other results, and the candidates {"id", "uri", "sha64"} among the first `top`
    of those to verify). The answer is then exact + verified_first(others, found, min_inliers)."""
    exact = [{**h, "same_photo": True} for h in ranked if h["id"] in meta and meta[h["id"]][1] == own_sha]
    others = [h for h in ranked if h["id"] not in meta or meta[h["id"]][1] != own_sha]
    candidates = [{"id": h["id"], "uri": h["uri"], "sha64": meta[h["id"]][1]} for h in others[:top] if h["id"] in meta]
    return exact, others, candidates
