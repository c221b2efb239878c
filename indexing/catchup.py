"""Catch-up: carry writes the old version took during a rebalance over to the new version.

A rebalance reads every old shard's snapshot + log up to a position it records in the new manifest
(`replay_from`). Writes acknowledged by the old version after that are read back from the old logs
and appended, routed by the new slot table, to the new shards' logs, whose replicas apply them
before their next search. Run it while writes are paused, right before the switch.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from indexing import storage
from indexing.ids import shard_of
from indexing.cells import CellRouting
from indexing.live import append_records, read_records_since
from indexing.manifest import Manifest, read_manifest
from indexing.shards import read_index, shard_ids
from indexing.wal import Record


def _by_cells(index_dir: str, manifest: Manifest):
    """Record -> [(new shard, record)] under cell placement: an upsert goes to its vector's cell
    (and deletes the copy it replaces on another shard); a delete or flag change goes to the
    shard that holds the id now, known from the new shard files and the upserts replayed."""
    cells = CellRouting.open(index_dir, manifest.template, manifest.cell_table, manifest.nprobe)
    holder = {int(i): n for n, e in enumerate(manifest.shards)
              for i in shard_ids(read_index(storage.join(index_dir, e.path)))}

    def place(rec: Record) -> list:
        was = holder.get(int(rec.id))
        if rec.op != "upsert":
            if rec.op == "delete":
                holder.pop(int(rec.id), None)
            return [] if was is None else [(was, rec)]
        n = holder[int(rec.id)] = cells.shard_of_vector(np.asarray(rec.vector, np.float32))
        return [(n, rec)] + ([(was, Record("delete", rec.id))] if was not in (None, n) else [])

    return place


def catch_up(index_dir: str, manifest: Manifest) -> int:
    """Seal the source version's shards and replay onto `manifest`'s shards the writes they logged
    since the rebalance; returns how many records were carried. Sealing happens under each old
    shard's lock as its records are read, so a write that reaches an old shard afterwards (a lagging
    Ingress replica) is refused rather than acknowledged and lost. Safe to repeat."""
    r = manifest.replay_from
    if r is None or not storage.is_local(index_dir):
        return 0  # a fresh build, or an object-store index (served read-only: no writes to carry)
    old = read_manifest(index_dir, r.version)
    per_shard = defaultdict(list)
    place = _by_cells(index_dir, manifest) if manifest.placement == "cells" else \
        (lambda rec: [(int(shard_of([rec.id], manifest.slot_table)[0]), rec)])
    # Each id lives in exactly one old shard, so per-id order is the order of that shard's log.
    for s, (generation, offset) in enumerate(r.positions):
        for rec in read_records_since(index_dir, old, s, (generation, offset), seal=True):
            for n, out in place(rec):
                per_shard[n].append(out)
    for n, records in per_shard.items():
        append_records(index_dir, manifest, n, records)
    return sum(len(v) for v in per_shard.values())
