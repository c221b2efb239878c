"""Ranker deployment: business policy on merged hits, with the catalog in memory."""
from __future__ import annotations

import numpy as np
from ray import serve

from indexing.catalog import Catalog
from indexing.policy import rank_results


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Ranker:
    def __init__(self, index_dir: str, catalog: str | None):
        self.catalog = Catalog.load(index_dir, catalog)

    def rank(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[dict]]:
        """Result dicts (id, score, uri) per query, exact duplicates removed."""
        return rank_results(scores, ids, k, self.catalog)
