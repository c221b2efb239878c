"""An index directory opened by a job (copy-groups, bulk search) as the service opens it: one Ray
actor per shard holding the shard's current state (indexing.live: snapshot plus logged writes),
and the service's own fan-out and exact merge over them (deployments.pipeline.Router)."""
from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np

from indexing.cells import CellRouting
from indexing.live import LiveShard
from indexing.manifest import Manifest


class ShardReader:
    """One shard of an index directory, for a job: searches, and the vectors it holds. Used as a
    Ray actor; `include_hidden` keeps private and unsafe ids in its searches (an operator's job)."""

    def __init__(self, index_dir: str, manifest: dict, shard_no: int, include_hidden: bool = False):
        self.manifest = Manifest.model_validate(manifest)
        self.shard = LiveShard(index_dir, self.manifest, shard_no)
        self.include_hidden = include_hidden

    def search(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> dict:
        """{"D", "I", "meta"}, as the service's shard replicas answer."""
        return self.shard.search(queries, k, nprobe or self.manifest.nprobe, self.include_hidden)

    def slices(self, size: int) -> list[tuple[int, int]]:
        """The shard's vector positions cut into (start, stop) ranges of `size`."""
        n = self.shard.positions
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def vectors(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) at positions start..stop (LiveShard.vectors)."""
        return self.shard.vectors(start, stop)

    def table(self):
        """Metadata of every id held (indexing.catalog.SCHEMA: uri, sha256, perceptual hash, flags)."""
        return self.shard.table()


def open_readers(index_dir: str, manifest: Manifest, cpus: float, include_hidden: bool) -> list:
    """A ShardReader actor per shard of `manifest`, loaded (their constructors have run)."""
    import ray

    # Spread over the nodes: the shards' searches are the job's work, and they run where these live.
    actor = ray.remote(num_cpus=cpus, scheduling_strategy="SPREAD")(ShardReader)
    readers = [actor.remote(index_dir, manifest.model_dump(), s, include_hidden) for s in range(manifest.num_shards)]
    try:
        ray.get([r.__ray_ready__.remote() for r in readers])
    except BaseException:
        for r in readers:
            ray.kill(r)
        raise
    return readers


class JobRouter:
    """The service's fan-out and exact merge (deployments.pipeline.Router) over ShardReader
    actors, called from a job's worker: one synchronous search per matrix of queries."""

    def __init__(self, readers: list, index_dir: str, manifest: Manifest, timeout_s: float = 600.0):
        from deployments.pipeline import Router

        cells = None
        if manifest.placement == "cells":
            cells = CellRouting.open(index_dir, manifest.template, manifest.cell_table, manifest.nprobe)
        # A job waits for every shard (no partial answers): the deadline only catches a lost actor.
        self.router = Router([self._caller(r) for r in readers], manifest.slot_table, manifest.metric, timeout_s,
                             cells=cells)
        self.loop = asyncio.new_event_loop()

    @staticmethod
    def _caller(reader):
        async def search(queries, k, nprobe):
            return await reader.search.remote(queries, k, nprobe)
        return search

    def search(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None):
        """deployments.pipeline.Hits of the queries; raises when a shard did not answer (a job's
        answer is complete or it is not given)."""
        hits = self.loop.run_until_complete(self.router.search(np.ascontiguousarray(queries, np.float32), k, nprobe))
        if hits.partial:
            raise RuntimeError("a shard reader did not answer; the job stops rather than give partial results")
        return hits
