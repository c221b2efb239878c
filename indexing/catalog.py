"""catalog.parquet: id -> uri, sha256 (and, after a rebalance, the private/unsafe flags)."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from indexing import storage


class Catalog:
    """An in-memory id -> (uri, sha256) lookup, sorted by id for vectorised search."""

    def __init__(self, ids: np.ndarray, uris: list[str], sha256: list[str], private=None, unsafe=None):
        order = np.argsort(ids)
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.uris = np.asarray(uris, dtype=object)[order]
        self.sha256 = np.asarray(sha256, dtype=object)[order]
        none = np.zeros(len(self.ids), bool)
        self.private = none if private is None else np.asarray(private, bool)[order]
        self.unsafe = none if unsafe is None else np.asarray(unsafe, bool)[order]

    @classmethod
    def load(cls, index_dir: str, name: Optional[str]) -> "Catalog":
        """Read the catalog a manifest names; an index built from vectors has empty uris."""
        if not name or not storage.exists(storage.join(index_dir, name)):
            return cls(np.zeros(0, np.int64), [], [])
        t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(index_dir, name))))
        flags = [t.column(c).to_numpy(zero_copy_only=False) if c in t.column_names else None for c in ("private", "unsafe")]
        return cls(t.column("id").to_numpy(), t.column("uri").to_pylist(), t.column("sha256").to_pylist(), *flags)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: np.ndarray) -> tuple[list[str], list[str]]:
        """(uris, sha256s) of ids; unknown ids get empty strings."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return [""] * len(ids), [""] * len(ids)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        found = self.ids[pos] == ids
        uris = np.where(found, self.uris[pos], "")
        shas = np.where(found, self.sha256[pos], "")
        return uris.tolist(), shas.tolist()
