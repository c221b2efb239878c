"""Memory and start-up of a shard replica: resident bytes per vector against the code size the
factory implies, and how long a replica takes to become ready.

A replica holds an `indexing.live.LiveShard`. Each measurement loads shard 0 in a fresh process
and reports the growth of its resident set right after loading and after a search that visits
every IVF cell (every code page touched), split as Linux counts it: private memory (RssAnon: the
replica's own) and mapped file pages (RssFile: the page cache, shared by every replica on the
node and reclaimable). The per-vector cost is the slope between two sizes (fixed costs such as
the coarse quantizer and allocator pools cancel out). The catalog gets
realistic uris and sha256 digests, so the numbers include what a served image carries.

`baseline_tree` names a checkout of an earlier revision (e.g. `git worktree add /tmp/old REV`):
the same probe then runs with that tree's `indexing` package on the same index directories, so
both implementations are measured in one run on one machine."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Optional

import numpy as np

LOG = logging.getLogger(__name__)

_PROBE = """
import json, sys, time
from indexing.live import LiveShard
from indexing.manifest import read_manifest
import faiss, numpy as np, pyarrow.parquet  # imported before the baseline: their cost is not per vector

def rss():
    kb = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile"))}
    return kb["RssAnon"] * 1024, kb["RssFile"] * 1024

m = read_manifest(sys.argv[1])
before, t0 = rss(), time.perf_counter()
shard = LiveShard(sys.argv[1], m, 0)
ready = time.perf_counter() - t0
loaded = rss()
q = np.random.default_rng(0).normal(size=(4, m.dim)).astype("float32")
shard.search(q, 10, 1 << 20)  # nprobe past nlist: every cell, every code page
scanned = rss()
print(json.dumps({"vectors": shard.ntotal, "ready_s": ready,
                  "load_anon": loaded[0] - before[0], "load_file": loaded[1] - before[1],
                  "scanned_anon": scanned[0] - before[0], "scanned_file": scanned[1] - before[1]}))
"""


def load_cost(index_dir: str, tree: Optional[str] = None) -> dict:
    """Ready time and resident growth of a fresh process loading shard 0 of `index_dir`, with the
    code of `tree` (default: this checkout)."""
    cwd = tree or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", _PROBE, os.path.abspath(index_dir)], capture_output=True, text=True,
                       check=True, cwd=cwd)
    return json.loads(p.stdout.strip().splitlines()[-1])


def add_catalog_rows(index_dir: str, seed: int = 0) -> None:
    """Give every vector of a vectors-only build the uri, sha256 and perceptual hash an image has."""
    import pyarrow as pa

    from indexing import storage
    from indexing.build import read_embeddings
    from indexing.catalog import HASHED, SCHEMA, sha_keys, write_catalog
    from indexing.manifest import read_manifest

    m = read_manifest(index_dir)
    ids = np.sort(read_embeddings(storage.join(index_dir, m.embeddings), columns=["id"]).column("id").to_numpy())
    rng = np.random.default_rng(seed)
    digests = rng.integers(0, 256, size=(len(ids), 32), dtype=np.uint8)
    shas = pa.array([d.tobytes().hex() for d in digests])
    uris = pa.array([f"s3://photos-bucket/2026/11/{i % 1000:03d}/IMG_{i:012d}.jpg" for i in ids.tolist()])
    table = pa.table([pa.array(ids), uris, shas, pa.array(sha_keys(shas)),
                      pa.array(rng.integers(-2**63, 2**63 - 1, len(ids), dtype=np.int64)),
                      pa.array(np.full(len(ids), HASHED, np.uint8))], schema=SCHEMA)
    write_catalog(storage.join(index_dir, m.catalog), table)


def bench_memory(workdir: str, sizes: tuple[int, int], dim: int = 256, factories: Optional[list[str]] = None,
                 baseline_tree: Optional[str] = None) -> list[dict]:
    """Two sizes of one-shard indexes per factory: ready time and resident bytes, with the slope
    per vector; with `baseline_tree`, the earlier implementation on the same directories first."""
    from bench.vectors import synthetic
    from configs.schema import load_config
    from evaluation.codecs import code_bytes
    from indexing import storage
    from indexing.build import build_from_vectors
    from indexing.manifest import read_manifest
    from indexing.shards import read_index

    # The training sample changes neither memory nor start-up; a small one keeps OPQ training short.
    cfg = load_config(None, {"index": {"train_sample": 50_000}})
    factories = factories or [cfg.index.auto_factory, cfg.index.compact_factory]
    rows = []
    for factory in factories:
        runs: dict[str, list[dict]] = {}
        for n in sizes:
            d = os.path.join(workdir, f"memory-{n}-d{dim}-{factory.replace(',', '_').replace('{', '').replace('}', '')}")
            if not os.path.exists(os.path.join(d, "manifest.json")):
                build_from_vectors(synthetic(n, dim, queries=1).base, None, d, cfg, 1, factory)
                add_catalog_rows(d)
            m = read_manifest(d)
            code = code_bytes(read_index(storage.join(d, m.template)))
            probes = ([("baseline", baseline_tree)] if baseline_tree else []) + [("first load", None), ("mapped", None)]
            for impl, tree in probes:
                if impl == "first load":  # the metadata file a first replica converts from the catalog
                    for f in _sidecars(d):
                        os.remove(f)
                cost = load_cost(d, tree)
                runs.setdefault(impl, []).append(cost)
                rows.append({"factory": m.factory, "impl": impl, "vectors": cost["vectors"], "dim": dim,
                             "code_plus_id_bytes": code, "ready_s": round(cost["ready_s"], 3),
                             **{f"{k}_mb": round(cost[k] / 2**20, 1) for k in
                                ("load_anon", "load_file", "scanned_anon", "scanned_file")}})
        for impl, (small, big) in runs.items():
            dv = big["vectors"] - small["vectors"]
            per = {k: round((big[k] - small[k]) / dv, 1) for k in ("scanned_anon", "scanned_file")}
            rows.append({"factory": m.factory, "impl": impl, "vectors": f"slope {small['vectors']}->{big['vectors']}",
                         "dim": dim, "code_plus_id_bytes": code, "ready_s": round(big["ready_s"], 3),
                         "private_bytes_per_vector": per["scanned_anon"], "page_cache_bytes_per_vector": per["scanned_file"],
                         "scanned_bytes_per_vector": round(per["scanned_anon"] + per["scanned_file"], 1)})
            LOG.info("%s %s: %.0f private + %.0f page-cache B/vector after a full scan (code + id %d), ready in %.2f s",
                     m.factory, impl, per["scanned_anon"], per["scanned_file"], code, big["ready_s"])
    return rows


def _sidecars(index_dir: str) -> list[str]:
    live = os.path.join(index_dir, "live")
    return [os.path.join(r, f) for r, _, fs in os.walk(live) for f in fs if f.endswith(".g0.arrow")] if os.path.isdir(live) else []
