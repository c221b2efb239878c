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
from indexing.cells import CellRouting
from indexing.ids import shard_of
from indexing.live import LiveShard, append_records, read_records_since, unseal
from indexing.manifest import Manifest, read_manifest
from indexing.shards import read_index, shard_ids
from indexing.wal import Record


def _cells_catch_up(index_dir: str, old: Manifest, manifest: Manifest, logged: list[list[Record]]) -> dict:
    """new shard -> records, under cell placement. An id can move between shards (its new pixels
    fall in another shard's cell: an upsert on one, a delete on the other), so its records are
    spread over several old logs whose relative order is not known. The old version's final state
    settles it: for each id the logs touched, the old shard holding it now (sealed, so final) is
    the one whose records count, replayed in that log's order and routed by the new cell table;
    an id no old shard holds is deleted from the new version."""
    cells = CellRouting.open(index_dir, manifest.template, manifest.cell_table, manifest.nprobe)
    holder = {int(i): n for n, e in enumerate(manifest.shards)
              for i in shard_ids(read_index(storage.join(index_dir, e.path)))}
    # One pass over the logs, grouped by id (each old log's order kept): writes stay paused while
    # this runs, and rescanning every log for each id was quadratic in the writes carried.
    by_id: dict[int, dict[int, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for s, records in enumerate(logged):
        for r in records:
            by_id[int(r.id)][s].append(r)
    held = {s: set(LiveShard(index_dir, old, s).ids().tolist()) & by_id.keys() for s in range(old.num_shards)}
    out = defaultdict(list)
    for id_, per_log in by_id.items():
        owners = [s for s in range(old.num_shards) if id_ in held[s]]
        if not owners:
            if id_ in holder:
                out[holder.pop(id_)].append(Record("delete", id_))
            continue
        for rec in (r for s in owners for r in per_log[s]):
            was = holder.get(id_)
            if rec.op == "upsert":
                n = holder[id_] = cells.shard_of_vector(np.asarray(rec.vector, np.float32))
                out[n].append(rec)
                if was not in (None, n):
                    out[was].append(Record("delete", id_))
            elif rec.op == "delete":
                if was is not None:
                    out[holder.pop(id_)].append(rec)
            elif was is not None:
                out[was].append(rec)
    return out


def catch_up(index_dir: str, manifest: Manifest) -> int:
    """Seal the source version's shards and replay onto `manifest`'s shards the writes they logged
    since the rebalance; returns how many records were carried. Sealing happens under each old
    shard's lock as its records are read, so a write that reaches an old shard afterwards (a lagging
    Ingress replica) is refused rather than acknowledged and lost. Safe to repeat. When a shard's
    records can no longer be read, the shards it sealed are unsealed and the error raised: the
    switch is off and the old version takes writes again."""
    r = manifest.replay_from
    if r is None or not storage.is_local(index_dir):
        return 0  # a fresh build, or an object-store index (served read-only: no writes to carry)
    old = read_manifest(index_dir, r.version)
    logged = []
    try:
        for s, (generation, offset) in enumerate(r.positions):
            logged.append(read_records_since(index_dir, old, s, (generation, offset), seal=True))
    except BaseException:
        for s in range(len(logged)):  # the old version takes writes again: the switch is off
            unseal(index_dir, old, s)
        raise
    if manifest.placement == "cells":
        per_shard = _cells_catch_up(index_dir, old, manifest, logged)
    else:
        per_shard = defaultdict(list)
        # Each id lives in exactly one old shard, so per-id order is the order of that shard's log.
        for records in logged:
            for rec in records:
                per_shard[int(shard_of([rec.id], manifest.slot_table)[0])].append(rec)
    for n, records in per_shard.items():
        append_records(index_dir, manifest, n, records)
    return sum(len(v) for v in per_shard.values())
