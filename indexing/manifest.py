"""manifest.json: the single source of truth for a served index.

Each version is written as `manifests/v000001.json`; `manifest.json` is then replaced atomically
with the same content, which is the pointer switch. Readers that opened an older version keep
working because shard files of a version are never overwritten.
"""
from __future__ import annotations

import json
import time
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from indexing import storage

MANIFEST = "manifest.json"


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="shard file, relative to the index directory")
    count: NonNegativeInt


class ReplayFrom(BaseModel):
    """Where a rebalance read the version it copied: writes after these positions must be replayed."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, description="the version the rebalance read")
    positions: list[list[int]] = Field(description="per old shard: [log generation, byte offset]")


class Manifest(BaseModel):
    """Everything a reader needs to open and search the index."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    created_at: float = Field(default_factory=time.time)
    dim: int = Field(gt=0)
    metric: str
    factory: str
    nprobe: int = Field(gt=0)
    total: NonNegativeInt
    template: str = Field(description="trained empty index every shard copies")
    num_slots: int = Field(gt=0)
    slot_table: list[int] = Field(description="slot -> shard")
    shards: list[ShardEntry]
    placement: Literal["hash", "cells"] = Field(
        "hash", description="hash: ids go to shards through the slot table; cells: vectors through the cell table")
    cell_table: Optional[list[int]] = Field(None, description="IVF cell -> shard, with placement 'cells'")
    catalog: Optional[str] = "catalog.parquet"
    embeddings: Optional[str] = "embeddings"
    model: Optional[dict] = Field(None, description="the ModelConfig that produced the vectors")
    sources: list[str] = Field(default_factory=list, description="the image folders or URI prefixes the build read")
    replay_from: Optional[ReplayFrom] = Field(None, description="set by a rebalance; see indexing.catchup")

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.slot_table) != self.num_slots:
            raise ValueError(f"slot_table has {len(self.slot_table)} entries, num_slots is {self.num_slots}")
        bad = [s for s in set(self.slot_table) if not 0 <= s < len(self.shards)]
        if bad:
            raise ValueError(f"slot_table names shards {sorted(bad)} but there are {len(self.shards)} shards")
        if (self.placement == "cells") != (self.cell_table is not None):
            raise ValueError("placement 'cells' needs a cell_table, and only it has one")
        bad = [s for s in set(self.cell_table or []) if not 0 <= s < len(self.shards)]
        if bad:
            raise ValueError(f"cell_table names shards {sorted(bad)} but there are {len(self.shards)} shards")
        if sum(s.count for s in self.shards) != self.total:
            raise ValueError(f"shard counts sum to {sum(s.count for s in self.shards)}, total is {self.total}")
        return self

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def version_path(version: int) -> str:
    """Where a manifest version lives, relative to the index directory."""
    return f"manifests/v{version:06d}.json"


def read_manifest(index_dir: str, version: Optional[int] = None) -> Manifest:
    """The current manifest (or a given version) of an index directory."""
    rel = MANIFEST if version is None else version_path(version)
    uri = storage.join(index_dir, rel)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no index at {index_dir}: {rel} is missing")
    return Manifest.model_validate_json(storage.read_bytes(uri))


def next_version(index_dir: str) -> int:
    """1 for a new directory, else the current version + 1."""
    if not storage.exists(storage.join(index_dir, MANIFEST)):
        return 1
    return read_manifest(index_dir).version + 1


def publish_manifest(index_dir: str, manifest: Manifest) -> None:
    """Write the version file, then switch `manifest.json` to it atomically."""
    data = json.dumps(manifest.model_dump(), indent=1).encode()
    storage.write_bytes_atomic(storage.join(index_dir, version_path(manifest.version)), data)
    storage.write_bytes_atomic(storage.join(index_dir, MANIFEST), data)
