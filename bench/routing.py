"""`python -m bench routing`: how many shards a query visits, hash placement vs cell placement.

For each vector set and shard count the same IVF index (one template) is trained; recall@10 is
measured against exact search for a range of nprobe (it is the same under both placements: a cell
placement only skips shards that own none of the query's cells, see indexing/cells.py), and at
the smallest nprobe reaching recall@10 >= 0.95 the run reports, per placement: shards touched per
query (mean, p99), and vectors and queries per shard (max / mean). Shards are simulated: the
placement decides who would be asked, so 384 shards need no 384 processes.
"""
from __future__ import annotations

import logging
import math
import os
import time

import faiss
import numpy as np

from bench.common import machine, markdown_table, write_results
from bench.vectors import VectorSet, recall_at_k
from indexing.cells import CoarseQuantizer, group_cells, shards_touched
from indexing.ids import initial_slot_table, shard_of
from indexing.template import MIN_POINTS_PER_CELL, choose_nlist

LOG = logging.getLogger(__name__)

SHARDS = (8, 64, 384)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TARGET_RECALL = 0.95
CELLS_PER_SHARD = 16  # a shard is a group of cells: with fewer, one big cell unbalances it
SERVED_COLUMNS = ["dataset", "shards", "nlist", "nprobe", "placement", "served_recall@10", "concurrency", "requests",
                  "errors", "p50_ms", "p99_ms", "qps"]
SLOTS = 4096          # the default placement slots (configs/default.yaml index.slots)
COLUMNS = ["dataset", "vectors", "shards", "nlist", "nprobe", "recall@10", "placement", "touched_mean",
           "touched_p99", "touched_share", "vectors_max_over_mean", "queries_max_over_mean"]


def nlist_for(n: int, shards: int) -> int:
    """The build's choice of cells (~4 sqrt(n)), raised to CELLS_PER_SHARD per shard, but at
    least 2 vectors per cell (a small set at many shards gets fewer cells per shard: see its row)."""
    want = max(choose_nlist(n, n * MIN_POINTS_PER_CELL), CELLS_PER_SHARD * shards)
    return min(2 ** math.ceil(math.log2(want)), 2 ** int(math.log2(n // 2)))


def ivf(vs: VectorSet, nlist: int, seed: int = 0) -> faiss.IndexIVFFlat:
    """IVF-Flat over the base vectors, trained on up to MIN_POINTS_PER_CELL points per cell."""
    rng = np.random.default_rng(seed)
    train = vs.base[rng.choice(len(vs.base), min(len(vs.base), nlist * MIN_POINTS_PER_CELL), replace=False)]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vs.dim), vs.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # a small real set gets few points per cell; say so, do not fail
    index.train(train)
    index.add(vs.base)
    return index


def measure(vs: VectorSet, shards: int, index: faiss.IndexIVFFlat) -> list[dict]:
    """Hash and cell rows for one vector set at one shard count, on its trained IVF index."""
    nlist, t0 = index.nlist, time.time()
    quantizer = CoarseQuantizer(index)
    recalls = {}
    for nprobe in NPROBES:
        index.nprobe = nprobe
        recalls[nprobe] = recall_at_k(index.search(vs.queries, 10)[1], vs.truth, 10)
        if recalls[nprobe] >= TARGET_RECALL:
            break
    nprobe = list(recalls)[-1]  # the first to reach the target, else the largest tried
    counts = np.bincount(quantizer.cells(vs.base, 1)[:, 0], minlength=nlist)
    table = np.asarray(group_cells(quantizer.centroids, counts, shards))
    cells = quantizer.cells(vs.queries, nprobe)
    touched = shards_touched(cells, table)
    queries_per_shard = np.zeros(shards)
    for owners in table[cells]:
        queries_per_shard[np.unique(owners)] += 1
    vectors_per_shard = np.bincount(table, weights=counts, minlength=shards)
    hash_vectors = np.bincount(shard_of(np.arange(1, len(vs.base) + 1), initial_slot_table(SLOTS, shards)),
                               minlength=shards)
    common = {"dataset": vs.name, "vectors": len(vs.base), "shards": shards, "nlist": nlist, "nprobe": nprobe,
              "recall@10": recalls[nprobe], "recall_by_nprobe": {str(p): r for p, r in recalls.items()}}
    LOG.info("%s, %d shards: nlist %d, nprobe %d, recall %.3f (%.0f s)", vs.name, shards, nlist, nprobe,
             recalls[nprobe], time.time() - t0)
    return [
        {**common, "placement": "hash", "touched_mean": float(shards), "touched_p99": float(shards),
         "touched_share": 1.0, "vectors_max_over_mean": float(hash_vectors.max() / hash_vectors.mean()),
         "queries_max_over_mean": 1.0},
        {**common, "placement": "cells", "touched_mean": float(touched.mean()),
         "touched_p99": float(np.percentile(touched, 99)), "touched_share": float(touched.mean() / shards),
         "vectors_max_over_mean": float(vectors_per_shard.max() / vectors_per_shard.mean()),
         "queries_max_over_mean": float(queries_per_shard.max() / queries_per_shard.mean())},
    ]


def run_routing(sets: list[VectorSet], shards=SHARDS) -> dict:
    """Every vector set at every shard count; the payload written as routing.json."""
    rows = []
    for vs in sets:
        indexes = {}  # one index per cell count: shard counts that share it share its training
        for n in shards:
            nlist = nlist_for(len(vs.base), n)
            if nlist not in indexes:
                indexes[nlist] = ivf(vs, nlist)
            rows += measure(vs, n, indexes[nlist])
    return {"machine": machine(), "target_recall": TARGET_RECALL, "rows": rows}


def served(vs: VectorSet, work: str, port: int, shards: int = 8, requests: int = 400) -> list[dict]:
    """Both placements built from the same vectors (IVF-SQ8, the service's default codec) and
    served over HTTP in turn: recall@10 of the served answers, and p50/p99 and QPS of one-vector
    queries at concurrency 1 and 16 (closed loop)."""
    import httpx

    from bench.__main__ import Service
    from bench.common import run_load
    from configs.schema import load_config
    from indexing.build import build_from_vectors

    nlist = nlist_for(len(vs.base), shards)
    index = ivf(vs, nlist)
    nprobe = next((p for p in NPROBES if _recall(index, vs, p) >= TARGET_RECALL), NPROBES[-1])
    svc, rows = Service(port), []
    for placement in ("hash", "cells"):
        d = os.path.join(work, f"served-{placement}-{len(vs.base)}-{shards}")
        if not os.path.exists(os.path.join(d, "manifest.json")):
            cfg = load_config(None, {"index": {"placement": placement, "nprobe": nprobe}})
            build_from_vectors(vs.base, None, d, cfg, shards, f"IVF{nlist},SQ8")
        url = svc.serve(d)
        client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64))
        found = []
        for s in range(0, len(vs.queries), 32):  # within the service's vectors-per-request limit
            r = client.post("/search/vector", json={"vectors": vs.queries[s : s + 32].tolist(), "k": 10,
                                                    "dedupe": False})
            r.raise_for_status()
            found += [[h["id"] for h in row] + [-1] * (10 - len(row)) for row in r.json()["results"]]
        bodies = [orjson_vector(q) for q in vs.queries]

        def ask(i: int) -> bool:
            return client.post("/search/vector", content=bodies[i % len(bodies)],
                               headers={"content-type": "application/json"}).status_code == 200

        for concurrency in (1, 16):
            load = run_load(ask, concurrency, requests)
            rows.append({"dataset": vs.name, "shards": shards, "nlist": nlist, "nprobe": nprobe,
                         "placement": placement, "served_recall@10": recall_at_k(np.array(found), vs.truth, 10), **load})
            LOG.info("served %s, %d shards, concurrency %d: %.0f QPS, p50 %.1f ms", placement, shards,
                     concurrency, load["qps"], load["p50_ms"])
    return rows


def _recall(index: faiss.IndexIVFFlat, vs: VectorSet, nprobe: int) -> float:
    index.nprobe = nprobe
    return recall_at_k(index.search(vs.queries, 10)[1], vs.truth, 10)


def orjson_vector(q: np.ndarray) -> bytes:
    """A one-vector request body, encoded once (a cheap client)."""
    import orjson

    return orjson.dumps({"vector": q.tolist(), "k": 10, "dedupe": False})


def markdown(report: dict) -> str:
    """The table of a run, with the machine on top."""
    m = report["machine"]
    text = (f"Machine: {m['cpus']} CPUs, {m['platform']}; run {m['when']}. nprobe: the smallest reaching "
            f"recall@10 >= {report['target_recall']} (the same under both placements).\n\n"
            + markdown_table(report["rows"], COLUMNS))
    if report.get("served"):
        text += ("\n\nServed over HTTP on this machine (all shards on one host; IVF-SQ8; one vector per request):\n\n"
                 + markdown_table(report["served"], SERVED_COLUMNS))
    return text


def plot(report: dict, out: str) -> None:
    """routing.png: shards touched per query (share of all shards) for each placement and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({r["dataset"] for r in report["rows"]}):
        for placement, style in (("hash", "--"), ("cells", "-")):
            rows = [r for r in report["rows"] if r["dataset"] == name and r["placement"] == placement]
            ax.plot([r["shards"] for r in rows], [100 * r["touched_share"] for r in rows], style, marker="o",
                    label=f"{name}, {placement}")
    ax.axhline(10, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="shards", ylabel="% of shards a query visits",
           title=f"Shards touched at recall@10 >= {report['target_recall']}")
    ax.set_xticks(SHARDS, [str(s) for s in SHARDS])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "routing.png"), dpi=120)


def write_report(report: dict, out: str) -> None:
    """routing.json, routing.md and routing.png under out."""
    write_results(out, "routing", report, markdown(report))
    plot(report, out)
