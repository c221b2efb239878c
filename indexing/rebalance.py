"""Rebalancing: move whole slots (or, under cell placement, whole cells) between shards, copying
codes as they are (no re-embedding).

A Ray Data job with one row per new shard. Every shard is a copy of one trained template, so an IVF code moves by copying its inverted-list
entry (list number, id, code bytes) into the new shard. The new shards, catalog and manifest are
a new version; the old version stays readable until the new manifest is published.
"""
from __future__ import annotations

import logging
import pickle
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from configs.progress import Progress, replace_ray_data_bars
from indexing import storage
from indexing.build import shard_files, versioned
from indexing.catalog import write_catalog
from indexing.cells import CoarseQuantizer, group_cells
from indexing.ids import initial_slot_table, shard_of, slot_of
from indexing.live import LiveShard
from indexing.manifest import Manifest, ReplayFrom, ShardEntry, publish_manifest, read_manifest
from indexing.shards import carries_ids, read_index, write_index

LOG = logging.getLogger(__name__)


def plan_rebalance(slot_counts: np.ndarray, old_table: list[int], num_shards: int, tolerance: float = 0.05) -> list[int]:
    """A slot table over `num_shards` that moves few slots and leaves shard sizes within `tolerance`.

    Slots keep their shard when it survives; slots of removed shards go to the lightest shard,
    biggest first; then slots move from the heaviest to the lightest shard while that narrows the gap.
    """
    counts = np.asarray(slot_counts, dtype=np.int64)
    table = np.array([s if s < num_shards else -1 for s in old_table], dtype=np.int64)
    loads = np.bincount(table[table >= 0], weights=counts[table >= 0], minlength=num_shards).astype(np.int64)
    for s in sorted(np.flatnonzero(table < 0), key=lambda s: -counts[s]):
        j = int(np.argmin(loads))
        table[s], loads[j] = j, loads[j] + counts[s]
    target = counts.sum() / num_shards
    for _ in range(len(table)):
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        if gap <= tolerance * target:
            break
        candidates = np.flatnonzero((table == hi) & (counts > 0) & (counts < gap))
        if not len(candidates):
            break
        best = candidates[np.argmin(np.abs(counts[candidates] - gap / 2))]  # halves the gap
        table[best], loads[hi], loads[lo] = lo, loads[hi] - counts[best], loads[lo] + counts[best]
    return table.tolist()


def plan_cells(centroids: np.ndarray, counts: np.ndarray, old_table: list[int], num_shards: int) -> list[int]:
    """A cell table over `num_shards`: neighbouring cells regrouped (indexing.cells.group_cells),
    each new group numbered after the old shard it shares most vectors with, so fewer codes move."""
    new = np.asarray(group_cells(centroids, counts, num_shards))
    old = np.asarray(old_table)
    overlap = np.zeros((num_shards, num_shards))
    here = old < num_shards
    np.add.at(overlap, (new[here], old[here]), np.asarray(counts)[here] + 1)
    label = np.full(num_shards, -1)
    taken = np.zeros(num_shards, bool)
    for flat in np.argsort(-overlap, axis=None):
        g, s = divmod(int(flat), num_shards)
        if label[g] < 0 and not taken[s] and overlap[g, s] > 0:
            label[g], taken[s] = s, True
    label[label < 0] = np.flatnonzero(~taken)
    return label[new].tolist()


def cell_counts_of(index_dir: str, m: Manifest) -> np.ndarray:
    """Vectors per IVF cell over every shard's current state (snapshot + log)."""
    counts = 0
    for s in range(m.num_shards):
        index = LiveShard(index_dir, m, s).materialize()  # held: the IVF below points into it
        ivf = faiss.extract_index_ivf(index)
        counts = counts + np.array([ivf.invlists.list_size(l) for l in range(ivf.nlist)], np.int64)
    return counts


def ids_in_cells(index: faiss.Index, cells: np.ndarray) -> np.ndarray:
    """Ids of an IVF index stored in the cells where the boolean mask `cells` is set."""
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    parts = [faiss.rev_swig_ptr(inv.get_ids(int(l)), inv.list_size(int(l))).copy()
             for l in np.flatnonzero(cells) if inv.list_size(int(l))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _extract(index: faiss.Index, keep: np.ndarray):
    """Entries of `index` whose id is in `keep`: (list_no, ids, codes) per IVF list, or (ids, vectors)."""
    if carries_ids(index):
        ivf = faiss.extract_index_ivf(index)
        inv = ivf.invlists
        out = []
        for l in range(ivf.nlist):
            n = inv.list_size(l)
            if not n:
                continue
            ids = faiss.rev_swig_ptr(inv.get_ids(l), n).copy()
            mask = np.isin(ids, keep)
            if mask.any():
                codes = faiss.rev_swig_ptr(inv.get_codes(l), n * inv.code_size).copy().reshape(n, inv.code_size)
                out.append((l, ids[mask], np.ascontiguousarray(codes[mask])))
        return out
    sel = keep[np.isin(keep, faiss.vector_to_array(faiss.downcast_index(index).id_map))]
    return [(-1, sel, np.stack([index.reconstruct(int(i)) for i in sel]) if len(sel) else None)]


def fill_rebalanced_shard(index_dir: str, old: dict, template: str, new_table: list[int], shard: int, out_uri: str):
    """Build new shard `shard` from every old shard's current state (snapshot + log). `new_table`
    is the new slot table, or under cell placement the new cell table (whole cells move).

    Returns (count, the metadata rows of the new shard as an Arrow table, the (generation, offset)
    read of each old shard), so that writes the old version takes later can be replayed onto this one."""
    m = Manifest.model_validate(old)
    new = read_index(storage.join(index_dir, template))
    new_ivf = faiss.extract_index_ivf(new) if carries_ids(new) else None
    tables, positions = [], []
    for s in range(m.num_shards):
        live = LiveShard(index_dir, m, s)
        positions.append(live.position)
        index = live.materialize()
        if m.placement == "cells":
            keep = ids_in_cells(index, np.asarray(new_table) == shard)
        else:
            ids = live.ids()
            keep = ids[shard_of(ids, new_table) == shard]
        tables.append(live.table(keep))
        for l, got_ids, payload in _extract(index, keep):
            if l < 0:
                if len(got_ids):
                    new.add_with_ids(payload, got_ids)
            else:
                new_ivf.invlists.add_entries(l, len(got_ids), faiss.swig_ptr(got_ids), faiss.swig_ptr(payload))
                new_ivf.ntotal += len(got_ids)
                if not isinstance(new, faiss.IndexIVF):  # a transform in front counts its vectors too
                    new.ntotal += len(got_ids)
    write_index(new, out_uri)
    return int(new.ntotal), pa.concat_tables(tables), positions


def rebalance(index_dir: str, num_shards: int, tolerance: float = 0.05, task_cpus: float = 0.5) -> Manifest:
    """Redistribute the current version's vectors over `num_shards` shards as a new version.

    The old version keeps taking writes meanwhile; the new manifest's `replay_from` records how far
    each old shard's log was read, so a version switch replays only the writes that came later."""
    import ray

    t0 = time.time()
    m = read_manifest(index_dir)
    if m.placement == "cells":
        counts = cell_counts_of(index_dir, m)
        template_index = read_index(storage.join(index_dir, m.template))
        table = plan_cells(CoarseQuantizer(template_index).centroids, counts, m.cell_table, num_shards)
        placed = dict(cell_table=table, slot_table=initial_slot_table(m.num_slots, num_shards))  # slots unused
    else:
        ids = np.concatenate([LiveShard(index_dir, m, s).ids() for s in range(m.num_shards)])
        counts = np.bincount(slot_of(ids, m.num_slots), minlength=m.num_slots)
        table = plan_rebalance(counts, m.slot_table, num_shards, tolerance)
        placed = dict(slot_table=table)
    version = m.version + 1
    names = shard_files(num_shards, version)
    old = m.model_dump()

    def fill(row: dict) -> dict:
        count, meta, positions = fill_rebalanced_shard(index_dir, old, m.template, table, row["shard"],
                                                       storage.join(index_dir, names[row["shard"]]))
        return {"shard": row["shard"], "count": count, "result": pickle.dumps((count, meta, positions))}

    # One row per new shard; Ray Data schedules the fills on the cluster and retries failed ones.
    ds = ray.data.from_items([{"shard": i} for i in range(num_shards)], override_num_blocks=num_shards) \
        .map(fill, num_cpus=task_cpus)
    rows = []
    replace_ray_data_bars()
    with Progress("rebalancing", int(counts.sum()), "vectors") as progress:
        for row in ds.iter_rows():  # each new shard as it is written
            rows.append(row)
            progress.update(row["count"])
    done = [pickle.loads(r["result"]) for r in sorted(rows, key=lambda r: r["shard"])]
    sizes = [d[0] for d in done]
    catalog = versioned("catalog.parquet", version)
    rows = pa.concat_tables([d[1] for d in done])
    write_catalog(storage.join(index_dir, catalog), rows.take(pc.sort_indices(rows.column("id"))))
    # The earliest position any task read: replaying from there is safe for all of them because
    # upserts, deletes and flag changes give the same state when applied again in order.
    replay = ReplayFrom(version=m.version, positions=[list(min(d[2][s] for d in done)) for s in range(m.num_shards)])
    new = m.model_copy(update=dict(
        version=version, created_at=time.time(), total=int(sum(sizes)), **placed, catalog=catalog,
        shards=[ShardEntry(path=p, count=c) for p, c in zip(names, sizes)], replay_from=replay,
    ))
    new = Manifest.model_validate(new.model_dump())
    publish_manifest(index_dir, new)
    LOG.info("rebalanced %d -> %d shards in %.1f s: sizes %s", m.num_shards, num_shards, time.time() - t0, sizes)
    return new
