"""Per-id metadata tables: id -> uri, sha256, private, unsafe, phash (perceptual hash).

The same parquet layout serves a version's `catalog.parquet` (a build writes it without flags; a
rebalance writes it with them) and a live shard's snapshot metadata."""
from __future__ import annotations

import io
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from indexing import storage


def read_meta(base: str, name: Optional[str]) -> dict[int, list]:
    """id -> [uri, sha256, private, unsafe, phash] from `base/name`; missing flag columns read as
    False and a missing phash (vectors without images, older builds) as None; a missing file as
    no rows (an index built from vectors may have none)."""
    if not name or not storage.exists(storage.join(base, name)):
        return {}
    t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(base, name)))).to_pydict()
    no, unknown = [False] * len(t["id"]), [None] * len(t["id"])
    return {int(i): [u, h, bool(p), bool(x), ph] for i, u, h, p, x, ph in
            zip(t["id"], t["uri"], t["sha256"], t.get("private", no), t.get("unsafe", no), t.get("phash", unknown))}


def write_meta(uri: str, meta: dict[int, list]) -> None:
    """Write `meta` (as read_meta returns it) atomically as parquet, sorted by id."""
    ids = sorted(meta)
    cols = list(zip(*(meta[i] for i in ids))) if ids else [[], [], [], [], []]
    table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(cols[0], pa.string()),
                      "sha256": pa.array(cols[1], pa.string()), "private": pa.array(cols[2], pa.bool_()),
                      "unsafe": pa.array(cols[3], pa.bool_()), "phash": pa.array(cols[4], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())
