"""Ids and placement: id = hash(relative path) (or of the bytes, for uploads with no path), slot = mix64(id) % S, shard = slot_table[slot].

Build, online writes and rebalancing all place an id through `shard_of`, so they agree.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

from indexing.storage import relative_to

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def id_from_path(rel_path: str) -> int:
    """Stable positive int64 id of an image from its path relative to the corpus root.

    blake2b of the POSIX path, top bit cleared so the id is never negative (FAISS pads with -1).
    """
    digest = hashlib.blake2b(rel_path.replace("\\", "/").encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def id_from_bytes(data: bytes) -> int:
    """Stable positive int64 id of an image from its bytes (SHA-256), for uploads with no path
    under the indexed folders: sending the same file twice names the same image."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def derived_id(uri: str, data: bytes, sources: list[str]) -> tuple[int, str]:
    """The id an image added without one gets (POST /images, `indexing ingest`), and which kind:
    ("path") the build's id of its path when `uri` lies under a folder the index was built from,
    so an indexed file is recognised, not duplicated; else ("content") a hash of its bytes, so a
    retried upload, or the same photo from another folder, names the same image."""
    rel = relative_to(uri, sources) if uri else None
    if rel not in (None, "."):
        return id_from_path(rel), "path"
    return id_from_bytes(data), "content"


def mix64(ids: np.ndarray | Iterable[int]) -> np.ndarray:
    """splitmix64 finaliser: scrambles ids so that sequential client ids spread evenly over slots."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def slot_of(ids, num_slots: int) -> np.ndarray:
    """Slot of each id: mix64(id) % S."""
    return (mix64(ids) % np.uint64(num_slots)).astype(np.int64)


def initial_slot_table(num_slots: int, num_shards: int) -> list[int]:
    """Slots dealt round-robin over shards, so each shard gets S/N slots (within one)."""
    if num_shards > num_slots:
        raise ValueError(f"shards ({num_shards}) must not exceed slots ({num_slots})")
    return [s % num_shards for s in range(num_slots)]


def shard_of(ids, slot_table) -> np.ndarray:
    """Shard of each id under a manifest's slot table."""
    table = np.asarray(slot_table, dtype=np.int64)
    return table[slot_of(ids, len(table))]
