"""Cell placement: neighbouring cells grouped into balanced shards, and a query sent only to the
shards that own its nearest cells gets exactly what one unsharded IVF index answers."""
import asyncio

import faiss
import numpy as np
import pytest

from bench.vectors import synthetic
from configs.schema import load_config
from deployments.pipeline import Router
from indexing import storage
from indexing.build import BuildError, build_from_vectors
from indexing.catchup import catch_up
from indexing.cells import CellRouting, CoarseQuantizer, group_cells, shard_rows, shards_touched
from indexing.live import LiveShard
from indexing.manifest import Manifest, read_manifest
from indexing.merge import merge_topk
from indexing.rebalance import rebalance
from indexing.shards import add_to_shard, read_index, search_shard
from indexing.sharded import ShardedIndex
from indexing.wal import Record


@pytest.fixture(scope="module")
def clustered():
    return synthetic(6000, dim=32, queries=200, seed=3)


def test_groups_are_balanced_and_neighbouring(clustered):
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 128, faiss.METRIC_INNER_PRODUCT)
    index.train(clustered.base)
    q = CoarseQuantizer(index)
    counts = np.bincount(q.cells(clustered.base, 1)[:, 0], minlength=128)
    table = np.asarray(group_cells(q.centroids, counts, 8))
    per_shard = np.bincount(table, weights=counts, minlength=8)
    assert sorted(set(table.tolist())) == list(range(8))
    assert per_shard.max() <= 1.3 * per_shard.mean()
    touched = shards_touched(q.cells(clustered.queries, 8), table)
    random_table = np.random.default_rng(0).permutation(table)  # same sizes, neighbours scattered
    assert touched.mean() < 0.7 * shards_touched(q.cells(clustered.queries, 8), random_table).mean()
    rows = shard_rows(q.cells(clustered.queries, 8), table, 8)
    assert sum(len(r) for r in rows) == touched.sum()


def test_more_shards_than_cells_is_refused():
    with pytest.raises(ValueError, match="at least as many cells as shards"):
        group_cells(np.eye(4, dtype=np.float32), np.ones(4), 5)


def test_cell_placed_index_answers_as_one_ivf(ray_session, tmp_path, clustered):
    d = str(tmp_path / "ix")
    cfg = load_config(None, {"index": {"placement": "cells"}})
    ids = np.arange(len(clustered.base)) * 3 + 1
    build_from_vectors(clustered.base, ids, d, cfg, 4, "IVF64,Flat")
    m = read_manifest(d)
    assert m.placement == "cells" and len(m.cell_table) == 64
    ix = ShardedIndex.open(d)
    assert ix.ntotal == len(ids)

    # The one unsharded IVF: the same template holding every vector.
    whole = read_index(storage.join(d, m.template))
    add_to_shard(whole, ids, clustered.base)
    for nprobe in (1, 4, 16):
        # Equal scores in FAISS's own order are put in the service's order (ties by id).
        want_d, want_i = merge_topk([search_shard(whole, clustered.queries, 10, nprobe)], 10)
        got_d, got_i = ix.search(clustered.queries, 10, nprobe=nprobe)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-6)
    rows = ix.rows_per_shard(clustered.queries, 4)
    assert sum(len(r) for r in rows) < 0.7 * 4 * len(clustered.queries)  # most shards skipped

    # The service's Router asks only the owners of each query's cells, and merges the same answer.
    asked = [[] for _ in ix.shards]

    def shard_search(s):
        async def search(q, k, nprobe):
            asked[s].append(len(q))
            D, I = search_shard(ix.shards[s], q, k, nprobe)
            return {"D": D, "I": I, "meta": {}}
        return search

    router = Router([shard_search(s) for s in range(4)], m.slot_table, m.metric, 10.0, cells=ix.cells)
    hits = asyncio.run(router.search(clustered.queries, 10, 4))
    np.testing.assert_array_equal(hits.ids, ix.search(clustered.queries, 10, nprobe=4)[1])
    assert [sum(a) for a in asked] == [len(r) for r in rows] and not hits.partial

    # Each shard holds exactly the vectors of its cells.
    cells = CoarseQuantizer(whole).cells(clustered.base, 1)[:, 0]
    for s, shard in enumerate(ix.shards):
        assert shard.ntotal == int((np.asarray(m.cell_table)[cells] == s).sum())


def test_cells_need_an_ivf_factory(ray_session, tmp_path, clustered):
    cfg = load_config(None, {"index": {"placement": "cells"}})
    with pytest.raises(BuildError, match="placement cells: cell placement needs an IVF index"):
        build_from_vectors(clustered.base[:500], None, str(tmp_path / "ix"), cfg, 2, "Flat")


def test_manifest_checks_the_cell_table():
    base = dict(version=1, dim=4, metric="ip", factory="IVF4,Flat", nprobe=1, total=0, template="t",
                num_slots=2, slot_table=[0, 1], shards=[{"path": "a", "count": 0}, {"path": "b", "count": 0}])
    with pytest.raises(ValueError, match="needs a cell_table"):
        Manifest(**base, placement="cells")
    with pytest.raises(ValueError, match="cell_table names shards"):
        Manifest(**base, placement="cells", cell_table=[0, 1, 2, 1])
    assert Manifest(**base, placement="cells", cell_table=[0, 1, 1, 0]).cell_table == [0, 1, 1, 0]


def test_catch_up_follows_ids_that_moved_cells(ray_session, tmp_path, clustered):
    """Writes after a rebalance, as the Ingress makes them under cell placement: an id updated in
    place and then moved to another shard's cell (an upsert there, a delete where it was), and an
    id moved then deleted. Whatever order the old logs are read in, the new version ends with the
    first id once, at its last vector, and without the second."""
    d = str(tmp_path / "ix")
    ids = np.arange(len(clustered.base), dtype=np.int64) + 1
    build_from_vectors(clustered.base, ids, d, load_config(None, {"index": {"placement": "cells"}}), 4, "IVF64,Flat")
    old = read_manifest(d)
    routing = CellRouting.open(d, old.template, old.cell_table, old.nprobe)
    place = [routing.shard_of_vector(v) for v in clustered.base]
    new = rebalance(d, 3, task_cpus=0.05)

    # The id moves to a shard numbered below its own: a catch-up that reads the old logs in shard
    # order then meets the move's upsert before the update and the delete that preceded it.
    x = next(j for j in range(len(ids)) if place[j] == max(place))
    there = next(j for j in range(len(ids)) if place[j] < place[x])
    y = next(j for j in range(len(ids)) if place[j] == place[x] and j != x)
    a, b = place[x], place[there]
    moved_to = clustered.base[there] * 0.999 + 0.001  # the same cell as row `there`, a vector of its own
    moved_to /= np.linalg.norm(moved_to)
    assert routing.shard_of_vector(moved_to) == b
    write = lambda s, rec: LiveShard(d, old, s).write(rec)  # noqa: E731
    write(a, Record("upsert", int(ids[x]), clustered.base[x], uri="x1"))  # updated where it is
    write(b, Record("upsert", int(ids[x]), moved_to, uri="x2"))           # moved: new copy first ...
    write(a, Record("delete", int(ids[x])))                                # ... then the old one goes
    write(b, Record("upsert", int(ids[y]), moved_to, uri="y2"))
    write(a, Record("delete", int(ids[y])))
    write(b, Record("delete", int(ids[y])))                                # then deleted by a user
    assert catch_up(d, new) > 0

    shards = [LiveShard(d, new, s) for s in range(new.num_shards)]
    holders = [s for s, sh in enumerate(shards) if sh.get(int(ids[x])) is not None]
    assert len(holders) == 1 and shards[holders[0]].get(int(ids[x]))["uri"] == "x2"
    assert holders[0] == CellRouting.open(d, new.template, new.cell_table, new.nprobe).shard_of_vector(moved_to)
    assert all(sh.get(int(ids[y])) is None for sh in shards)
    assert sum(sh.ntotal for sh in shards) == len(ids) - 1
