"""Per-id metadata: uri, sha256, visibility flags and perceptual hash, as Arrow columns.

Two files hold it. A version's `catalog.parquet` (written by a build or a rebalance) is the
portable copy. A live shard's snapshot metadata is an uncompressed Arrow IPC file sorted by id,
which a replica memory-maps: ids, the 64-bit sha256 prefix, hashes and flags become numpy views of
the mapped pages and uris stay in the page cache, so a replica holds no Python object per image
and replicas on one node share those pages."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexing import storage

# Bits of the `flags` column. HASHED says `phash` holds a perceptual hash: every 64-bit value is
# a possible pHash (a flat image's is -2**63, one bit set), so "no hash" (an image indexed from
# vectors) cannot be a value of the column; and arrays without nulls map zero-copy.
PRIVATE, UNSAFE, HASHED = 1, 2, 4

SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("sha256", pa.string()), ("sha64", pa.int64()),
                    ("phash", pa.int64()), ("flags", pa.uint8())])
# Snapshots written before HASHED existed marked "no hash" by the value -2**63 in phash instead.
_SNAPSHOT_META = {b"hashed_flag": b"1"}
_OLD_NO_HASH = -(2**63)
_HEX = np.zeros(256, np.uint64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = _HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def sha_key(sha256: str) -> int:
    """The first 64 bits of a hex sha256 as a signed int (0 for none): enough to tell apart the
    results of one query, 8 bytes instead of a 64-character string per image."""
    if not sha256:
        return 0
    return int(sha_keys(pa.array([sha256]))[0])


def sha_keys(shas: pa.Array) -> np.ndarray:
    """sha_key of every string of an Arrow array, vectorised over the hex digits."""
    shas = shas.fill_null("")
    n = len(shas)
    out = np.zeros(n, np.uint64)
    if n == 0:
        return out.view(np.int64)
    if pa.types.is_large_string(shas.type):
        shas = shas.cast(pa.string())
    offsets = np.frombuffer(shas.buffers()[1], np.int32, n + 1, shas.offset * 4)
    data = np.frombuffer(shas.buffers()[2], np.uint8) if shas.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    full = lengths >= 16
    if full.any():
        starts = offsets[:-1][full].astype(np.int64)
        digits = _HEX[data[starts[:, None] + np.arange(16)]]
        out[full] = (digits << (np.uint64(4) * np.arange(15, -1, -1, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
    for i in np.flatnonzero(~full & (lengths > 0)):  # short strings: only tests and hand-made rows
        s = shas[int(i)].as_py()
        out[i] = int(s.ljust(16, "0"), 16) if _is_hex(s) else int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "big")
    return out.view(np.int64)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def table_from_parquet(t: pa.Table) -> pa.Table:
    """A catalog table (id, uri, sha256[, private, unsafe, phash]) in SCHEMA, sorted by id; missing
    flag columns read as unset and a missing or null phash as no hash."""
    n = t.num_rows
    flags = np.zeros(n, np.uint8)
    for name, bit in (("private", PRIVATE), ("unsafe", UNSAFE)):
        if name in t.column_names:
            flags |= np.where(t.column(name).fill_null(False).to_numpy(zero_copy_only=False), bit, 0).astype(np.uint8)
    if "phash" in t.column_names:
        flags |= np.where(t.column("phash").is_valid().to_numpy(zero_copy_only=False), HASHED, 0).astype(np.uint8)
        phash = t.column("phash").fill_null(0)
    else:
        phash = pa.array(np.zeros(n, np.int64))
    sha = t.column("sha256").combine_chunks() if n else pa.array([], pa.string())
    out = pa.table([t.column("id").cast(pa.int64()), t.column("uri").fill_null(""), sha.fill_null(""),
                    pa.array(sha_keys(sha)), phash.cast(pa.int64()), pa.array(flags)], schema=SCHEMA)
    return out.take(pc.sort_indices(out.column("id"))) if n else out


def table_from_rows(rows: dict[int, list]) -> pa.Table:
    """SCHEMA rows from id -> [uri, sha256, private, unsafe, phash or None] (the writes since a
    snapshot: few), sorted by id."""
    ids = sorted(rows)
    get = [rows[i] for i in ids]
    shas = pa.array([r[1] for r in get], pa.string())
    return pa.table([pa.array(ids, pa.int64()), pa.array([r[0] for r in get], pa.string()), shas,
                     pa.array(sha_keys(shas)), pa.array([r[4] or 0 for r in get], pa.int64()),
                     pa.array([PRIVATE * bool(r[2]) | UNSAFE * bool(r[3]) | HASHED * (r[4] is not None) for r in get],
                              pa.uint8())], schema=SCHEMA)


def read_catalog(base: str, name: Optional[str]) -> pa.Table:
    """A version's catalog.parquet in SCHEMA (no rows when it is absent: an index built from
    vectors may have none)."""
    if not name or not storage.exists(storage.join(base, name)):
        return SCHEMA.empty_table()
    return table_from_parquet(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(base, name)))))


def write_catalog(uri: str, table: pa.Table) -> None:
    """Write a SCHEMA table atomically as catalog parquet (flags as booleans, phash null for none)."""
    flags = table.column("flags").to_numpy(zero_copy_only=False)
    out = pa.table({"id": table.column("id"), "uri": table.column("uri"), "sha256": table.column("sha256"),
                    "private": pa.array((flags & PRIVATE) > 0), "unsafe": pa.array((flags & UNSAFE) > 0),
                    "phash": pc.if_else(pa.array((flags & HASHED) > 0), table.column("phash"), pa.scalar(None, pa.int64()))})
    storage.write_parquet_atomic(uri, out)


def write_snapshot(path: str, table: pa.Table) -> None:
    """A shard's snapshot metadata as an uncompressed Arrow IPC file (so it maps), atomically."""
    def write(tmp: str) -> None:
        with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, SCHEMA.with_metadata(_SNAPSHOT_META)) as w:
            w.write_table(table.combine_chunks() if table.num_rows else table, max_chunksize=max(table.num_rows, 1))

    storage.write_file_atomic(path, write)


def open_snapshot(path: str) -> pa.Table:
    """A snapshot written by write_snapshot, memory-mapped: nothing is read until it is used."""
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    if (table.schema.metadata or {}).get(b"hashed_flag") == b"1":
        return table.replace_schema_metadata(None)
    # An older snapshot: every phash but the old marker is a hash (the flags column, one byte a
    # row, is read into memory; the rest stays mapped).
    flags = table.column("flags").to_numpy() | np.where(table.column("phash").to_numpy() != _OLD_NO_HASH, HASHED, 0)
    return table.set_column(table.schema.get_field_index("flags"), "flags", pa.array(flags.astype(np.uint8)))


class Columns:
    """Rows of a SCHEMA table sorted by id, found by binary search over the id column."""

    def __init__(self, table: pa.Table):
        self.table = table.combine_chunks() if table.column("id").num_chunks > 1 else table

        def col(name: str) -> np.ndarray:
            c = self.table.column(name)
            return c.chunk(0).to_numpy(zero_copy_only=True) if c.num_chunks else np.zeros(0, SCHEMA.field(name).type.to_pandas_dtype())

        self.ids, self.sha64, self.phash, self.flags = col("id"), col("sha64"), col("phash"), col("flags")
        self._uri, self._sha = _strings(self.table.column("uri")), _strings(self.table.column("sha256"))

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, id_: int) -> int:
        """Row of an id, or -1."""
        p = int(np.searchsorted(self.ids, id_))
        return p if p < len(self.ids) and self.ids[p] == id_ else -1

    def row(self, p: int) -> list:
        """[uri, sha256, private, unsafe, phash or None] of row p."""
        f = int(self.flags[p])
        return [self._uri(p), self._sha(p), bool(f & PRIVATE), bool(f & UNSAFE), int(self.phash[p]) if f & HASHED else None]

    def uri(self, p: int) -> str:
        return self._uri(p)


def _strings(column: pa.ChunkedArray):
    """p -> the p-th string of a one-chunk string column, read straight from its offsets and data
    buffers (no pyarrow scalar per lookup)."""
    if not column.num_chunks:
        return lambda p: ""
    chunk = column.chunk(0)
    offsets = np.frombuffer(chunk.buffers()[1], np.int32, len(chunk) + 1, chunk.offset * 4)
    data = memoryview(chunk.buffers()[2]) if chunk.buffers()[2] is not None else memoryview(b"")
    return lambda p: bytes(data[offsets[p] : offsets[p + 1]]).decode()

