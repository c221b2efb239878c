"""A shard that takes writes: snapshot + write-ahead log, visibility flags, compaction.

State on disk, per manifest version and shard, in `DIR/live/vN/`:
  shard-000.json        the current generation: {"generation", "index", "meta", "log"}
  shard-000.gG.faiss    snapshot index of generation G (G = 0 is the build's shard file)
  shard-000.gG.arrow    snapshot metadata (catalog.SCHEMA, memory-mapped; g0 is converted from
                        the version's catalog.parquet on first load)
  shard-000.gG.wal      writes since that snapshot
  shard-000.lock        serialises appends and compaction across replicas
Every replica tails the current log before each search, so once one replica acknowledges a
write (fsynced and applied), every replica applies it before answering any later query.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedding.copies import hash_hex
from indexing import storage, wal
from indexing.catalog import (
    HASHED, PRIVATE, UNSAFE, Columns, open_snapshot, read_catalog, sha_key, table_from_parquet, table_from_rows,
    write_snapshot,
)
from indexing.ids import shard_of
from indexing.manifest import Manifest, read_manifest
from indexing.merge import merge_topk
from indexing.shards import add_to_shard, is_refine, read_index, search_shard, shard_ids, shard_vectors

LOG = logging.getLogger(__name__)


def live_dir(root: str, version: int) -> str:
    """The write state of manifest version `version` under a local index directory."""
    path = os.path.join(root, "live", f"v{version}")
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        for d in (os.path.dirname(path), root):  # the new directories survive a power loss
            storage.fsync_dir(d)
    return path


def took_writes(root: str) -> bool:
    """Whether any shard of any version under a local index directory has logged a write since the
    build: a write-ahead log with bytes in it, or a compacted generation. Serving alone leaves
    state and lock files here, which are not writes."""
    for state_file in Path(root, "live").glob("v*/shard-*.json"):
        state = json.loads(state_file.read_text())
        log = state_file.with_name(state["log"])
        if state["generation"] > 0 or (log.is_file() and log.stat().st_size > 0):
            return True
    return False


def shard_name(shard_no: int) -> str:
    """The stem of every file of one shard in a live directory."""
    return f"shard-{shard_no:03d}"


def _ensure_state(live: str, manifest: Manifest, shard_no: int) -> dict:
    """The shard's state file, created at generation 0 (the build's shard file) on first use."""
    name = shard_name(shard_no)
    path = os.path.join(live, f"{name}.json")
    if not os.path.exists(path):
        state = {"generation": 0, "index": manifest.shards[shard_no].path, "meta": None, "log": f"{name}.g0.wal"}
        storage.write_bytes_atomic(path, json.dumps(state).encode())
    with open(path) as f:
        return json.load(f)


@contextmanager
def _locked_state(index_dir: str, manifest: Manifest, shard_no: int) -> Iterator[tuple[str, dict]]:
    """(path stem of the shard's files, its state) under the shard's lock, for writers that do not
    load the shard."""
    live = live_dir(storage.resolve(index_dir)[1], manifest.version)
    stem = os.path.join(live, shard_name(shard_no))
    with wal.locked(f"{stem}.lock"):
        yield stem, _ensure_state(live, manifest, shard_no)


class SealedError(RuntimeError):
    """A write to a shard of a version the service has switched away from."""


def read_records_since(index_dir: str, manifest: Manifest, shard_no: int, position: tuple[int, int],
                       seal: bool = False) -> list[wal.Record]:
    """Every record a shard logged after `position` = (generation, offset), across compactions.
    With `seal`, the shard refuses every later write (SealedError), decided under the same lock
    the records are read under: a write is either among the records returned or refused, never
    acknowledged and missed (the fence of a version switch).

    Compaction keeps the previous generation's log, and every log since the position a newer
    version's `replay_from` names (a pending catch-up); a position whose logs are gone all the
    same raises, before anything is sealed."""
    with _locked_state(index_dir, manifest, shard_no) as (stem, state):
        current = state["generation"]
        generation, offset = position
        logs = [f"{stem}.g{g}.wal" for g in range(generation, current + 1)]
        missing = [log for log in logs[:-1] if not os.path.exists(log)]
        if missing:  # checked before sealing: a catch-up that cannot finish seals nothing
            raise FileNotFoundError(f"{missing[0]} is gone (a compaction before pending catch-ups were kept, or "
                                    f"a lost disk): records after generation {generation} offset {offset} can no "
                                    "longer be replayed")
        if seal and not state.get("sealed"):
            storage.write_bytes_atomic(f"{stem}.json", json.dumps({**state, "sealed": True}).encode())
        out = []
        for g, log in zip(range(generation, current + 1), logs):
            out += wal.read_from(log, offset if g == generation else 0)[0]
        return out


def unseal(index_dir: str, manifest: Manifest, shard_no: int) -> None:
    """Let a shard take writes again after a switch that sealed it failed before it switched."""
    with _locked_state(index_dir, manifest, shard_no) as (stem, state):
        if state.get("sealed"):
            unsealed = {k: v for k, v in state.items() if k != "sealed"}
            storage.write_bytes_atomic(f"{stem}.json", json.dumps(unsealed).encode())


def append_records(index_dir: str, manifest: Manifest, shard_no: int, records: list[wal.Record]) -> None:
    """Durably append records to a shard's current log without loading the shard; every replica
    serving it applies them before its next search."""
    with _locked_state(index_dir, manifest, shard_no) as (stem, state):
        wal.append(os.path.join(os.path.dirname(stem), state["log"]), records)


class LiveShard:
    """One replica's copy of a shard, kept current from the shard's log.

    The snapshot (index and metadata) is memory-mapped and never changes; the writes since it live
    beside it: new vectors in `delta` (an empty copy of the template), their metadata in `rows`,
    and the snapshot ids they replace or delete in `moved` (their snapshot vectors are filtered out
    of every search) and `gone` (no metadata either). A compaction folds them into a new snapshot."""

    def __init__(self, index_dir: str, manifest: Manifest, shard_no: int):
        self.root, self.manifest, self.shard_no = index_dir, manifest, shard_no
        self.name = shard_name(shard_no)
        self._mutex = threading.RLock()
        if not storage.is_local(index_dir):
            # Object stores cannot append or lock: such an index is served read-only.
            self.live = None
            self._load()
            return
        self.root = storage.resolve(index_dir)[1]
        self.live = live_dir(self.root, manifest.version)
        with wal.locked(self._path("lock")):
            _ensure_state(self.live, manifest, shard_no)
            self._load()

    # ------------------------------------------------------------------ files

    def _path(self, ext: str) -> str:
        return os.path.join(self.live, f"{self.name}.{ext}")

    def _write_state(self, state: dict) -> None:
        storage.write_bytes_atomic(self._path("json"), json.dumps(state).encode())

    @property
    def position(self) -> tuple[int, int]:
        """(generation, log offset) this replica has applied: where a later reader resumes."""
        return self.generation, self.offset

    def _replay_needs_from(self) -> Optional[int]:
        """The oldest generation of this shard's log that a catch-up still reads: that of a newer
        version rebalanced from this one (indexing.catchup), or None. Such a version is switched
        to, or replaced by a later rebalance; until then the logs since its position stay."""
        try:
            newest = read_manifest(self.root).version
        except FileNotFoundError:
            return None
        needed = []
        for v in range(self.manifest.version + 1, newest + 1):
            try:
                r = read_manifest(self.root, v).replay_from
            except FileNotFoundError:
                continue
            if r is not None and r.version == self.manifest.version and self.shard_no < len(r.positions):
                needed.append(r.positions[self.shard_no][0])
        return min(needed) if needed else None

    def _names_generation(self, g: int) -> bool:
        """Whether the state file names generation g (when it cannot be read, assume it does:
        a stray file costs disk, a removed one the shard)."""
        try:
            return self._read_state()["generation"] == g
        except Exception:
            return True

    def _read_state(self) -> dict:
        if self.live is None:
            return {"generation": 0, "index": self.manifest.shards[self.shard_no].path, "meta": None, "log": None}
        with open(self._path("json")) as f:
            return json.load(f)

    def _snapshot_index_uri(self, state: dict) -> str:
        # Generation 0 is the build's shard file (relative to the index dir); later ones live here.
        return storage.join(self.live if state["meta"] else self.root, state["index"])

    def _load(self) -> None:
        """Map the snapshot the state file names and replay its log."""
        self._state = state = self._read_state()
        self.base = read_index(self._snapshot_index_uri(state), mmap=True)
        self.delta = read_index(storage.join(self.root, self.manifest.template))
        self.columns = Columns(self._snapshot_meta(state))
        self.rows: dict[int, list] = {}  # id -> [uri, sha256, private, unsafe, phash] written since the snapshot
        self.in_delta: set[int] = set()
        self.moved: set[int] = set()     # snapshot ids whose snapshot vector no longer counts
        self.gone: set[int] = set()      # snapshot ids deleted since the snapshot
        self._excluded: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self.generation, self.log_name, self.offset = state["generation"], state["log"], 0
        self._applied: Optional[tuple[int, bytes]] = None  # (start, header) of the last frame applied
        self.sync()

    def _snapshot_meta(self, state: dict) -> pa.Table:
        """The snapshot's metadata, memory-mapped. Generation 0 takes this shard's rows of the
        catalog, converted once into a mapped file beside the log (under the shard's lock)."""
        if state["meta"] and state["meta"].endswith(".arrow"):
            return open_snapshot(os.path.join(self.live, state["meta"]))
        if state["meta"]:  # a snapshot written before metadata was mapped
            return table_from_parquet(pq.read_table(os.path.join(self.live, state["meta"])))
        if self.live is not None and os.path.exists(self._path("g0.arrow")):
            return open_snapshot(self._path("g0.arrow"))
        catalog = read_catalog(self.root, self.manifest.catalog)
        ids = catalog.column("id").to_numpy()
        if self.manifest.placement == "cells":  # the build put each id where its cell is: the shard file says
            here = np.isin(ids, shard_ids(self.base))
        else:
            here = shard_of(ids, self.manifest.slot_table) == self.shard_no
        mine = catalog.filter(pa.array(here)) if len(ids) else catalog
        if self.live is None:
            return mine
        write_snapshot(self._path("g0.arrow"), mine)
        del catalog, mine
        pa.default_memory_pool().release_unused()  # the catalog was read whole: give its pages back
        return open_snapshot(self._path("g0.arrow"))

    # ------------------------------------------------------------------ applying writes

    def sync(self) -> None:
        """Apply records appended since the last sync; follow a compaction to the new log."""
        if self.live is None:
            return
        with self._mutex:
            # Read from the last frame applied, which must still be there: a writer whose fsync
            # failed cuts its frame back (never acknowledged) and the next write lands in its
            # place. A replica that applied the cut frame starts again from the snapshot and the
            # log, or it would skip the acknowledged write under its offset.
            log = os.path.join(self.live, self.log_name)
            fresh = wal.frames(log, self._applied[0] if self._applied else self.offset)
            if self._applied is not None:
                again = next(fresh, None)
                if again is None or again[1:] != (self.offset, self._applied[1]):
                    self._load()
                    return
            for r, end, head in fresh:
                if r is not None:
                    self._apply(r)
                if head:
                    self._applied = (self.offset, head)
                self.offset = end  # only past what is applied: a failure never skips a record
            if self._read_state()["generation"] != self.generation:
                # Another replica compacted: its snapshot holds every logged write, so reload it.
                self._load()

    def _row(self, id_: int) -> Optional[list]:
        """[uri, sha256, private, unsafe, phash] of an id as of the last applied write, or None."""
        if id_ in self.rows:
            return self.rows[id_]
        if id_ in self.gone:
            return None
        p = self.columns.position(id_)
        return self.columns.row(p) if p >= 0 else None

    def _drop_vector(self, id_: int) -> None:
        if id_ in self.in_delta:
            self.delta.remove_ids(np.array([id_], dtype=np.int64))
            self.in_delta.discard(id_)
        elif self.columns.position(id_) >= 0:
            self.moved.add(id_)

    def _apply(self, r: wal.Record) -> None:
        old = self._row(r.id)
        if r.op == "upsert":
            self._drop_vector(r.id)
            add_to_shard(self.delta, np.array([r.id], dtype=np.int64), r.vector[None, :])
            self.in_delta.add(r.id)
            flags = [given if given is not None else bool(old and old[i])
                     for i, given in ((2, r.private), (3, r.unsafe))]
            self.rows[r.id] = [r.uri, r.sha256, *flags, r.phash]
        elif r.op == "delete" and old is not None:
            self._drop_vector(r.id)
            self.rows.pop(r.id, None)
            if self.columns.position(r.id) >= 0:
                self.gone.add(r.id)
        elif r.op == "flags" and old is not None:
            m = list(old)
            if r.private is not None:
                m[2] = bool(r.private)
            if r.unsafe is not None:
                m[3] = bool(r.unsafe)
            self.rows[r.id] = m
        self._excluded = None

    def write(self, record: wal.Record) -> bool:
        """Durably log and apply one write; returns whether the id existed before it."""
        if self.live is None:
            raise PermissionError(f"index {self.root} is on an object store and is served read-only")
        # The file lock first, the replica's mutex inside it: waiting for another process (or a
        # compaction) never holds the mutex that this replica's searches take.
        with wal.locked(self._path("lock")):
            if self._read_state().get("sealed"):
                raise SealedError(f"{self.name} of version {self.manifest.version} is sealed: the service has "
                                  "switched to another version; retry")
            with self._mutex:
                self.sync()  # the state before this write, including other replicas' writes
                existed = self._row(record.id) is not None
                if record.op != "upsert" and not existed:
                    return False
                log = os.path.join(self.live, self.log_name)
                wal.append(log, [record], good_end=self.offset)  # cuts a torn tail a crash left
        self.sync()
        return existed

    # ------------------------------------------------------------------ reading

    def ids(self) -> np.ndarray:
        """Every id the shard holds, sorted."""
        base = self.columns.ids
        if self.gone:
            base = base[~np.isin(base, np.fromiter(self.gone, np.int64, len(self.gone)))]
        return np.union1d(base, np.fromiter(self.rows, np.int64, len(self.rows)))

    def table(self, ids: Optional[np.ndarray] = None) -> pa.Table:
        """Metadata rows (catalog.SCHEMA, sorted by id) of every id held, or of those in `ids`."""
        c = self.columns
        keep = np.ones(len(c), bool)
        for drop in (self.gone, self.rows):
            if drop:
                keep &= ~np.isin(c.ids, np.fromiter(drop, np.int64, len(drop)))
        if ids is not None:
            keep &= np.isin(c.ids, ids)
        wanted = None if ids is None else set(ids.tolist())
        rows = self.rows if wanted is None else {i: r for i, r in self.rows.items() if i in wanted}
        both = pa.concat_tables([c.table.filter(pa.array(keep)), table_from_rows(rows)])
        return both.take(pc.sort_indices(both.column("id")))

    def hidden(self) -> np.ndarray:
        """Ids flagged private or unsafe."""
        c = self.columns
        flagged = c.ids[(c.flags & (PRIVATE | UNSAFE)) != 0]
        if self.rows or self.gone:
            stale = set(self.rows) | self.gone
            flagged = flagged[~np.isin(flagged, np.fromiter(stale, np.int64, len(stale)))]
        extra = [i for i, m in self.rows.items() if m[2] or m[3]]
        return np.union1d(flagged, np.array(extra, np.int64))

    def get(self, id_: int) -> Optional[dict]:
        """Metadata of an id in this shard, or None."""
        self.sync()
        m = self._row(int(id_))
        if m is None:
            return None
        return {"id": int(id_), "uri": m[0], "sha256": m[1], "private": m[2], "unsafe": m[3],
                "perceptual_hash": None if m[4] is None else hash_hex(m[4])}

    def _hit(self, id_: int) -> tuple:
        """(uri, 64-bit sha256 prefix, perceptual hash or None): what the ranking policy needs."""
        if id_ in self.rows:
            m = self.rows[id_]
            return m[0], sha_key(m[1]), m[4]
        c, p = self.columns, self.columns.position(id_)
        if p < 0:
            return "", 0, None
        return c.uri(p), int(c.sha64[p]), int(c.phash[p]) if c.flags[p] & HASHED else None

    def search(self, queries: np.ndarray, k: int, nprobe: int, include_hidden: bool = False) -> dict:
        """(D, I) with flagged ids filtered inside the search (kept with `include_hidden`: an
        operator's corpus jobs), and (uri, sha256 prefix, perceptual hash) of the hits: what the
        ranking policy needs to collapse copies."""
        self.sync()
        with self._mutex:
            if self._excluded is None:
                hidden = self.hidden()
                moved = np.fromiter(self.moved, np.int64, len(self.moved))
                self._excluded = (np.union1d(hidden, moved), hidden, moved)
            base_exclude, delta_exclude, moved = self._excluded
            if include_hidden:
                base_exclude, delta_exclude = moved, None
            D, I = search_shard(self.base, queries, k, nprobe, exclude=base_exclude)
            if self.delta.ntotal:
                D, I = merge_topk([(D, I), search_shard(self.delta, queries, k, nprobe, exclude=delta_exclude)], k,
                                  self.manifest.metric)
            found = np.unique(I)
            hits = {i: self._hit(i) for i in found[found >= 0].tolist()}
        return {"D": D, "I": I, "meta": hits}

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal - len(self.moved) + self.delta.ntotal)

    @property
    def positions(self) -> int:
        """How many vector positions `vectors` reads from: the snapshot's, then the writes'."""
        return int(self.base.ntotal + self.delta.ntotal)

    def vectors(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) at positions start..stop (the snapshot's, then those written since, as
        shards.shard_vectors decodes them), less the snapshot's that writes replaced or deleted."""
        self.sync()
        with self._mutex:
            nb = int(self.base.ntotal)
            stale = self.moved | self.gone
            ids, x = shard_vectors(self.base, start, min(stop, nb))
            if stale and len(ids):
                keep = ~np.isin(ids, np.fromiter(stale, np.int64, len(stale)))
                ids, x = ids[keep], x[keep]
            if stop > nb and self.delta.ntotal:
                di, dx = shard_vectors(self.delta, max(start - nb, 0), stop - nb)
                ids, x = np.concatenate([ids, di]), np.concatenate([x, dx])
        return ids, x

    # ------------------------------------------------------------------ compaction

    def log_bytes(self) -> int:
        if self.live is None:
            return 0
        try:
            return os.path.getsize(os.path.join(self.live, self.log_name))
        except FileNotFoundError:
            return 0

    def materialize(self) -> faiss.Index:
        """The current state as one in-memory index: the snapshot read in full (a mapped one cannot
        change), less the vectors writes replaced, plus the new ones. Costs one shard of memory
        while it lives: compaction and rebalance use it, searches never do."""
        full = read_index(self._snapshot_index_uri(self._state))
        moved = np.fromiter(self.moved, np.int64, len(self.moved))
        if is_refine(full) and (len(moved) or self.delta.ntotal):
            # A Refine index can neither remove nor merge entries: rebuild it from its vectors.
            keep = np.setdiff1d(shard_ids(full), moved)
            rebuilt = read_index(storage.join(self.root, self.manifest.template))
            for source, ids in ((full, keep), (self.delta, shard_ids(self.delta))):
                if len(ids):
                    add_to_shard(rebuilt, ids, np.stack([source.reconstruct(int(i)) for i in ids]))
            return rebuilt
        if len(moved):
            full.remove_ids(moved)
        if self.delta.ntotal:
            full.merge_from(faiss.clone_index(self.delta), 0)
        return full

    def compact(self, min_log_bytes: int = 0) -> Optional[int]:
        """Write a new snapshot of the current state and start an empty log; returns the new
        generation, or None when the log, re-checked under the lock, is under `min_log_bytes`
        (another replica compacted first: a burst of writes snapshots once, not once per write).

        While the lock is held no process can append, so the state cannot change: the new snapshot
        is built and written beside the mapped one while this replica's searches go on. On failure
        (a full disk) nothing changes: no temporary file stays, the log keeps every write, and a
        later compaction tries again."""
        with wal.locked(self._path("lock")):
            if self._read_state().get("sealed"):
                return None  # a version switched away from takes no more writes: nothing to gain
            with self._mutex:
                self.sync()
                if self.log_bytes() < min_log_bytes:
                    return None
                g = self.generation + 1
            # Outside the mutex: reading the whole snapshot takes seconds, and with the lock held
            # no record can arrive, so the state stays put while this replica's searches go on.
            full, table = self.materialize(), self.table()
            index_path, meta_path = self._path(f"g{g}.faiss"), self._path(f"g{g}.arrow")
            try:
                storage.write_file_atomic(index_path, lambda tmp: faiss.write_index(full, tmp))
                full = None  # a shard's worth of memory, not needed for the rest
                write_snapshot(meta_path, table)
                with self._mutex:
                    self._write_state({"generation": g, "index": f"{self.name}.g{g}.faiss",
                                       "meta": f"{self.name}.g{g}.arrow", "log": f"{self.name}.g{g}.wal"})
                    self._load()
            except BaseException:
                # Once the state file names generation g (its rename may have happened before a
                # failure after it: the directory fsync, or loading it here), every other replica
                # and every new one loads g's files: they stay, and this replica follows at its
                # next sync. Only a generation nobody can name is removed.
                if not self._names_generation(g):
                    for p in (index_path, meta_path):
                        if os.path.exists(p):
                            os.remove(p)
                raise
        # Generation g-1 stays for replicas that are loading it right now; g-2 is unused, but for
        # its log while a version rebalanced from this one has not caught up from it yet.
        needed = self._replay_needs_from()
        for ext in ("faiss", "arrow", "parquet", "wal"):
            if ext == "wal" and needed is not None and needed <= g - 2:
                continue
            try:
                os.remove(self._path(f"g{g - 2}.{ext}"))
            except FileNotFoundError:
                pass
        LOG.info("%s compacted to generation %d (%d vectors)", self.name, g, self.ntotal)
        return g
