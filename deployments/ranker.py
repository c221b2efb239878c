"""Ranker deployment: business policy on merged hits (duplicates, near-duplicates, the query itself)."""
from __future__ import annotations

from typing import Optional

from ray import serve

from indexing.policy import rank_results


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class Ranker:
    def __init__(self, near_duplicate_cosine: Optional[float]):
        self.near_duplicate_cosine = near_duplicate_cosine

    def rank(self, hits: dict, k: int, exclude_sha256: Optional[str] = None, dedupe: bool = True) -> list[list[dict]]:
        """Result dicts (id, score, uri) per query from the router's merged hits."""
        return rank_results(hits["scores"], hits["ids"], k, hits["meta"], vectors=hits.get("vectors"),
                            near_duplicate_cosine=self.near_duplicate_cosine, exclude_sha256=exclude_sha256,
                            dedupe=dedupe)
