"""The query pipeline, top to bottom: batch -> fan out -> merge -> rank. Plain asyncio and numpy,
no Ray: the Ingress feeds it DeploymentHandles, tests feed it shards searched in-process.

1. The Ingress validates a request into a `Query` (vectors, k, nprobe, the index version it
   started on) and hands it to its `@serve.batch` method, which calls `run_batch` with every
   query that arrived meanwhile.
2. `run_batch` groups compatible queries (same index version, dimension and nprobe, k within a
   factor of two), stacks each group into one matrix, and asks the `Router` of that version.
3. `Router.search` sends the matrix to every shard at once (one call per shard, not per query),
   leaves out shards that miss the deadline (partial answer) and merges the shards' top-k
   exactly (`indexing.merge`).
4. Each query takes its rows back (`Hits`), and the Ingress applies the ranking policy
   (`rank`, from `indexing.policy`) to them on its own loop: no extra hop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

import numpy as np

from indexing.cells import CellRouting, spread
from indexing.ids import shard_of
from indexing.merge import merge_topk
from indexing.policy import rank_results

LOG = logging.getLogger("ray.serve")

# A shard as the pipeline sees it: search(queries, k, nprobe) -> awaitable dict {"D", "I", "meta"}.
# In the service it calls a DeploymentHandle.
ShardSearch = Callable[[np.ndarray, int, Optional[int]], Awaitable[dict]]


class ShardsUnavailable(Exception):
    """No shard answered within the deadline."""


class Overloaded(Exception):
    """The shards refused the work (their queues are full): the client should retry later."""


@dataclass
class Hits:
    """Merged candidates of one or more queries, best first, with what the ranking policy needs."""

    scores: np.ndarray                # (n, fetch) float32
    ids: np.ndarray                   # (n, fetch) int64, -1 padded
    meta: dict                        # id -> (uri, sha256, perceptual hash) of every returned id
    partial: bool                     # some shard was left out
    merge_s: float = 0.0              # time the exact merge took (for the merge_rank stage metric)

    def rows(self, start: int, stop: int, k: int) -> "Hits":
        """The hits of queries start..stop, cut to the first k candidates."""
        return Hits(self.scores[start:stop, :k], self.ids[start:stop, :k], self.meta, self.partial, self.merge_s)


@dataclass
class Query:
    """One validated search request as it waits for a batch."""

    vectors: np.ndarray               # (n, d) float32
    fetch: int                        # candidates per query wanted from the shards
    nprobe: Optional[int]             # None: the index's default
    router: "Router"                  # the index version the request started on

    @property
    def rows(self) -> int:
        return len(self.vectors)


class Router:
    """One index version as the Ingress sees it: a search callable per shard, the placement (the
    slot table, and for a cell-placed index its CellRouting), the deadline of a fan-out.
    `on_fanout(seconds)` hears how long each fan-out waited for its shards."""

    def __init__(self, shards: Sequence[ShardSearch], slot_table: Sequence[int], metric: str, timeout_s: float,
                 is_overload: Callable[[BaseException], bool] = lambda e: False,
                 on_fanout: Callable[[float], None] = lambda seconds: None, cells: Optional[CellRouting] = None):
        self.shards, self.slot_table, self.metric, self.timeout_s = list(shards), slot_table, metric, timeout_s
        self.is_overload, self.on_fanout, self.cells = is_overload, on_fanout, cells

    def shards_for_id(self, id_: int) -> list[int]:
        """The shards that may hold an id: its slot's shard, or under cell placement every shard
        (an id's cell follows its vector, which lookups, deletes and flags do not carry)."""
        if self.cells is not None:
            return list(range(len(self.shards)))
        return [int(shard_of([id_], self.slot_table)[0])]

    def shard_for_write(self, id_: int, vector: np.ndarray) -> int:
        """The shard an upsert of (id, vector) goes to: the id's slot, or its vector's cell."""
        if self.cells is not None:
            return self.cells.shard_of_vector(vector)
        return int(shard_of([id_], self.slot_table)[0])

    async def _call(self, search: ShardSearch, *args) -> dict:
        """One shard's answer within the deadline, made once more if it failed fast other than by
        overload (once_more); only a shard without a live replica is left out."""
        return await once_more(lambda: search(*args), self.timeout_s, lambda e: not self.is_overload(e))

    async def search(self, queries: np.ndarray, k: int, nprobe: Optional[int]) -> Hits:
        """Each shard asked searches its rows of the matrix once (all rows under hash placement,
        under cell placement the rows with a cell there); exact top-k merge of those that answer
        in time."""
        t0 = time.perf_counter()
        rows = self.cells.rows(queries, nprobe) if self.cells is not None else None
        asked = list(range(len(self.shards))) if rows is None else [s for s, r in enumerate(rows) if len(r)]
        answers = await asyncio.gather(
            *[self._call(self.shards[s], queries if rows is None else queries[rows[s]], k, nprobe) for s in asked],
            return_exceptions=True)
        t1 = time.perf_counter()
        self.on_fanout(t1 - t0)
        ok, failed = [], []
        for s, a in zip(asked, answers):
            if isinstance(a, BaseException):
                LOG.warning("shard %d left out: %s", s, type(a).__name__)
                failed.append(a)
            else:
                ok.append((s, a))
        if not ok:
            if failed and all(self.is_overload(e) for e in failed):
                raise Overloaded(f"all {len(asked)} shards asked are at their queue limit")
            kinds = sorted({type(e).__name__ for e in failed})
            raise ShardsUnavailable(f"none of {len(asked)} shards asked answered " + (
                f"within {self.timeout_s} s" if kinds == ["TimeoutError"] else f"({', '.join(kinds)})"))
        parts = [(a["D"], a["I"]) if rows is None else spread((a["D"], a["I"]), rows[s], len(queries), self.metric)
                 for s, a in ok]
        D, I = merge_topk(parts, k, self.metric)
        meta = {i: m for _, a in ok for i, m in a["meta"].items()}
        return Hits(D, I, meta, partial=len(ok) < len(asked), merge_s=time.perf_counter() - t1)


class KeyedLocks:
    """One asyncio lock per key (an image id), held only while someone holds or waits for it: the
    writes of one id go one at a time, those of different ids side by side."""

    def __init__(self):
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Any):
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def within(response: Any, timeout_s: float, *, keep_running: bool = False) -> Any:
    """Await a call (a coroutine or a Serve DeploymentResponse) for at most timeout_s; raises
    asyncio.TimeoutError. On timeout a DeploymentResponse is cancelled, so the callee stops too,
    unless `keep_running` (a write that may already be logged must finish)."""
    async def wait():
        return await response

    task = asyncio.ensure_future(wait())
    try:
        return await asyncio.wait_for(asyncio.shield(task) if keep_running else task, timeout_s)
    except asyncio.TimeoutError:
        cancel = getattr(response, "cancel", None)
        if cancel is not None and not keep_running:
            cancel()
        raise


async def once_more(call: Callable[[], Any], timeout_s: float, retry: Callable[[BaseException], bool], *,
                    keep_running: bool = False) -> Any:
    """`call()` within timeout_s; if it failed fast with an error `retry` accepts (a replica that
    died under it: its node lost, its process killed), made once more in the time left, which
    Serve routes to another replica. The one retry rule of every handle call the service makes:
    each is safe to repeat (searches and reads, and writes, which are idempotent)."""
    deadline = time.monotonic() + timeout_s
    try:
        return await within(call(), timeout_s, keep_running=keep_running)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        raise
    except Exception as e:
        if not retry(e) or deadline - time.monotonic() < 0.05:
            raise
        LOG.warning("a call failed fast (%s); made once more", type(e).__name__)
        return await within(call(), deadline - time.monotonic(), keep_running=keep_running)


def _group_key(q: Query) -> tuple:
    # k within a factor of two shares a search: asking a shard for a few more candidates costs
    # far less than a second call, and a much larger k would slow the small ones down.
    return id(q.router), q.vectors.shape[1:], q.nprobe, int(q.fetch - 1).bit_length()


async def run_batch(queries: list[Query]) -> list[Any]:
    """Search every query of a batch; returns per query its `Hits` or the exception that query
    met. Groups search concurrently; one group's failure never touches another group's queries."""
    groups: dict[tuple, list[int]] = {}
    for pos, q in enumerate(queries):
        groups.setdefault(_group_key(q), []).append(pos)
    out: list[Any] = [None] * len(queries)

    async def one(members: list[int]) -> None:
        qs = [queries[p] for p in members]
        fetch = max(q.fetch for q in qs)
        try:
            matrix = qs[0].vectors if len(qs) == 1 else np.concatenate([q.vectors for q in qs])
            hits = await qs[0].router.search(matrix, fetch, qs[0].nprobe)
        except Exception as e:  # every member gets the same error; other groups are unaffected
            for p in members:
                out[p] = e
            return
        start = 0
        for p, q in zip(members, qs):
            out[p] = hits.rows(start, start + q.rows, q.fetch)
            start += q.rows

    await asyncio.gather(*[one(m) for m in groups.values()])
    return out


def rank(hits: Hits, k: int, *, copy_bits: Optional[int],
         query_sha256: Union[None, str, Sequence[Optional[str]]] = None, exclude_query: bool = False,
         dedupe: bool = True) -> tuple[list[list[dict]], list[int]]:
    """The ranking policy (indexing.policy) on merged hits: result dicts and collapsed copies per query."""
    return rank_results(hits.scores, hits.ids, k, hits.meta, copy_bits=copy_bits, query_sha256=query_sha256,
                        exclude_query=exclude_query, dedupe=dedupe)
