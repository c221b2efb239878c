"""Per-id metadata tables: id -> uri, sha256, private, unsafe.

The same parquet layout serves a version's `catalog.parquet` (a build writes it without flags; a
rebalance writes it with them) and a live shard's snapshot metadata."""
from __future__ import annotations

import io
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from indexing import storage


def read_meta(base: str, name: Optional[str]) -> dict[int, list]:
    """id -> [uri, sha256, private, unsafe] from `base/name`; missing flag columns read as False,
    a missing file as no rows (an index built from vectors may have none)."""
    if not name or not storage.exists(storage.join(base, name)):
        return {}
    t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(base, name)))).to_pydict()
    none = [False] * len(t["id"])
    return {int(i): [u, h, bool(p), bool(x)] for i, u, h, p, x in
            zip(t["id"], t["uri"], t["sha256"], t.get("private", none), t.get("unsafe", none))}


def write_meta(uri: str, meta: dict[int, list]) -> None:
    """Write `meta` (as read_meta returns it) atomically as parquet, sorted by id."""
    ids = sorted(meta)
    cols = list(zip(*(meta[i] for i in ids))) if ids else [[], [], [], []]
    table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(cols[0], pa.string()),
                      "sha256": pa.array(cols[1], pa.string()), "private": pa.array(cols[2], pa.bool_()),
                      "unsafe": pa.array(cols[3], pa.bool_())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())
