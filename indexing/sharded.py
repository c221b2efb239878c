"""In-process search over all shards of an index directory: the baseline the service must match."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import faiss
import numpy as np

from indexing import storage
from indexing.cells import CellRouting, spread
from indexing.manifest import Manifest, read_manifest
from indexing.merge import merge_topk
from indexing.shards import read_index, search_shard


class ShardedIndex:
    """All shards of one manifest version, searched and merged exactly as the router does."""

    def __init__(self, manifest: Manifest, shards: list[faiss.Index], index_dir: str):
        self.manifest, self.shards, self.index_dir = manifest, shards, index_dir
        self.cells = None
        if manifest.placement == "cells":
            self.cells = CellRouting.open(index_dir, manifest.template, manifest.cell_table, manifest.nprobe)

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
        rows = self.rows_per_shard(queries, nprobe)

        def one(s: int):
            return search_shard(self.shards[s], queries[rows[s]], k, nprobe, exclude=exclude)

        asked = [s for s in range(len(self.shards)) if len(rows[s])] or [0]
        # faiss releases the GIL, so threads search shards in parallel.
        with ThreadPoolExecutor(max(1, len(asked))) as pool:
            parts = list(pool.map(one, asked))
        return merge_topk([spread(p, rows[s], len(queries), self.manifest.metric) for s, p in zip(asked, parts)],
                          k, self.manifest.metric)

    def rows_per_shard(self, queries: np.ndarray, nprobe: int) -> list[np.ndarray]:
        """The query rows each shard is asked: all of them under hash placement, under cell
        placement those whose nprobe nearest cells include one of the shard's."""
        if self.cells is None:
            return [np.arange(len(queries))] * len(self.shards)
        return self.cells.rows(queries, nprobe)
