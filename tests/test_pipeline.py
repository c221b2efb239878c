"""The query pipeline without Ray: batched fan-out over real shards, exact merge, isolation of a
bad request, deadlines, and the ranking policy."""
import asyncio

import numpy as np
import pytest

from configs.schema import load_config
from deployments.pipeline import Hits, Query, Router, ShardsUnavailable, rank, run_batch
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
        async def search(q, k, nprobe, with_vectors):
            if calls is not None:
                calls.append(len(q))
            return await asyncio.to_thread(shard.search, q, k, nprobe or m.nprobe, with_vectors)
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
        queries.append(Query(q, int(rng.choice([1, 5, 10, 16, 50])), int(rng.choice([1, 4, 32])), False, router))
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
    good = Query(x[:2], 5, 8, False, router)
    bad = Query(np.ones((1, 7), np.float32), 5, 8, False, router)  # wrong dimension
    out = asyncio.run(run_batch([good, bad, Query(x[2:3], 5, 8, False, router)]))
    assert isinstance(out[1], Exception)
    assert isinstance(out[0], Hits) and out[0].ids.shape == (2, 5) and out[0].ids[0, 0] == 1
    assert isinstance(out[2], Hits) and out[2].ids[0, 0] == 2 * 7 + 1


def test_slow_shard_is_left_out_and_none_means_unavailable(built):
    index_dir, x = built
    router = in_process_router(index_dir, timeout_s=0.5)

    async def stuck(*args):
        await asyncio.sleep(30)

    router.shards[1] = stuck
    hits = asyncio.run(router.search(x[:3], 10, 8, False))
    assert hits.partial and (hits.ids >= 0).all()
    router.shards = [stuck, stuck]
    with pytest.raises(ShardsUnavailable):
        asyncio.run(router.search(x[:3], 10, 8, False))


def test_rank_collapses_copies_with_vectors_and_keeps_order():
    v = np.eye(4, dtype=np.float32)
    near = (v[0] + 0.01 * v[1]) / np.linalg.norm(v[0] + 0.01 * v[1])
    vectors = {1: v[0], 2: near, 3: v[2], 4: v[3]}
    meta = {1: ("a", "s1"), 2: ("b", "s2"), 3: ("c", "s1"), 4: ("d", "s4")}
    hits = Hits(np.array([[0.9, 0.8, 0.7, 0.6, 0.0]], np.float32), np.array([[1, 2, 3, 4, -1]]), meta, vectors, False)
    got = rank(hits, 3, near_duplicate_cosine=0.97)
    assert [r["id"] for r in got[0]] == [1, 4]  # 2 is a near copy of 1, 3 has 1's bytes
    assert [r["id"] for r in rank(hits, 3, near_duplicate_cosine=0.97, dedupe=False)[0]] == [1, 2, 3]
    assert [r["id"] for r in rank(hits, 3, near_duplicate_cosine=0.97, exclude_sha256="s1")[0]] == [2, 4]
