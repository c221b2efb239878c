"""Vector queries over HTTP at concurrency 1, 8 and 32, each engine on the same vectors and
queries: the service (JSON and binary float32 bodies), the one-process HTTP baseline
(bench/http_baseline.py) and Chroma's server (`chroma run`, HNSW). Also the client every HTTP
engine shares, and the lever runs (`python -m bench levers`) that measure each Ray Serve fast
path on and off, each in a fresh Ray."""
from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np
import orjson

from bench.common import run_load
from bench.vectors import VectorSet, recall_at_k

LOG = logging.getLogger(__name__)
K = 10
LEVELS = (1, 8, 32)


class HttpClient:
    """Keep-alive connections, one per client thread, on the standard library's http.client: the
    cheapest Python client, so the client costs the shared 2 cores as little as it can."""

    def __init__(self, url: str):
        host, _, port = url.split("://", 1)[1].rstrip("/").partition(":")
        self.host, self.port = host, int(port or 80)
        self.local = threading.local()

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", path, body, {"Content-Type": content_type})
            r = conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.local.conn = None
            conn.close()
            raise


def service_json(url: str, nprobe: int) -> Callable[[np.ndarray], list[int]]:
    """POST /search/vector with a JSON body (near-duplicate collapse off: raw ANN results)."""
    client = HttpClient(url)

    def search(q: np.ndarray) -> list[int]:
        status, body = client.post("/search/vector", orjson.dumps(
            {"vector": q, "k": K, "nprobe": nprobe, "dedupe": False}, option=orjson.OPT_SERIALIZE_NUMPY),
            "application/json")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return [h["id"] for h in orjson.loads(body)["results"]]

    return search


def service_binary(url: str, nprobe: int) -> Callable[[np.ndarray], list[int]]:
    """POST /search/vector with a raw float32 body and the options in the query string."""
    client = HttpClient(url)
    path = f"/search/vector?k={K}&nprobe={nprobe}&dedupe=false"

    def search(q: np.ndarray) -> list[int]:
        status, body = client.post(path, np.ascontiguousarray(q, dtype="<f4").tobytes(), "application/octet-stream")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return [h["id"] for h in orjson.loads(body)["results"][0]]

    return search


def measure_levels(search: Callable[[np.ndarray], list[int]], vs: VectorSet, levels=LEVELS, warmup: int = 50) -> list[dict]:
    """recall@10, QPS, p50 and p99 latency of `search` over every query of `vs`, at each
    concurrency (closed loop, bench.common.run_load: each client sends its next query when the
    last one returns). A query that fails counts as an error and finds nothing."""
    rows = []
    for q in vs.queries[:warmup]:
        search(q)
    for c in levels:
        found: list = [[] for _ in vs.queries]

        def call(i: int) -> bool:
            try:
                found[i] = search(vs.queries[i])
            except Exception:
                return False
            return True

        r = run_load(call, c, len(vs.queries))
        padded = np.array([list(f)[:K] + [-1] * (K - len(f[:K])) for f in found])
        rows.append({"concurrency": c, "recall@10": recall_at_k(padded, vs.truth, K), "qps": r["qps"],
                     "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"]})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


def http_baseline(vs: VectorSet, factory: str, nprobe: int, workdir: str):
    """Start the one-process baseline on the same factory; returns (search, stop)."""
    import faiss

    path = os.path.join(workdir, f"baseline-{vs.name}-{re.sub(r'[^A-Za-z0-9]+', '_', factory)}.faiss")
    if not os.path.exists(path):
        index = faiss.index_factory(vs.dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(vs.base)
        index.add(vs.base)
        faiss.write_index(index, path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.http_baseline", "--index", path, "--port", str(port),
                             "--nprobe", str(nprobe)])
    wait_port(port, proc)
    return service_json(f"http://127.0.0.1:{port}", nprobe), proc.terminate


def chroma_server(vs: VectorSet, workdir: str):
    """`chroma run` on a fresh directory, the vectors added over its HTTP API (HNSW, inner
    product); returns (search, stop). Chroma's own Python client is how its users call it."""
    import chromadb

    port = free_port()
    chroma = os.path.join(os.path.dirname(sys.executable), "chroma")
    proc = subprocess.Popen([chroma, "run", "--path", os.path.join(workdir, f"chroma-{vs.name}-{port}"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    client = chromadb.HttpClient(host="127.0.0.1", port=port)
    col = client.create_collection("bench", metadata={"hnsw:space": "ip"}, embedding_function=None)
    t0 = time.time()
    step = 5000
    for s in range(0, len(vs.base), step):
        col.add(ids=[str(i) for i in range(s, min(s + step, len(vs.base)))], embeddings=vs.base[s:s + step])
    LOG.info("chroma: %d vectors added in %.0f s", len(vs.base), time.time() - t0)
    local = threading.local()

    def search(q: np.ndarray) -> list[int]:
        c = getattr(local, "col", None)
        if c is None:  # one client per thread, like the HTTP clients above
            c = local.col = chromadb.HttpClient(host="127.0.0.1", port=port).get_collection("bench")
        return [int(i) for i in c.query(query_embeddings=q[None, :], n_results=K, include=[])["ids"][0]]

    return search, proc.terminate
