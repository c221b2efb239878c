"""The write-ahead log and live shards, without Ray: durability, replicas, flags, compaction."""
import os

import numpy as np
import pytest

from indexing.build import build_from_vectors
from indexing.live import LiveShard
from indexing.manifest import read_manifest
from indexing.wal import Record, append, read_from
from configs.schema import load_config


def test_log_round_trip_and_torn_frames(tmp_path, rng):
    log = str(tmp_path / "x.wal")
    v = rng.normal(size=8).astype(np.float32)
    append(log, [Record("upsert", 5, v, uri="u", sha256="h", phash=-2**63), Record("flags", 5, private=True)])
    with open(log, "ab") as f:  # a crash mid-append: half a frame
        f.write(Record("delete", 5).encode()[:9])
    recs, off = read_from(log, 0)
    assert [r.op for r in recs] == ["upsert", "flags"] and np.array_equal(recs[0].vector, v)
    assert recs[0].phash == -2**63 and recs[1].phash is None
    append(log, [Record("delete", 7)])  # a later acknowledged write is not hidden by the torn frame
    more, _ = read_from(log, off)
    assert [(r.op, r.id) for r in more] == [("delete", 7)]


@pytest.fixture
def index(ray_session, tmp_path, rng):
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    build_from_vectors(x, np.arange(600) * 10, str(tmp_path / "ix"), load_config(), 2, "IVF8,Flat")
    return str(tmp_path / "ix"), x


def unit(rng, d=16):
    v = rng.normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


def test_writes_reach_every_replica_and_survive_restart(index, rng):
    d, x = index
    m = read_manifest(d)
    a, b = LiveShard(d, m, 0), LiveShard(d, m, 0)  # two replicas of shard 0
    from indexing.ids import shard_of

    new_id = next(i for i in range(10**6, 10**6 + 100) if shard_of([i], m.slot_table)[0] == 0)
    v = unit(rng)
    assert a.write(Record("upsert", new_id, v, uri="mem://new", sha256="abc", phash=-1)) is False
    hit = b.search(v[None], 1, 8)  # the other replica sees it at its next search, hash included
    assert hit["I"][0, 0] == new_id and hit["meta"][new_id] == ("mem://new", "abc", -1)
    old = next(iter(a.meta))
    assert a.write(Record("delete", old)) is True
    assert old not in b.search(x[old // 10][None], 5, 8)["I"]
    c = LiveShard(d, m, 0)  # a restarted replica: snapshot + log
    assert c.get(new_id)["uri"] == "mem://new" and c.get(old) is None and c.ntotal == a.ntotal
    a.compact()  # the hash survives a snapshot
    assert LiveShard(d, m, 0).get(new_id)["perceptual_hash"] == "ffffffffffffffff"
    a.write(Record("upsert", new_id, v, uri="mem://new", sha256="abd", phash=5))  # replaced: the new hash
    assert b.get(new_id)["perceptual_hash"] == "0000000000000005" and len(b.meta[new_id]) == 5
    assert c.get(next(iter(c.meta)))["perceptual_hash"] is None  # built from vectors: no pixels, no hash


def test_flags_filter_inside_search_and_compaction_keeps_state(index, rng):
    d, x = index
    m = read_manifest(d)
    a, b = LiveShard(d, m, 1), LiveShard(d, m, 1)
    ids = list(a.meta)[:30]
    for i in ids:
        a.write(Record("flags", i, private=True))
    q = x[np.array(ids) // 10]
    res = b.search(q, 10, 8)
    assert (res["I"] >= 0).all() and not np.isin(res["I"], ids).any()  # still k results, none flagged
    gen = a.compact()
    assert a.log_bytes() == 0 and gen == 1
    a.write(Record("flags", ids[0], private=False))
    assert ids[0] in b.search(q[:1], 1, 8)["I"]  # b follows the compaction, then the new log
    fresh = LiveShard(d, m, 1)
    assert fresh.get(ids[1])["private"] is True and fresh.get(ids[0])["private"] is False
    a.compact(), a.compact()
    assert not os.path.exists(os.path.join(a.live, "shard-001.g1.wal"))


def test_records_since_a_position_survive_one_compaction_not_two(index, rng):
    from indexing.live import read_records_since

    d, _ = index
    m = read_manifest(d)
    a = LiveShard(d, m, 0)
    ids = sorted(a.meta)[:4]
    a.write(Record("flags", ids[0], private=True))
    pos = a.position  # what a rebalance would record
    a.write(Record("delete", ids[1]))
    a.compact()
    a.write(Record("flags", ids[2], unsafe=True))
    got = read_records_since(d, m, 0, pos)
    assert [(r.op, r.id) for r in got] == [("delete", ids[1]), ("flags", ids[2])]
    a.compact()  # the log of the recorded generation is gone now: refuse rather than miss writes
    with pytest.raises(FileNotFoundError, match="compaction"):
        read_records_since(d, m, 0, pos)
