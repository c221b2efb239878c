"""Router deployment: the entry of one index version. Fans a query out to every shard and merges
the top-k lists exactly; sends each write and lookup to the shard its id's slot maps to."""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from indexing.ids import shard_of
from indexing.merge import merge_topk

LOG = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class Router:
    def __init__(self, shards: list[DeploymentHandle], slot_table: list[int], index_info: dict, timeout_s: float):
        self.shards, self.slot_table, self.index_info, self.timeout_s = shards, slot_table, index_info, timeout_s
        self.metric = index_info["metric"]

    async def _call(self, handle: DeploymentHandle, method: str, *args):
        response = getattr(handle, method).remote(*args)
        try:
            return await asyncio.wait_for(response, self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise

    def info(self) -> dict:
        """Version, dimension, metric, factory, nprobe and directory of the index this app serves."""
        return self.index_info

    async def search(self, queries: np.ndarray, k: int, nprobe: Optional[int] = None, with_vectors: bool = False) -> dict:
        """{"scores", "ids", "meta", "vectors", "partial", "shards_ok"}, or {"unavailable": reason}
        when no shard answers."""
        calls = [self._call(h, "search", queries, k, nprobe, with_vectors) for h in self.shards]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        ok = [a for a in answers if not isinstance(a, BaseException)]
        for i, a in enumerate(answers):
            if isinstance(a, BaseException):
                LOG.warning("shard %d left out: %s", i, type(a).__name__)
        if not ok:
            return {"unavailable": f"none of {len(self.shards)} shards answered within {self.timeout_s} s"}
        D, I = merge_topk([(a["D"], a["I"]) for a in ok], k, self.metric)
        meta = {i: m for a in ok for i, m in a["meta"].items()}
        vectors = {i: v for a in ok for i, v in (a["vectors"] or {}).items()} if with_vectors else None
        return {"scores": D, "ids": I, "meta": meta, "vectors": vectors, "partial": len(ok) < len(self.shards),
                "shards_ok": len(ok)}

    def _shard(self, id_: int) -> DeploymentHandle:
        return self.shards[int(shard_of([id_], self.slot_table)[0])]

    async def write(self, op: str, id_: int, *args) -> bool:
        """A write to the id's shard (no timeout: an acknowledged write must not be reported as failed)."""
        return await self._shard(id_).write.remote(op, id_, *args)

    async def get(self, id_: int) -> Optional[dict]:
        return await self._shard(id_).get.remote(id_)

    async def shard_info(self) -> list[Optional[dict]]:
        """Each shard's info, or None for a shard that does not answer in time."""
        answers = await asyncio.gather(*[self._call(h, "info") for h in self.shards], return_exceptions=True)
        return [None if isinstance(a, BaseException) else a for a in answers]
