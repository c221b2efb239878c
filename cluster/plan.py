"""Capacity plan for a corpus: shards, memory, nodes and GPUs.

Formulas (all sizes in bytes, GiB = 2**30):
  bytes_per_vector   = measured resident bytes per vector of a shard replica (`--measured`: the
                       JSON `python -m bench memory` writes), else code_bytes + id_bytes + ivf_overhead_bytes
  index_bytes        = images * bytes_per_vector                      (one copy)
  shards             = ceil(index_bytes / (max_shard_gib * GiB))
  vectors_per_shard  = ceil(images / shards);  shard_bytes = vectors_per_shard * bytes_per_vector
  share              = 1 under hash placement (every query visits every shard);
                       under cell placement min(1, touched_shards / shards): a query visits the owners
                       of its nprobe nearest cells, a count that does not grow with the shard count
                       (measured: `python -m bench routing`, touched_mean)
  replicas           = max(replication, ceil(target_qps * share / shard_replica_qps))
  hot_replicas       = max(replication, ceil(target_qps * share * hot_queries_factor / shard_replica_qps))
                       (cells only: the busiest shard sees hot_queries_factor x the mean queries)
  searches_per_query = ceil(shards * share)
  memory_bytes       = index_bytes * replicas
  shards_per_node    = floor(node_memory_gib * GiB * memory_headroom / shard_bytes)
  shard_nodes        = ceil(shards * replicas / shards_per_node)
  serving_gpus       = ceil(target_qps / gpu_images_per_s)           (one embedding per query)
  reindex_gpus       = ceil(images / (gpu_images_per_s * reindex_hours * 3600))
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

GIB = 2**30


class PlanInput(BaseModel):
    images: PositiveInt = Field(description="vectors to serve")
    dim: PositiveInt = Field(1280, description="embedding dimension")
    code_bytes: PositiveInt | None = Field(None, description="bytes per code; default dim (SQ8)")
    id_bytes: PositiveInt = Field(8, description="int64 id stored with each code")
    ivf_overhead_bytes: float = Field(0.0, ge=0, description="per-vector overhead of the index structures")
    replication: PositiveInt = Field(2, description="copies of every shard, for availability")
    node_memory_gib: PositiveFloat = Field(512, description="memory of one shard node")
    memory_headroom: float = Field(0.75, gt=0, le=1, description="fraction of node memory shards may use")
    max_shard_gib: PositiveFloat = Field(64, description="largest shard (bounds load and rebalance time)")
    target_qps: PositiveFloat = Field(1000, description="queries per second to sustain")
    shard_replica_qps: PositiveFloat = Field(500, description="queries per second one shard replica answers")
    gpu_images_per_s: PositiveFloat = Field(2000, description="embedding throughput of one GPU")
    reindex_hours: PositiveFloat = Field(72, description="wall-clock budget for a full re-embed")
    measured_bytes_per_vector: PositiveFloat | None = Field(
        None, description="resident bytes per vector measured in a replica; replaces code + id + overhead")
    factory: str = Field("", description="the factory the bytes per vector belong to (reported)")
    placement: Literal["hash", "cells"] = Field("hash", description="hash: every query visits every shard; "
                                                "cells: only the shards owning its nearest cells")
    touched_shards: PositiveFloat = Field(16, description="cells: shards a query visits, at most nprobe "
                                          "(bench routing's touched_mean)")
    hot_queries_factor: float = Field(1.5, ge=1, description="cells: queries of the busiest shard over the mean "
                                      "(bench routing's queries_max_over_mean)")


def measured(path: str, factory: str | None = None) -> tuple[float, str]:
    """(resident bytes per vector after a full scan, factory) from `python -m bench memory` JSON:
    the slope of the current implementation for `factory` (default: the most compact measured)."""
    import json

    with open(path) as f:
        rows = json.load(f)
    rows = rows.get("memory", rows) if isinstance(rows, dict) else rows
    slopes = [r for r in rows if r.get("impl") == "mapped" and "scanned_bytes_per_vector" in r
              and (factory is None or r["factory"] == factory)]
    if not slopes:
        raise ValueError(f"{path} has no measured slope{f' for factory {factory}' if factory else ''}: "
                         "run `python -m bench memory` first")
    best = min(slopes, key=lambda r: r["scanned_bytes_per_vector"])
    return float(best["scanned_bytes_per_vector"]), best["factory"]


def routed(path: str) -> dict:
    """touched_shards and hot_queries_factor from `python -m bench routing` JSON: the cell-placement
    row of the largest vector set at the most shards measured (the closest to a large corpus)."""
    import json

    with open(path) as f:
        rows = [r for r in json.load(f).get("rows", []) if r.get("placement") == "cells"]
    if not rows:
        raise ValueError(f"{path} has no cell-placement rows: run `python -m bench routing` first")
    best = max(rows, key=lambda r: (r["vectors"], r["shards"]))
    return {"placement": "cells", "touched_shards": best["touched_mean"],
            "hot_queries_factor": max(1.0, best["queries_max_over_mean"])}


def make_plan(p: PlanInput) -> dict:
    """Apply the module formulas; returns every intermediate quantity."""
    bpv = p.measured_bytes_per_vector or (p.code_bytes or p.dim) + p.id_bytes + p.ivf_overhead_bytes
    index_bytes = p.images * bpv
    shards = max(1, math.ceil(index_bytes / (p.max_shard_gib * GIB)))
    vps = math.ceil(p.images / shards)
    shard_bytes = vps * bpv
    share = min(1.0, p.touched_shards / shards) if p.placement == "cells" else 1.0
    replicas = max(p.replication, math.ceil(p.target_qps * share / p.shard_replica_qps))
    hot = p.hot_queries_factor if p.placement == "cells" else 1.0
    hot_replicas = max(p.replication, math.ceil(p.target_qps * share * hot / p.shard_replica_qps))
    per_node = math.floor(p.node_memory_gib * GIB * p.memory_headroom / shard_bytes)
    if per_node < 1:
        raise ValueError(f"a {shard_bytes / GIB:.1f} GiB shard does not fit a node's usable "
                         f"{p.node_memory_gib * p.memory_headroom:.1f} GiB: lower max_shard_gib")
    return {
        "bytes_per_vector": bpv,
        "index_bytes": index_bytes,
        "shards": shards,
        "vectors_per_shard": vps,
        "shard_bytes": shard_bytes,
        "replicas_per_shard": replicas,
        "hot_shard_replicas": hot_replicas,
        "queries_per_s_per_shard": p.target_qps * share,
        "shard_searches_per_query": math.ceil(shards * share),
        "memory_bytes": index_bytes * replicas,
        "shards_per_node": per_node,
        "shard_nodes": math.ceil(shards * replicas / per_node),
        "serving_gpus": math.ceil(p.target_qps / p.gpu_images_per_s),
        "reindex_gpus": math.ceil(p.images / (p.gpu_images_per_s * p.reindex_hours * 3600)),
    }


def format_plan(p: PlanInput, plan: dict) -> str:
    """Human-readable plan."""
    tib = 2**40
    return "\n".join([
        f"corpus            {p.images:,} images, dim {p.dim}, {plan['bytes_per_vector']:.0f} B/vector "
        + (f"(measured, {p.factory or 'factory not named'})" if p.measured_bytes_per_vector else "(code + id + overhead)"),
        f"index (1 copy)    {plan['index_bytes'] / tib:,.2f} TiB",
        f"shards            {plan['shards']:,} x {plan['vectors_per_shard']:,} vectors "
        f"({plan['shard_bytes'] / GIB:,.1f} GiB each)",
        f"replicas/shard    {plan['replicas_per_shard']} (replication {p.replication}, "
        f"{plan['queries_per_s_per_shard']:,.1f} QPS per shard / {p.shard_replica_qps:,.0f} per replica)",
        f"per query         {plan['shard_searches_per_query']:,} of {plan['shards']:,} shards searched ("
        + (f"cell placement, {p.touched_shards:g} on average)" if p.placement == "cells" else "hash placement: all)"),
        *([f"hot shards        the busiest sees {p.hot_queries_factor:.2f}x the mean queries: "
           f"{plan['hot_shard_replicas']} replicas for it; or split its cells over more shards "
           "(python -m indexing rebalance regroups whole cells)"] if p.placement == "cells" else []),
        f"memory, all       {plan['memory_bytes'] / tib:,.2f} TiB"
        + (" (every shard at the mean replica count)" if p.placement == "cells" else ""),
        f"shard nodes       {plan['shard_nodes']:,} ({plan['shards_per_node']} shards per "
        f"{p.node_memory_gib:,.0f} GiB node at {p.memory_headroom:.0%})",
        f"serving GPUs      {plan['serving_gpus']:,} (at {p.gpu_images_per_s:,.0f} images/s per GPU)",
        f"re-index GPUs     {plan['reindex_gpus']:,} (full re-embed in {p.reindex_hours:g} h)",
    ])
