"""Memory: resident bytes per indexed vector of a shard replica, against the code size the factory
implies. A replica holds an `indexing.live.LiveShard`; each size loads one in a fresh process and
reports the growth of its resident set, so the per-vector cost is the slope between two sizes
(fixed costs such as the coarse quantizer and allocator pools cancel out)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import faiss

LOG = logging.getLogger(__name__)

_PROBE = """
import json, sys
from deployments.shard import rss_bytes
from indexing.live import LiveShard
from indexing.manifest import read_manifest
import pyarrow.parquet, faiss  # imported before the baseline: their cost is not per vector
m = read_manifest(sys.argv[1])
before = rss_bytes()
shard = LiveShard(sys.argv[1], m, 0)
print(json.dumps({"vectors": shard.ntotal, "load_rss_bytes": rss_bytes() - before}))
"""


def load_cost(index_dir: str) -> dict:
    """Resident bytes a fresh process gains by loading shard 0 of `index_dir`."""
    p = subprocess.run([sys.executable, "-c", _PROBE, index_dir], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def code_bytes(index_dir: str, template_path: str) -> int:
    """Bytes of one FAISS code in the index's template, plus the 8-byte id stored with it."""
    from indexing import storage
    from indexing.shards import read_index

    template = read_index(storage.join(index_dir, template_path))
    ivf = faiss.try_extract_index_ivf(template)
    return (ivf.code_size if ivf is not None else faiss.downcast_index(faiss.downcast_index(template).index).code_size) + 8


def bench_memory(workdir: str, sizes: tuple[int, int], dim: int = 128) -> list[dict]:
    """One-shard indexes of two sizes (the default factory), their load cost and the slope."""
    from bench.vectors import synthetic
    from configs.schema import load_config
    from indexing.build import build_from_vectors
    from indexing.manifest import read_manifest

    rows, loaded = [], []
    for n in sizes:
        d = os.path.join(workdir, f"memory-{n}-d{dim}")
        if not os.path.exists(os.path.join(d, "manifest.json")):
            build_from_vectors(synthetic(n, dim, queries=1).base, None, d, load_config(), 1, None)
        cost, m = load_cost(d), read_manifest(d)
        loaded.append(cost)
        rows.append({"vectors": cost["vectors"], "factory": m.factory, "dim": dim,
                     "load_rss_mb": cost["load_rss_bytes"] / 2**20, "bytes_per_vector": cost["load_rss_bytes"] / cost["vectors"],
                     "code_plus_id_bytes": code_bytes(d, m.template)})
    small, big = rows
    slope = (loaded[1]["load_rss_bytes"] - loaded[0]["load_rss_bytes"]) / (loaded[1]["vectors"] - loaded[0]["vectors"])
    rows.append({"vectors": f"slope {small['vectors']}->{big['vectors']}", "factory": big["factory"], "dim": dim,
                 "bytes_per_vector": slope, "code_plus_id_bytes": big["code_plus_id_bytes"]})
    LOG.info("shard memory: %.0f bytes per vector (code + id: %d)", slope, big["code_plus_id_bytes"])
    return rows
