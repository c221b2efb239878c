"""Latency under load: p50/p99 of image and vector queries over HTTP at rising concurrency until
errors or latency blow up, with the point where throughput stops rising (saturation); the same
queries in-process (ShardedIndex, and the embedder + ShardedIndex) show what the service layers cost."""
from __future__ import annotations

import logging
from typing import Callable

import httpx
import numpy as np
import pyarrow.parquet as pq

from bench.common import run_load
from indexing import ShardedIndex, storage
from indexing.build import arrow_to_vectors, read_embeddings

LOG = logging.getLogger(__name__)
LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)
IMAGE_LEVELS = (1, 4, 16)


def queries(index_dir: str, n: int) -> tuple[np.ndarray, list[bytes]]:
    """Vectors and image bytes of indexed images (their catalog URIs)."""
    ix = ShardedIndex.open(index_dir)
    x = arrow_to_vectors(read_embeddings(storage.join(index_dir, ix.manifest.embeddings)).column("embedding"))[:n]
    uris = pq.read_table(storage.join(index_dir, ix.manifest.catalog)).column("uri").to_pylist()
    # Only files under the folders the build read: a catalog uri is never opened anywhere else.
    return x, [storage.read_bytes(u) for u in uris[:n] if u and storage.is_under(u, ix.manifest.sources)]


def rising(name: str, call: Callable[[int], bool], requests: int, max_level: int, levels=LEVELS) -> list[dict]:
    """Run `call` at each concurrency level; stop at the first errors or when p99 passes 20x the
    single-client p99. Marks the saturation point: the level after which QPS rose by under 10%."""
    rows: list[dict] = []
    call(0)
    for c in (lv for lv in levels if lv <= max_level):
        r = {"mode": name, **run_load(call, c, max(requests, 4 * c))}
        rows.append(r)
        LOG.info("%s c=%d p50 %.1f ms p99 %.1f ms qps %.1f errors %d", name, c, r["p50_ms"], r["p99_ms"], r["qps"], r["errors"])
        if r["errors"]:
            r["stopped"] = "errors"
            break
        if len(rows) > 1 and r["p99_ms"] > 20 * rows[0]["p99_ms"]:
            r["stopped"] = "p99 > 20x single-client"
            break
    for prev, r in zip(rows, rows[1:]):
        if r["qps"] < 1.1 * prev["qps"]:
            prev["saturation"] = True
            break
    return rows


def bench_load(index_dir: str, url: str, quick: bool) -> list[dict]:
    """HTTP vector and image queries against their in-process equivalents, at rising concurrency."""
    from embedding.embedder import Embedder

    n_req, max_level = (64, 32) if quick else (400, 128)
    x, images = queries(index_dir, 512)
    client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=256))
    ix = ShardedIndex.open(index_dir)
    emb = Embedder()

    def http_vector(i):
        return client.post("/search/vector", json={"vector": x[i % len(x)].tolist(), "k": 10}).status_code == 200

    def http_image(i):
        return client.post("/search?k=10", content=images[i % len(images)],
                           headers={"content-type": "image/jpeg"}).status_code == 200

    def inproc_vector(i):
        ix.search(x[i % len(x)][None, :], 10)
        return True

    def inproc_image(i):
        ix.search(emb.embed_bytes([images[i % len(images)]]), 10)
        return True

    rows = rising("http_vector", http_vector, n_req, max_level) + rising("inproc_vector", inproc_vector, n_req, 16)
    # Image queries at the concurrencies issue 12 compares (HTTP against in-process embed+search).
    rows += rising("http_image", http_image, n_req // 2, 16, IMAGE_LEVELS)
    rows += rising("inproc_image", inproc_image, n_req // 2, 16, IMAGE_LEVELS)
    client.close()
    return rows
