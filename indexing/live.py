"""A shard that takes writes: snapshot + write-ahead log, visibility flags, compaction.

State on disk, per manifest version and shard, in `DIR/live/vN/`:
  shard-000.json        the current generation: {"generation", "index", "meta", "log"}
  shard-000.gG.faiss    snapshot index of generation G (G = 0 is the build's shard file)
  shard-000.gG.parquet  snapshot metadata: id, uri, sha256, private, unsafe, phash
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
from typing import Iterator, Optional

import faiss
import numpy as np
from embedding.copies import hash_hex
from indexing import storage, wal
from indexing.catalog import read_meta, write_meta
from indexing.ids import shard_of
from indexing.manifest import Manifest
from indexing.shards import add_to_shard, read_index, search_shard

LOG = logging.getLogger(__name__)


def live_dir(root: str, version: int) -> str:
    """The write state of manifest version `version` under a local index directory."""
    path = os.path.join(root, "live", f"v{version}")
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        for d in (os.path.dirname(path), root):  # the new directories survive a power loss
            storage.fsync_dir(d)
    return path


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

    Compaction keeps the previous generation's log, so a position one generation old still works;
    an older one raises, because those records now exist only inside a snapshot."""
    with _locked_state(index_dir, manifest, shard_no) as (stem, state):
        if seal and not state.get("sealed"):
            storage.write_bytes_atomic(f"{stem}.json", json.dumps({**state, "sealed": True}).encode())
        current = state["generation"]
        generation, offset = position
        out = []
        for g in range(generation, current + 1):
            log = f"{stem}.g{g}.wal"
            if g < current and not os.path.exists(log):
                raise FileNotFoundError(f"{log} was removed by a later compaction: records after generation "
                                        f"{generation} offset {offset} can no longer be replayed")
            out += wal.read_from(log, offset if g == generation else 0)[0]
        return out


def append_records(index_dir: str, manifest: Manifest, shard_no: int, records: list[wal.Record]) -> None:
    """Durably append records to a shard's current log without loading the shard; every replica
    serving it applies them before its next search."""
    with _locked_state(index_dir, manifest, shard_no) as (stem, state):
        wal.append(os.path.join(os.path.dirname(stem), state["log"]), records)


class LiveShard:
    """One replica's in-memory copy of a shard, kept current from the shard's log."""

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

    def _read_state(self) -> dict:
        if self.live is None:
            return {"generation": 0, "index": self.manifest.shards[self.shard_no].path, "meta": None, "log": None}
        with open(self._path("json")) as f:
            return json.load(f)

    def _load(self) -> None:
        """Load the snapshot the state file names and replay its log."""
        state = self._read_state()
        # Generation 0 is the build's shard file (relative to the index dir); later ones live here.
        index = read_index(storage.join(self.live if state["meta"] else self.root, state["index"]))
        if isinstance(index, faiss.IndexIVF):
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove and reconstruct by id
        self.index = index
        self.meta = self._load_meta(state)
        self.hidden = {i for i, m in self.meta.items() if m[2] or m[3]}
        self._hidden_arr: Optional[np.ndarray] = None
        self.generation, self.log_name, self.offset = state["generation"], state["log"], 0
        self.sync()

    def _load_meta(self, state: dict) -> dict[int, list]:
        """id -> [uri, sha256, private, unsafe, phash]; generation 0 takes this shard's rows of the catalog."""
        if state["meta"]:
            return read_meta(self.live, state["meta"])
        catalog = read_meta(self.root, self.manifest.catalog)
        ids = np.fromiter(catalog, dtype=np.int64, count=len(catalog))
        return {int(i): catalog[int(i)] for i in ids[shard_of(ids, self.manifest.slot_table) == self.shard_no]}

    # ------------------------------------------------------------------ applying writes

    def sync(self) -> None:
        """Apply records appended since the last sync; follow a compaction to the new log."""
        if self.live is None:
            return
        with self._mutex:
            for r, end in wal.frames(os.path.join(self.live, self.log_name), self.offset):
                if r is not None:
                    self._apply(r)
                self.offset = end  # only past what is applied: a failure never skips a record
            if self._read_state()["generation"] != self.generation:
                # Another replica compacted: its snapshot holds every logged write, so reload it.
                self._load()

    def _apply(self, r: wal.Record) -> None:
        ids = np.array([r.id], dtype=np.int64)
        if r.op == "upsert":
            old = self.meta.get(r.id)
            if old is not None:
                self.index.remove_ids(ids)
            add_to_shard(self.index, ids, r.vector[None, :])
            flags = old[2:4] if old else [False, False]
            self.meta[r.id] = [r.uri, r.sha256, *flags, r.phash]
        elif r.op == "delete":
            if r.id in self.meta:
                self.index.remove_ids(ids)
                del self.meta[r.id]
                self.hidden.discard(r.id)
        elif r.op == "flags" and r.id in self.meta:
            m = self.meta[r.id]
            if r.private is not None:
                m[2] = bool(r.private)
            if r.unsafe is not None:
                m[3] = bool(r.unsafe)
            (self.hidden.add if m[2] or m[3] else self.hidden.discard)(r.id)
        self._hidden_arr = None

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
                existed = record.id in self.meta
                if record.op != "upsert" and not existed:
                    return False
                log = os.path.join(self.live, self.log_name)
                wal.append(log, [record], good_end=self.offset)  # cuts a torn tail a crash left
        self.sync()
        return existed

    # ------------------------------------------------------------------ reading

    def get(self, id_: int) -> Optional[dict]:
        """Metadata of an id in this shard, or None."""
        self.sync()
        m = self.meta.get(int(id_))
        if m is None:
            return None
        return {"id": int(id_), "uri": m[0], "sha256": m[1], "private": m[2], "unsafe": m[3],
                "perceptual_hash": None if m[4] is None else hash_hex(m[4])}

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> dict:
        """(D, I) with flagged ids filtered inside the search, and (uri, sha256, perceptual hash)
        of the hits: what the ranking policy needs to collapse copies."""
        self.sync()
        with self._mutex:
            if self._hidden_arr is None:
                self._hidden_arr = np.fromiter(self.hidden, dtype=np.int64, count=len(self.hidden))
            D, I = search_shard(self.index, queries, k, nprobe, exclude=self._hidden_arr)
            found = np.unique(I)
            found = found[found >= 0]
            none = ("", "", False, False, None)
            hits = {i: (m[0], m[1], m[4]) for i, m in ((i, self.meta.get(i, none)) for i in found.tolist())}
        return {"D": D, "I": I, "meta": hits}

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # ------------------------------------------------------------------ compaction

    def log_bytes(self) -> int:
        if self.live is None:
            return 0
        try:
            return os.path.getsize(os.path.join(self.live, self.log_name))
        except FileNotFoundError:
            return 0

    def compact(self, min_log_bytes: int = 0) -> Optional[int]:
        """Write a new snapshot of the current state and start an empty log; returns the new
        generation, or None when the log, re-checked under the lock, is under `min_log_bytes`
        (another replica compacted first: a burst of writes snapshots once, not once per write).

        While the lock is held no process can append, so the index cannot change: the snapshot is
        written straight to its temporary file (no in-memory copy) while this replica's searches
        go on. On failure (a full disk) nothing changes: no temporary file stays, the log keeps
        every write, and a later compaction tries again."""
        with wal.locked(self._path("lock")):
            if self._read_state().get("sealed"):
                return None  # a version switched away from takes no more writes: nothing to gain
            with self._mutex:
                self.sync()
                if self.log_bytes() < min_log_bytes:
                    return None
                g = self.generation + 1
            index_path, meta_path = self._path(f"g{g}.faiss"), self._path(f"g{g}.parquet")
            try:
                storage.write_file_atomic(index_path, lambda tmp: faiss.write_index(self.index, tmp))
                write_meta(meta_path, self.meta)
                with self._mutex:
                    self._write_state({"generation": g, "index": f"{self.name}.g{g}.faiss",
                                       "meta": f"{self.name}.g{g}.parquet", "log": f"{self.name}.g{g}.wal"})
                    self.generation, self.log_name, self.offset = g, f"{self.name}.g{g}.wal", 0
            except BaseException:
                for p in (index_path, meta_path):
                    if os.path.exists(p):
                        os.remove(p)
                raise
        # Generation g-1 stays for replicas that are loading it right now; g-2 is unused.
        for ext in ("faiss", "parquet", "wal"):
            try:
                os.remove(self._path(f"g{g - 2}.{ext}"))
            except FileNotFoundError:
                pass
        LOG.info("%s compacted to generation %d (%d vectors)", self.name, g, self.index.ntotal)
        return g
