"""Shard deployment: one FAISS shard in memory; each replica of it is a full copy (replication)."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional

import numpy as np
from ray import serve

from indexing import storage
from indexing.shards import read_index, search_shard

LOG = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32, health_check_period_s=2)
class Shard:
    """Loads `path` of the index directory once and answers searches with per-call parameters."""

    def __init__(self, index_dir: str, path: str, shard_no: int, nprobe: int):
        self.shard_no, self.nprobe = shard_no, nprobe
        self.index = read_index(storage.join(index_dir, path))
        LOG.info("shard %d loaded %s: %d vectors", shard_no, path, self.index.ntotal)

    async def search(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of this shard; faiss releases the GIL, so the search runs in a worker thread."""
        return await asyncio.to_thread(search_shard, self.index, queries, k, nprobe or self.nprobe)

    def info(self) -> dict:
        """Count of this shard and which replica process answered (for operators and failure drills)."""
        return {"shard": self.shard_no, "count": int(self.index.ntotal), "pid": os.getpid()}
