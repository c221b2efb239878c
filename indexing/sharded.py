"""In-process search over all shards of an index directory: the baseline the service must match."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import faiss
import numpy as np

from indexing import storage
from indexing.manifest import Manifest, read_manifest
from indexing.merge import merge_topk
from indexing.shards import read_index, search_shard


class ShardedIndex:
    """All shards of one manifest version, searched and merged exactly as the router does."""

    def __init__(self, manifest: Manifest, shards: list[faiss.Index], index_dir: str):
        self.manifest, self.shards, self.index_dir = manifest, shards, index_dir

    @classmethod
    def open(cls, index_dir: str, version: Optional[int] = None) -> "ShardedIndex":
        """Load the current (or a given) manifest version and every shard it lists."""
        m = read_manifest(index_dir, version)
        return cls(m, [read_index(storage.join(index_dir, s.path)) for s in m.shards], index_dir)

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def search(
        self, queries: np.ndarray, k: int, nprobe: Optional[int] = None, *, exclude: Optional[np.ndarray] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first, merged across shards with ties broken by id."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index has {self.dim}")
        if not 1 <= k:
            raise ValueError(f"k must be >= 1, got {k}")
        nprobe = nprobe or self.manifest.nprobe
        if len(self.shards) == 1:
            parts = [search_shard(self.shards[0], queries, k, nprobe, exclude=exclude)]
        else:
            # faiss releases the GIL, so threads search shards in parallel.
            with ThreadPoolExecutor(len(self.shards)) as pool:
                parts = list(pool.map(lambda s: search_shard(s, queries, k, nprobe, exclude=exclude), self.shards))
        return merge_topk(parts, k, self.manifest.metric)
