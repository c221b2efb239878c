"""`python -m bench serving`: every HTTP engine under one load generator, then where the service's
CPU goes per request.

Engines, each on the same 100k x 256 clustered vectors and the same queries, started as their
users start them: the service (`deployments run`'s deploy, JSON and binary bodies; also with
`serve.shard_direct: false`, the fan-out through Serve handle calls it used before issue 31), the
one-process uvicorn + Starlette + FAISS front over the same factory (bench/http_baseline.py), and
Chroma's server (`chroma run`) through its REST API at two HNSW ef_search values. All get their
load from `wrk` (bench/wrk.py) at 1, 8 and 32 connections; the service and the one-process front
get byte-identical bodies, Chroma the same vectors in its API's body. Recall@10 comes from one
sequential pass of the same bodies read back in Python. HAProxy answering a static body gives the
generator's own ceiling. Chroma through its Python client stays as one labelled row: it measures
that client (pydantic, one client per thread, the GIL) as much as the server.

The profile (bench/profile.py) then runs 32 connections for 20 s against each service variant."""
from __future__ import annotations

import http.client
import logging
import os
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import orjson
import yaml

from bench import wrk
from bench.common import free_port, run_load, wait_port
from bench.vectors import VectorSet, recall_at_k

LOG = logging.getLogger(__name__)
K = 10
LEVELS = (1, 8, 32)
CHROMA_EF = (32, 100)
CHROMA_PATH = "/api/v2/tenants/default_tenant/databases/default_database/collections/{id}/query"


class HttpClient:
    """Keep-alive connections, one per client thread, on the standard library's http.client (the
    recall pass and the Python-client row)."""

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


def json_bodies(vs: VectorSet, nprobe: int) -> list[bytes]:
    """POST /search/vector JSON bodies, one per query (near-duplicate collapse off: raw ANN results)."""
    return [orjson.dumps({"vector": q, "k": K, "nprobe": nprobe, "dedupe": False}, option=orjson.OPT_SERIALIZE_NUMPY)
            for q in vs.queries]


def binary_path(nprobe: int) -> str:
    return f"/search/vector?k={K}&nprobe={nprobe}&dedupe=false"


def service_bodies(vs: VectorSet, nprobe: int, workdir: str, name: str) -> dict[str, tuple[wrk.Bodies, list[bytes]]]:
    """The service's bodies for wrk, JSON and raw float32: {"json"|"binary": (Bodies, raw bodies)}."""
    raw = {"json": json_bodies(vs, nprobe),
           "binary": [np.ascontiguousarray(q, dtype="<f4").tobytes() for q in vs.queries]}
    routes = {"json": ("/search/vector", "application/json"), "binary": (binary_path(nprobe), "application/octet-stream")}
    return {kind: (wrk.write_bodies(workdir, f"{name}-{kind}", *routes[kind], raw[kind]), raw[kind]) for kind in raw}


def service_ids(body: bytes) -> list[int]:
    """Result ids of a /search/vector answer (one vector: a list; raw float32 rows: a list per row)."""
    results = orjson.loads(body)["results"]
    if results and isinstance(results[0], list):
        results = results[0]
    return [h["id"] for h in results]


def chroma_ids(body: bytes) -> list[int]:
    return [int(i) for i in orjson.loads(body)["ids"][0]]


def recall(url: str, bodies: wrk.Bodies, raw: list[bytes], ids: Callable[[bytes], list[int]], vs: VectorSet) -> float:
    """recall@10 of one sequential pass of `raw` bodies (the ones wrk replays)."""
    client = HttpClient(url)
    found = []
    for body in raw:
        status, answer = client.post(bodies.path, body, bodies.content_type)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {answer[:200]!r}")
        f = ids(answer)[:K]
        found.append(f + [-1] * (K - len(f)))
    return recall_at_k(np.array(found), vs.truth, K)


def measure_engine(name: str, url: str, bodies: wrk.Bodies, raw: list[bytes], ids: Optional[Callable],
                   vs: VectorSet, seconds: float, note: str = "") -> list[dict]:
    """One engine: recall@10 (when `ids` reads its answers), then wrk at every level."""
    r = recall(url, bodies, raw, ids, vs) if ids else float("nan")
    wrk.run(url, bodies, 8, 2)  # warm-up: connections, caches, lazy starts
    rows = []
    for c in LEVELS:
        wrk.settle()
        row = {"engine": name, "note": note, "recall@10": r, **wrk.run(url, bodies, c, seconds)}
        LOG.info("%s c=%d: %.0f QPS, p50 %.2f ms, p99 %.2f ms, errors %d (recall@10 %.3f)", name, c, row["qps"],
                 row["p50_ms"], row["p99_ms"], row["errors"], r)
        rows.append(row)
    return rows


def http_baseline(vs: VectorSet, factory: str, nprobe: int, workdir: str) -> tuple[str, Callable[[], None]]:
    """Start the one-process baseline on the same factory; returns (url, stop)."""
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
    return f"http://127.0.0.1:{port}", proc.terminate


class ChromaServer:
    """`chroma run` on a fresh directory; collections filled through its Python client (loading
    is not measured), queried through its REST API."""

    def __init__(self, workdir: str):
        import chromadb

        self.port = free_port()
        chroma = os.path.join(os.path.dirname(sys.executable), "chroma")
        self.proc = subprocess.Popen([chroma, "run", "--path", os.path.join(workdir, f"chroma-{self.port}"),
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = chromadb.HttpClient(host="127.0.0.1", port=self.port)

    def collection(self, vs: VectorSet, ef_search: int) -> str:
        """A collection of `vs` (HNSW, inner product, M 16) searched at `ef_search`; its query path."""
        name = f"bench-ef{ef_search}"
        col = self.client.create_collection(name, embedding_function=None, configuration={
            "hnsw": {"space": "ip", "ef_search": ef_search, "ef_construction": 100, "max_neighbors": 16}})
        t0 = time.time()
        for s in range(0, len(vs.base), 5000):
            col.add(ids=[str(i) for i in range(s, min(s + 5000, len(vs.base)))], embeddings=vs.base[s:s + 5000])
        LOG.info("chroma ef_search %d: %d vectors added in %.0f s", ef_search, len(vs.base), time.time() - t0)
        return CHROMA_PATH.format(id=col.id)

    def python_client(self, name: str) -> Callable[[np.ndarray], list[int]]:
        """Queries through chromadb.HttpClient, one client per thread, as its users write them."""
        import chromadb

        local = threading.local()

        def search(q: np.ndarray) -> list[int]:
            c = getattr(local, "col", None)
            if c is None:
                c = local.col = chromadb.HttpClient(host="127.0.0.1", port=self.port).get_collection(name)
            return [int(i) for i in c.query(query_embeddings=q[None, :], n_results=K, include=[])["ids"][0]]

        return search

    def stop(self) -> None:
        self.proc.terminate()


def python_client_levels(search: Callable[[np.ndarray], list[int]], vs: VectorSet) -> list[dict]:
    """recall, QPS, p50/p99 of a Python client at each level (bench.common.run_load's thread pool)."""
    for q in vs.queries[:20]:
        search(q)
    rows = []
    for c in LEVELS:
        found: list = [[] for _ in vs.queries]

        def call(i: int) -> bool:
            try:
                found[i] = search(vs.queries[i])
            except Exception:
                return False
            return True

        r = run_load(call, c, len(vs.queries))
        padded = np.array([list(f)[:K] + [-1] * (K - len(f[:K])) for f in found])
        rows.append({"recall@10": recall_at_k(padded, vs.truth, K), **r})
    return rows


def variant_config(workdir: str, name: str, serve_overrides: dict) -> str:
    """configs/default.yaml with `serve:` keys changed, written to workdir; its path."""
    from configs.schema import DEFAULT_CONFIG

    data = yaml.safe_load(open(DEFAULT_CONFIG))
    data["serve"].update(serve_overrides)
    path = os.path.join(workdir, f"serving-{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


# (row name, serve: overrides) of the service variants measured.
SERVICE_VARIANTS = [
    ("service", {}),
    ("service, fan-out through Serve handles (shard_direct: false)", {"shard_direct": False}),
]


def bench_serving(vs: VectorSet, workdir: str, serve: Callable[[str, Optional[str]], str], nprobe: int,
                  seconds: float, profile_s: float) -> dict:
    """Rows of every engine at every level, and the per-request profile of each service variant.
    `serve(index_dir, config)` deploys the service and returns its URL."""
    from bench import profile
    from bench.search import factory_for, sharded

    if not wrk.available():
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk); every engine is driven by it")
    factory = factory_for(vs, "IVF1024,Flat" if len(vs.base) >= 100_000 else None)[0]
    index_dir = os.path.join(workdir, f"index-{vs.name}-{re.sub(r'[^A-Za-z0-9]+', '_', factory)}")
    sharded(vs, factory, index_dir, 2)
    bodies = service_bodies(vs, nprobe, workdir, "service")
    b_json, raw_json = bodies["json"]
    out = {"dataset": vs.name, "n": len(vs.base), "dim": vs.dim, "factory": factory, "nprobe": nprobe, "k": K,
           "seconds_per_level": seconds, "rows": [], "profiles": {}}
    rows = out["rows"]

    static = wrk.StaticEndpoint(free_port())
    try:
        rows += measure_engine("wrk ceiling: HAProxy static answer", static.url, b_json, raw_json, None, vs, seconds,
                               "generator alone")
    finally:
        static.stop()

    for name, overrides in SERVICE_VARIANTS:
        url = serve(index_dir, variant_config(workdir, re.sub(r"\W+", "-", name), overrides) if overrides else None)
        note = f"{factory}, 2 shards, nprobe {nprobe}"
        rows += measure_engine(f"{name}, JSON", url, b_json, raw_json, service_ids, vs, seconds, note)
        rows += measure_engine(f"{name}, binary float32", url, *bodies["binary"], service_ids, vs, seconds, note)
        LOG.info("profiling %s at 32 connections for %.0f s", name, profile_s)
        out["profiles"][name] = profile.profile(lambda s: wrk.run(url, b_json, 32, s), profile_s)

    url, stop = http_baseline(vs, factory, nprobe, workdir)
    try:
        rows += measure_engine("one process: uvicorn + Starlette + FAISS", url, b_json, raw_json, service_ids, vs,
                               seconds, f"{factory}, nprobe {nprobe}")
    finally:
        stop()

    try:
        chroma = ChromaServer(workdir)
    except Exception as e:  # chromadb is an optional extra: reported, not fatal
        LOG.warning("chroma server not started: %s", e)
        rows.append({"engine": "chroma server", "error": str(e)[:200]})
        return out
    try:
        for ef in CHROMA_EF:
            path = chroma.collection(vs, ef)
            bodies = [orjson.dumps({"query_embeddings": [q], "n_results": K, "include": []},
                                   option=orjson.OPT_SERIALIZE_NUMPY) for q in vs.queries]
            b = wrk.write_bodies(workdir, f"chroma-ef{ef}", path, "application/json", bodies)
            rows += measure_engine(f"Chroma server, REST API, HNSW ef_search {ef}", chroma.url, b, bodies, chroma_ids,
                                   vs, seconds, "HNSW M 16")
        for c, r in zip(LEVELS, python_client_levels(chroma.python_client(f"bench-ef{CHROMA_EF[0]}"), vs)):
            rows.append({"engine": f"Chroma server via its Python client (thread pool), ef_search {CHROMA_EF[0]}",
                         "note": "measures the client too", **r})
    finally:
        chroma.stop()
    return out


def ratios(out: dict) -> list[dict]:
    """The issue's ratios per level: service JSON QPS over Chroma's (the row of equal recall within
    0.01, else the closest) and over the one-process front; p99/p50 of the service."""
    by = {}
    for r in out["rows"]:
        if "qps" in r:
            by.setdefault(r["engine"], {})[r["concurrency"]] = r
    service = by.get(f"{SERVICE_VARIANTS[0][0]}, JSON", {})
    front = by.get("one process: uvicorn + Starlette + FAISS", {})
    chromas = {e: v for e, v in by.items() if e.startswith("Chroma server, REST")}
    result = []
    for c, s in sorted(service.items()):
        row = {"concurrency": c, "service_qps": s["qps"], "p99_over_p50": s["p99_ms"] / s["p50_ms"]}
        if chromas:
            name, ch = min(chromas.items(), key=lambda kv: (abs(kv[1][c]["recall@10"] - s["recall@10"]) > 0.01,
                                                            -kv[1][c]["qps"]))
            row.update(chroma=name, chroma_recall=ch[c]["recall@10"], over_chroma=s["qps"] / ch[c]["qps"])
        if c in front:
            row["over_one_process"] = s["qps"] / front[c]["qps"]
        result.append(row)
    return result
