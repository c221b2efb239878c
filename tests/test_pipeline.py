"""The query pipeline without Ray: batched fan-out over real shards, exact merge, isolation of a
bad request, deadlines, and the ranking policy."""
import asyncio

import numpy as np
import orjson
import pytest

from configs.schema import load_config
from deployments.pipeline import Hits, KeyedLocks, Query, Router, ShardsUnavailable, once_more, rank, run_batch
from indexing import ShardedIndex
from indexing.build import build_from_vectors
from indexing.live import LiveShard
from indexing.manifest import read_manifest


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = str(tmp_path_factory.mktemp("pipeline") / "ix")
    build_from_vectors(x, np.arange(3000) * 7 + 1, d, load_config(), 3, "IVF32,Flat")
    return d, x


def in_process_router(index_dir: str, timeout_s: float = 5.0, calls: list | None = None) -> Router:
    """A Router over LiveShards searched in this process, as the Ingress does over handles."""
    m = read_manifest(index_dir)
    shards = [LiveShard(index_dir, m, i) for i in range(m.num_shards)]

    def search_fn(shard):
        async def search(q, k, nprobe):
            if calls is not None:
                calls.append(len(q))
            return await asyncio.to_thread(shard.search, q, k, nprobe or m.nprobe)
        return search

    return Router([search_fn(s) for s in shards], m.slot_table, m.metric, timeout_s)


def test_batch_of_mixed_requests_equals_sharded_index(built):
    index_dir, x = built
    calls: list[int] = []
    router = in_process_router(index_dir, calls=calls)
    ix = ShardedIndex.open(index_dir)
    rng = np.random.default_rng(0)
    queries = []
    for i in range(64):
        n = int(rng.integers(1, 4))
        q = x[rng.integers(0, len(x), n)] + rng.normal(scale=0.05, size=(n, 32)).astype(np.float32)
        queries.append(Query(q, int(rng.choice([1, 5, 10, 16, 50])), int(rng.choice([1, 4, 32])), router))
    out = asyncio.run(run_batch(queries))
    for q, hits in zip(queries, out):
        D, I = ix.search(q.vectors, q.fetch, nprobe=q.nprobe)
        assert hits.ids.tolist() == I.tolist()
        np.testing.assert_allclose(hits.scores, D, rtol=1e-5, atol=1e-6)
        assert not hits.partial
    # Grouped by nprobe and k bucket: far fewer shard calls than requests x shards.
    assert len(calls) <= 3 * 3 * 6 < 64 * 3


def test_bad_request_does_not_fail_its_batch(built):
    index_dir, x = built
    router = in_process_router(index_dir)
    good = Query(x[:2], 5, 8, router)
    bad = Query(np.ones((1, 7), np.float32), 5, 8, router)  # wrong dimension
    out = asyncio.run(run_batch([good, bad, Query(x[2:3], 5, 8, router)]))
    assert isinstance(out[1], Exception)
    assert isinstance(out[0], Hits) and out[0].ids.shape == (2, 5) and out[0].ids[0, 0] == 1
    assert isinstance(out[2], Hits) and out[2].ids[0, 0] == 2 * 7 + 1


def test_a_query_of_the_wrong_shape_fails_alone(built):
    """A (1, d, 2) array, as a nested JSON vector once reached the batch, has the dimension the
    group is keyed by; it must fail on its own, not every query of its batch."""
    index_dir, x = built
    router = in_process_router(index_dir)
    out = asyncio.run(run_batch([Query(x[:1], 5, 8, router), Query(np.ones((1, 32, 2), np.float32), 5, 8, router)]))
    assert isinstance(out[0], Hits) and out[0].ids[0, 0] == 1
    assert isinstance(out[1], Exception)


def test_a_nested_json_vector_is_a_422():
    from deployments.http import ApiError, parse_vector_request

    for body in ({"vector": [[0.1, 0.2]] * 32}, {"vectors": [[[0.1, 0.2]] * 32]}):
        with pytest.raises(ApiError) as e:
            parse_vector_request(orjson.dumps(body), "application/json", 32, 8)
        assert e.value.status == 422 and e.value.code == "invalid_vector"


def test_writes_of_one_id_go_one_at_a_time_and_others_side_by_side():
    locks, order = KeyedLocks(), []

    async def write(key: int, tag: str):
        async with locks.hold(key):
            order.append(("in", tag))
            await asyncio.sleep(0.01)
            order.append(("out", tag))

    async def main():
        await asyncio.gather(write(1, "a"), write(1, "b"), write(2, "c"))

    asyncio.run(main())
    assert order.index(("out", "a")) < order.index(("in", "b"))  # one id: one at a time
    assert order.index(("in", "c")) < order.index(("out", "a"))  # another id: side by side
    assert not locks._locks  # nothing kept for ids no one writes


def test_slow_shard_is_left_out_and_none_means_unavailable(built):
    index_dir, x = built
    router = in_process_router(index_dir, timeout_s=0.5)

    async def stuck(*args):
        await asyncio.sleep(30)

    router.shards[1] = stuck
    hits = asyncio.run(router.search(x[:3], 10, 8))
    assert hits.partial and (hits.ids >= 0).all()
    router.shards = [stuck, stuck]
    with pytest.raises(ShardsUnavailable, match="within 0.5 s"):
        asyncio.run(router.search(x[:3], 10, 8))

    async def broken(*args):
        raise TypeError("bad arguments")

    router.shards = [broken, stuck]  # a failure that is not slowness says what it was
    with pytest.raises(ShardsUnavailable, match="TimeoutError, TypeError"):
        asyncio.run(router.search(x[:3], 10, 8))


def test_a_call_that_failed_fast_is_made_once_more():
    tries: list[str] = []

    def flaky(*errors):
        async def call():
            tries.append("call")
            if len(tries) <= len(errors):
                raise errors[len(tries) - 1]
            return "answer"
        return call

    def died(e):
        return isinstance(e, ConnectionError)  # stands for RayActorError: a replica died under it

    assert asyncio.run(once_more(flaky(ConnectionError()), 5, died)) == "answer" and len(tries) == 2
    tries.clear()
    with pytest.raises(ConnectionError):  # once more, not forever
        asyncio.run(once_more(flaky(ConnectionError(), ConnectionError()), 5, died))
    assert len(tries) == 2
    tries.clear()
    with pytest.raises(ValueError):  # an error the rule does not accept is not repeated
        asyncio.run(once_more(flaky(ValueError()), 5, died))
    assert len(tries) == 1

    async def slow():
        await asyncio.sleep(5)

    with pytest.raises(asyncio.TimeoutError):  # slowness is not repeated: the deadline is spent
        asyncio.run(once_more(slow, 0.2, lambda e: True))


def test_rank_collapses_copies_by_hash_and_keeps_order():
    h = -0x0F0F_0F0F_0F0F_0F0F  # negative: the int64 a hash with its top bit set is stored as
    meta = {1: ("a", "s1", h), 2: ("b", "s2", h ^ 0b111), 3: ("c", "s1", None), 4: ("d", "s4", h ^ 0xFFFF),
            5: ("e", "s5", None), 6: ("f", "s6", h ^ -(1 << 63) ^ 0xFF)}
    hits = Hits(np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]], np.float32), np.array([[1, 2, 3, 4, 5, 6, -1]]),
                meta, False)
    # 2 is 3 bits from 1: a copy; 3 has 1's bytes; 4 is 16 bits away: another picture; 5 has no hash;
    # 6 is 9 bits away, one of them the sign bit.
    def ids(k, **kw):
        results, collapsed = rank(hits, k, **kw)
        return [r["id"] for r in results[0]], collapsed[0]

    # The answer says how many hits it folded into better ones (results can be fewer than k).
    assert ids(6, copy_bits=12) == ([1, 4, 5], 3)
    assert ids(6, copy_bits=2) == ([1, 2, 4, 5, 6], 1)
    assert ids(6, copy_bits=None) == ([1, 2, 4, 5, 6], 1)  # identical bytes only
    assert ids(3, copy_bits=12, dedupe=False) == ([1, 2, 3], 0)
    assert ids(3, copy_bits=12, query_sha256="s1", exclude_query=True) == ([2, 4, 5], 0)  # own bytes are not copies
    # The query's own bytes, indexed, lead their copies whatever the scores: an indexed image's
    # vector (model.index_views) is not its query vector, so a copy can score a little higher.
    assert ids(3, copy_bits=12, query_sha256="s2") == ([2, 4, 5], 2)
    assert ids(3, copy_bits=2, query_sha256="s4") == ([4, 1, 2], 0)
    assert ids(3, copy_bits=2, query_sha256="s4", dedupe=False) == ([1, 2, 3], 0)  # exact merge order
    assert ids(2, copy_bits=12) == ([1, 4], 2)  # only hits passed over before the k-th result count
    # A batch of image searches: one own sha per row.
    two = Hits(np.repeat(hits.scores, 2, axis=0), np.repeat(hits.ids, 2, axis=0), meta, False)
    rows, _ = rank(two, 2, copy_bits=2, query_sha256=["s4", "s5"])
    assert [[r["id"] for r in row] for row in rows] == [[4, 1], [5, 1]]
