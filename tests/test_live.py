"""The write-ahead log and live shards, without Ray: durability, replicas, flags, compaction."""
import os

import numpy as np
import pytest

from indexing.build import build_from_vectors
from indexing.catalog import sha_key
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


def test_a_reader_racing_an_append_never_skips_a_record(tmp_path, rng):
    """A replica tails the log while another appends byte by byte; payloads carry the frame marker
    and even a whole fake frame header. Every record arrives, once, in order."""
    import struct
    import zlib

    log = str(tmp_path / "race.wal")
    v = rng.normal(size=4).astype(np.float32)
    fake = b"IMW1" + struct.pack("<II", 4, zlib.crc32(b"abcd")) + b"abcd"
    records = [Record("upsert", i, v, uri=f"x/IMW1/IMW2-{i}.jpg{fake.decode('latin-1')}", sha256="h")
               for i in range(6)]
    data = b"".join(r.encode() for r in records)
    got, offset = [], 0
    with open(log, "wb") as f:
        for i in range(len(data)):
            f.write(data[i : i + 1])
            f.flush()
            recs, offset = read_from(log, offset)
            got += [(r.id, r.uri) for r in recs]
    assert got == [(r.id, r.uri) for r in records]


def test_a_torn_tail_is_cut_before_the_next_append(tmp_path, rng):
    log = str(tmp_path / "torn.wal")
    v = rng.normal(size=4).astype(np.float32)
    first, third = Record("upsert", 1, v, uri="a"), Record("upsert", 3, v, uri="c")
    append(log, [first])
    with open(log, "ab") as f:  # a crash half way through the next frame
        f.write(Record("upsert", 2, v, uri="b").encode()[:20])
    append(log, [third])
    recs, end = read_from(log, 0)
    assert [r.id for r in recs] == [1, 3] and end == os.path.getsize(log)
    assert end == len(first.encode()) + len(third.encode())  # the torn bytes were cut, not skipped over


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
    assert hit["I"][0, 0] == new_id and hit["meta"][new_id] == ("mem://new", sha_key("abc"), -1)
    old = int(a.ids()[0])
    assert a.write(Record("delete", old)) is True
    assert old not in b.search(x[old // 10][None], 5, 8)["I"]
    c = LiveShard(d, m, 0)  # a restarted replica: snapshot + log
    assert c.get(new_id)["uri"] == "mem://new" and c.get(old) is None and c.ntotal == a.ntotal
    a.compact()  # the hash survives a snapshot
    assert LiveShard(d, m, 0).get(new_id)["perceptual_hash"] == "ffffffffffffffff"
    a.write(Record("upsert", new_id, v, uri="mem://new", sha256="abd", phash=5))  # replaced: the new hash
    assert b.get(new_id)["perceptual_hash"] == "0000000000000005" and b.get(new_id)["sha256"] == "abd"
    assert c.get(int(c.ids()[0]))["perceptual_hash"] is None  # built from vectors: no pixels, no hash


def test_flags_filter_inside_search_and_compaction_keeps_state(index, rng):
    d, x = index
    m = read_manifest(d)
    a, b = LiveShard(d, m, 1), LiveShard(d, m, 1)
    ids = a.ids()[:30].tolist()
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
    ids = a.ids()[:4].tolist()
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


def test_a_failed_snapshot_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    from indexing import storage

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "snap.faiss"
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes_atomic(str(target), b"x" * 1000)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file
    monkeypatch.undo()
    storage.write_bytes_atomic(str(target), b"ok")  # space is back: writes work again
    assert target.read_bytes() == b"ok"


def test_a_full_disk_fails_only_the_write_it_hits(index, rng, monkeypatch):
    """ENOSPC while appending: that write is reported failed and leaves nothing behind; while
    compacting: no write fails, no temporary file stays. Every acknowledged write survives a
    restart, and writes and compaction work again once space returns."""
    import errno

    import faiss

    d, _ = index
    m = read_manifest(d)
    a = LiveShard(d, m, 0)
    ids = a.ids()[:3].tolist()
    assert a.write(Record("flags", ids[0], private=True))
    size = a.log_bytes()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space"):
            a.write(Record("flags", ids[1], private=True))
    assert a.log_bytes() == size  # the failed record is not in the log for any replica to apply
    with monkeypatch.context() as mp:
        mp.setattr(faiss, "write_index", full)
        with pytest.raises(OSError, match="No space"):
            a.compact()
    assert sorted(f for f in os.listdir(a.live) if ".tmp-" in f or ".g1." in f) == []
    assert a.generation == 0 and a.write(Record("flags", ids[2], unsafe=True))  # space is back
    b = LiveShard(d, m, 0)  # a restart
    assert b.get(ids[0])["private"] and not b.get(ids[1])["private"] and b.get(ids[2])["unsafe"]
    assert a.compact() == 1 and a.compact(min_log_bytes=1) is None  # an empty log is not compacted again
    assert LiveShard(d, m, 0).get(ids[2])["unsafe"]


def test_a_compaction_that_fails_after_publishing_keeps_the_files_it_published(index, monkeypatch):
    """The state file names generation 1 once it is renamed into place; if loading it then fails
    (MemoryError), its files must stay: every other replica and every new one loads them."""
    d, _ = index
    m = read_manifest(d)
    a = LiveShard(d, m, 0)
    ids = a.ids()[:2].tolist()
    assert a.write(Record("flags", ids[0], private=True))

    def no_memory(self):
        raise MemoryError("cannot map the snapshot")

    with monkeypatch.context() as mp:
        mp.setattr(LiveShard, "_load", no_memory)
        with pytest.raises(MemoryError):
            a.compact()
    b = LiveShard(d, m, 0)  # a new replica: loads what the state names
    assert b.generation == 1 and b.get(ids[0])["private"] and b.ntotal == a.ntotal
    a.sync()  # the replica that failed catches up with the generation in force
    assert a.generation == 1 and a.write(Record("flags", ids[1], unsafe=True))
    assert LiveShard(d, m, 0).get(ids[1])["unsafe"]


def test_a_uniform_image_keeps_its_hash_through_compaction_and_the_catalog(index, rng, tmp_path):
    """A flat image's pHash is one bit set (-2**63): a real hash, the same before and after a
    compaction, and through a catalog file; an image without pixels has none."""
    from embedding.copies import perceptual_hash
    from indexing.catalog import Columns, read_catalog, table_from_rows, write_catalog

    flat = perceptual_hash(np.full((64, 64, 3), 128, np.uint8))
    assert flat == -2**63
    d, _ = index
    m = read_manifest(d)
    a = LiveShard(d, m, 0)
    a.write(Record("upsert", 7_000_001, unit(rng), uri="flat.jpg", sha256="ab" * 32, phash=flat))
    a.write(Record("upsert", 7_000_002, unit(rng), uri="vector-only", sha256="cd" * 32))
    before = [a.get(i)["perceptual_hash"] for i in (7_000_001, 7_000_002)]
    assert before == ["8000000000000000", None]
    assert a.compact() == 1
    assert [LiveShard(d, m, 0).get(i)["perceptual_hash"] for i in (7_000_001, 7_000_002)] == before
    write_catalog(str(tmp_path / "catalog.parquet"), table_from_rows({1: ["a", "h", False, False, flat],
                                                                       2: ["b", "h", True, False, None]}))
    rows = Columns(read_catalog(str(tmp_path), "catalog.parquet"))
    assert [rows.row(p)[4] for p in range(2)] == [flat, None] and rows.row(1)[2]


def _rebalanced_with_writes_and_two_compactions(index_dir: str) -> tuple:
    """Rebalance to 3 shards, then on every old shard: a write, a compaction, twice over, and one
    more write. Returns (old shards, new manifest, ids written)."""
    from indexing.rebalance import rebalance

    old = read_manifest(index_dir)
    shards = [LiveShard(index_dir, old, s) for s in range(old.num_shards)]
    new = rebalance(index_dir, 3, task_cpus=0.05)
    written = []
    for round_ in range(3):
        for shard in shards:
            id_ = int(shard.ids()[round_])
            shard.write(Record("flags", id_, private=True))
            written.append(id_)
        if round_ < 2:
            assert all(shard.compact() == round_ + 1 for shard in shards)
    return shards, new, written


def test_compactions_before_a_switch_keep_the_logs_its_catch_up_reads(index):
    """Two compactions between a rebalance and its switch used to remove the log the catch-up
    starts from: the switch failed with writes paused."""
    from indexing.catchup import catch_up

    d, _ = index
    shards, new, written = _rebalanced_with_writes_and_two_compactions(d)
    assert catch_up(d, new) == len(written)
    for id_ in written:
        assert any((m := LiveShard(d, new, s).get(id_)) is not None and m["private"] for s in range(new.num_shards))


def test_a_catch_up_that_cannot_finish_leaves_no_old_shard_sealed(index):
    """A log gone all the same (a lost disk) on the second shard: the catch-up fails, and the
    first shard, sealed as it was read, takes writes again, as does the second."""
    from indexing.catchup import catch_up

    d, _ = index
    shards, new, _ = _rebalanced_with_writes_and_two_compactions(d)
    g = new.replay_from.positions[1][0]
    os.remove(os.path.join(shards[1].live, f"{shards[1].name}.g{g}.wal"))
    with pytest.raises(FileNotFoundError, match="can no longer be replayed"):
        catch_up(d, new)
    for shard in shards:
        shard.write(Record("flags", int(shard.ids()[6]), unsafe=True))


def test_a_replica_that_read_a_failed_append_applies_the_next_one(index, rng, monkeypatch):
    """A write's bytes reach the log, a replica reads them, then fsync fails (EIO) and the writer
    cuts them back: that write was never acknowledged. The next write lands where it was; the
    replica must apply it (its offset is already past it) and drop the one that failed."""
    import errno

    from indexing import wal

    d, _ = index
    m = read_manifest(d)
    writer, reader = LiveShard(d, m, 0), LiveShard(d, m, 0)
    failed, acked = (int(i) for i in writer.ids()[:2])
    real_fsync = os.fsync

    seen = []

    def fsync_fails_after_a_reader_looked(fd):
        reader.sync()  # another replica's search, in between write and fsync
        seen.append(reader._row(failed)[2])
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as mp:
        mp.setattr(wal.os, "fsync", fsync_fails_after_a_reader_looked)
        with pytest.raises(OSError, match="Input/output"):
            writer.write(Record("flags", failed, private=True, unsafe=True))
    assert seen == [True]  # it did apply the write that then failed
    assert os.fsync is real_fsync
    writer.write(Record("flags", acked, private=True))
    assert reader.get(acked)["private"], "the acknowledged write after a failed one was skipped"
    assert not reader.get(failed)["private"] and not writer.get(failed)["private"]
    assert LiveShard(d, m, 0).get(acked)["private"]


def test_a_sealed_shard_refuses_writes_so_none_is_acknowledged_and_missed(index, rng):
    """The fence of a version switch: records are read and the shard sealed under one lock. A write
    either lands before (and is among the records carried over) or is refused after."""
    from indexing.live import SealedError, read_records_since

    d, _ = index
    m = read_manifest(d)
    a, b = LiveShard(d, m, 1), LiveShard(d, m, 1)  # b: a replica on a lagging Ingress's path
    ids = a.ids()[:2].tolist()
    pos = a.position
    assert a.write(Record("flags", ids[0], private=True))
    carried = read_records_since(d, m, 1, pos, seal=True)
    assert [(r.op, r.id) for r in carried] == [("flags", ids[0])]
    with pytest.raises(SealedError, match="sealed"):
        b.write(Record("flags", ids[1], private=True))
    assert a.compact() is None and a.generation == 0  # a compaction does not unseal it
    with pytest.raises(SealedError):
        a.write(Record("delete", ids[1]))
    assert read_records_since(d, m, 1, pos) == carried  # nothing slipped in after the fence


@pytest.mark.parametrize("factory", ["Flat", "IVF8,SQ8", "PCA8,IVF8,SQ8", "OPQ4_8,IVF8,PQ4", "IVF8,PQ4x4fs,Refine(SQ8)"])
def test_a_mapped_snapshot_plus_writes_searches_like_one_index(ray_session, tmp_path, rng, factory):
    """The snapshot is memory-mapped and never changes; writes live beside it until a compaction
    folds them in. Before and after the compaction a search gives the same hits and scores, and
    the same as a fresh replica."""
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = str(tmp_path / "ix")
    build_from_vectors(x, np.arange(600), d, load_config(), 1, factory)
    m = read_manifest(d)
    a = LiveShard(d, m, 0)
    v = unit(rng)
    a.write(Record("upsert", 10**6, v, uri="new", sha256="ab" * 32))   # a new image
    a.write(Record("upsert", 5, -v, uri="re", sha256="cd" * 32))       # one of the snapshot's, replaced
    a.write(Record("delete", 7))
    a.write(Record("flags", 9, private=True))
    q = np.stack([v, -v, x[7], x[9]])
    before = a.search(q, 5, 8)
    assert a.ntotal == 600 and not np.isin(before["I"], [7, 9]).any()
    assert a.compact() == 1
    for replica in (a, LiveShard(d, m, 0)):
        after = replica.search(q, 5, 8)
        np.testing.assert_array_equal(after["I"], before["I"])
        np.testing.assert_allclose(after["D"], before["D"], rtol=1e-5, atol=1e-6)
        assert replica.ntotal == 600 and replica.get(5)["uri"] == "re" and replica.get(7) is None


def _hold_id_lock(index_dir: str, id_: int, held, release) -> None:
    """In another process: take an id's lock, say so, keep it until told to let go."""
    import asyncio

    from indexing.idlocks import id_lock

    async def main():
        async with id_lock(index_dir, id_):
            held.set()
            while not release.is_set():
                await asyncio.sleep(0.01)

    asyncio.run(main())


def test_an_id_lock_excludes_other_processes_and_frees_on_exit(tmp_path):
    """Two Ingress replicas are two processes: the id's lock file orders their writes of one id
    and lets writes of an id in another slot through."""
    import asyncio
    import multiprocessing

    from indexing.idlocks import SLOTS, id_lock

    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_id_lock, args=(str(tmp_path), 7, held, release))
    other.start()
    try:
        assert held.wait(60)

        async def try_lock(id_: int, wait_s: float) -> bool:
            try:
                async with asyncio.timeout(wait_s):
                    async with id_lock(str(tmp_path), id_):
                        return True
            except TimeoutError:
                return False

        assert not asyncio.run(try_lock(7, 0.3))  # held by the other process
        assert not asyncio.run(try_lock(7 + SLOTS, 0.1))  # same slot
        assert asyncio.run(try_lock(8, 1))  # another slot
        release.set()
        other.join(30)
        assert asyncio.run(try_lock(7, 5))  # freed when the holder let go
    finally:
        release.set()
        other.join(30)


def test_a_served_index_counts_as_written_only_once_a_write_is_logged(tmp_path):
    """`make run IMAGES=` rebuilds a folder's index when the folder changed, unless the index took
    writes a rebuild would lose. Serving alone leaves state and lock files under live/ (no writes):
    that index is still rebuilt; a logged write or a compacted generation keeps it."""
    import json

    from indexing import folders

    photos, index = tmp_path / "photos", tmp_path / "index"
    photos.mkdir()
    index.mkdir()
    (photos / "a.jpg").write_bytes(b"1")
    (index / "manifest.json").write_text("{}")
    folders.record(str(photos), str(index), (".jpg",))
    assert folders.state(str(photos), str(index), (".jpg",)) == "current"
    (photos / "b.jpg").write_bytes(b"2")
    live = index / "live" / "v1"
    live.mkdir(parents=True)  # what a shard replica leaves on first load
    (live / "shard-000.json").write_text(json.dumps({"generation": 0, "index": "shard-000.faiss", "meta": None,
                                                     "log": "shard-000.g0.wal"}))
    (live / "shard-000.lock").write_bytes(b"")
    (live / "shard-000.g0.wal").write_bytes(b"")
    assert folders.state(str(photos), str(index), (".jpg",)) == "stale"
    append(str(live / "shard-000.g0.wal"), [Record("delete", 7)])
    assert folders.state(str(photos), str(index), (".jpg",)) == "stale-with-writes"
    (live / "shard-000.g0.wal").write_bytes(b"")
    (live / "shard-000.json").write_text(json.dumps({"generation": 1, "index": "shard-000.g1.faiss", "meta": None,
                                                     "log": "shard-000.g1.wal"}))
    assert folders.state(str(photos), str(index), (".jpg",)) == "stale-with-writes"
