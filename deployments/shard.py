"""Shard deployment: one shard in memory, kept current from its write-ahead log.

Each replica is a full copy (replication); any replica takes a write, the others apply it from
the shared log before their next search. Searches come over the replica's own port
(deployments/wire.py, its address from `endpoint`) or as handle calls; writes as handle calls."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

import numpy as np
import ray
from ray import serve

from deployments.metrics import GAUGE_REFRESH_S, SHARD_SEARCH, ShardMetrics, refresh_every
from deployments.wire import ShardServer
from indexing.live import LiveShard
from indexing.manifest import Manifest
from indexing.wal import Record

LOG = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=2)
class Shard:
    def __init__(self, index_dir: str, manifest: dict, shard_no: int, compact_after_bytes: int,
                 search_limit: int = 80):
        rss = rss_bytes()
        self.shard = LiveShard(index_dir, Manifest.model_validate(manifest), shard_no)
        self.load_rss_bytes = rss_bytes() - rss  # what holding this shard costs the replica
        self.shard_no, self.nprobe, self.compact_after_bytes = shard_no, manifest["nprobe"], compact_after_bytes
        self._compaction: Optional[asyncio.Task] = None
        self.metrics = ShardMetrics(shard_no)
        refresh_every(GAUGE_REFRESH_S, self._report_size)
        # Searches over the replica's own port (wire.py), bounded like Serve bounds handle calls
        # (search_limit = max ongoing + max queued).
        self.server = ShardServer(self._search_now, search_limit, self._observe_search)
        self._listening: Optional[asyncio.Task] = None
        LOG.info("shard %d loaded: %d vectors", shard_no, self.shard.ntotal)

    async def search(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None) -> dict:
        """{"D", "I", "meta"} for a whole matrix of queries (the Ingress batches concurrent
        requests); faiss releases the GIL, so it runs in a worker thread."""
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._search_now, queries, k, nprobe)
        self._observe_search(time.perf_counter() - t0)
        return out

    def _search_now(self, queries: np.ndarray, k: int, nprobe: Optional[int]) -> dict:
        return self.shard.search(queries, k, nprobe or self.nprobe)

    def _observe_search(self, seconds: float) -> None:
        self.metrics.stages.observe(seconds, tags={"stage": SHARD_SEARCH})

    async def endpoint(self) -> tuple[str, int]:
        """(host, port) where this replica answers searches directly (deployments/wire.py); the
        listener starts on the first ask."""
        if self._listening is None:  # one listener, however many ask at once
            self._listening = asyncio.ensure_future(self._listen())
        try:
            return await asyncio.shield(self._listening)
        except OSError:
            self._listening = None  # asked again later; searches go through Serve meanwhile
            raise

    async def _listen(self) -> tuple[str, int]:
        address = await self.server.start(ray.util.get_node_ip_address())
        LOG.info("shard %d answers searches on %s:%d", self.shard_no, *address)
        return address

    def _report_size(self) -> None:
        self.metrics.size(self.shard.ntotal, self.shard.log_bytes())

    async def write(self, op: str, id_: int, vector: Optional[np.ndarray] = None, uri: str = "", sha256: str = "",
                    private: Optional[bool] = None, unsafe: Optional[bool] = None, phash: Optional[int] = None) -> bool:
        """Log (fsync) and apply a write; True when the id existed. Compacts past the size limit."""
        rec = Record(op, id_, vector, uri, sha256, private, unsafe, phash)
        existed = await asyncio.to_thread(self.shard.write, rec)
        self.metrics.writes.inc(1, tags={"op": op})
        if self.shard.log_bytes() > self.compact_after_bytes and self._compaction is None:
            # In the background, one at a time: the write is durable and answered already.
            self._compaction = asyncio.create_task(self._compact())
        return existed

    async def _compact(self) -> None:
        try:
            if await asyncio.to_thread(self.shard.compact, self.compact_after_bytes) is not None:
                self.metrics.compactions.inc(1)
        except Exception:
            LOG.exception("shard %d: compaction failed; the log keeps every write and it will be retried",
                          self.shard_no)
        finally:
            self._compaction = None

    async def get(self, id_: int) -> Optional[dict]:
        return await asyncio.to_thread(self.shard.get, id_)

    def info(self) -> dict:
        """Count of this shard and which replica process answered (for operators and failure drills)."""
        return {"shard": self.shard_no, "count": self.shard.ntotal, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "generation": self.shard.generation, "log_bytes": self.shard.log_bytes(),
                "rss_bytes": rss_bytes(), "load_rss_bytes": self.load_rss_bytes}


def rss_bytes() -> int:
    """Resident memory of this process in bytes (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
