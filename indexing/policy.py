"""Business policy applied after the exact merge: which hits a user may see, in which order."""
from __future__ import annotations

import numpy as np

from indexing.catalog import Catalog


def rank_results(scores: np.ndarray, ids: np.ndarray, k: int, catalog: Catalog) -> list[list[dict]]:
    """Turn merged (n, k') hits into at most k result dicts per query.

    Drops padding (-1) and every hit whose sha256 repeats a better-ranked hit of the same query
    (exact duplicate files), keeping merge order.
    """
    out = []
    for row_s, row_i in zip(scores, ids):
        keep = row_i >= 0
        row_s, row_i = row_s[keep], row_i[keep]
        uris, shas = catalog.lookup(row_i)
        seen: set[str] = set()
        results = []
        for s, i, u, h in zip(row_s.tolist(), row_i.tolist(), uris, shas):
            if h:
                if h in seen:
                    continue
                seen.add(h)
            results.append({"id": int(i), "score": float(s), "uri": u})
            if len(results) == k:
                break
        out.append(results)
    return out
