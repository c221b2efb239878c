"""Search: recall@10 against queries per second at several nprobe values, for the service over
HTTP, ShardedIndex in-process, one plain FAISS index with the same factory, and the vector
databases users would pick instead (Milvus Lite, Qdrant local, LanceDB IVF-PQ) when installed.
The HTTP engines side by side under one load generator are `python -m bench serving`.

Every engine answers one query per call, on the same vectors, queries and k, against exact
ground truth; the service's QPS is wrk's at one connection (bench/wrk.py), its recall read back
from the same bodies."""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Optional

import faiss
import numpy as np

from bench.vectors import VectorSet, recall_at_k

LOG = logging.getLogger(__name__)
K = 10
NPROBES = (1, 4, 16, 64)
# An engine: (name, index factory it was built with, {nprobe or None: search(q (d,)) -> ids}).
Searchers = dict[Optional[int], Callable[[np.ndarray], list[int]]]


def measure(search: Callable[[np.ndarray], list[int]], vs: VectorSet, concurrency: int = 1) -> dict:
    """recall@10 and QPS of `search` over every query of `vs` (after 20 warm-up queries)."""
    from concurrent.futures import ThreadPoolExecutor

    for q in vs.queries[:20]:
        search(q)
    found: list = [None] * len(vs.queries)

    def one(i: int) -> None:
        found[i] = search(vs.queries[i])

    t0 = time.perf_counter()
    if concurrency == 1:
        for i in range(len(vs.queries)):
            one(i)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(len(vs.queries))))
    wall = time.perf_counter() - t0
    padded = np.array([list(f) + [-1] * (K - len(f)) for f in found])
    return {"recall@10": recall_at_k(padded, vs.truth, K), "qps": len(vs.queries) / wall,
            "ms_per_query": 1000 * wall / len(vs.queries) * concurrency}


def factory_for(vs: VectorSet, override: Optional[str] = None) -> tuple[str, int]:
    """The service's default factory for this corpus size (or `override`, placeholders filled the
    same way), and its nlist."""
    from configs.schema import load_config
    from indexing.template import choose_factory

    cfg = load_config().index
    factory = choose_factory(cfg, len(vs.base), vs.dim, min(len(vs.base), cfg.train_sample), override)
    nlist = int(factory.split(",")[0][3:]) if factory.startswith("IVF") else 1
    return factory, nlist


def plain_faiss(vs: VectorSet, factory: str) -> Searchers:
    index = faiss.index_factory(vs.dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vs.base)
    index.add(vs.base)
    faiss.omp_set_num_threads(1)  # one query per call: threads only add overhead

    def at(nprobe):
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        return lambda q: index.search(q[None, :], K, params=params)[1][0].tolist()

    return {n: at(n) for n in NPROBES}


def sharded(vs: VectorSet, factory: str, index_dir: str, shards: int) -> Searchers:
    """Build with the project's own build (same factory) and search through ShardedIndex."""
    from configs.schema import load_config
    from indexing import ShardedIndex
    from indexing.build import build_from_vectors

    if not os.path.exists(os.path.join(index_dir, "manifest.json")):
        build_from_vectors(vs.base, None, index_dir, load_config(), shards, factory)
    ix = ShardedIndex.open(index_dir)
    return {n: (lambda q, n=n: ix.search(q[None, :], K, nprobe=n)[1][0].tolist()) for n in NPROBES}


def service_rows(vs: VectorSet, url: str, workdir: str) -> list[dict]:
    """POST /search/vector at each nprobe: recall@10 of the answers, QPS of wrk at one connection."""
    from bench import serving, wrk

    rows = []
    for nprobe in NPROBES:
        raw = serving.json_bodies(vs, nprobe)
        bodies = wrk.write_bodies(workdir, f"search-{vs.name}-{nprobe}", "/search/vector", "application/json", raw)
        r = serving.recall(url, bodies, raw, serving.service_ids, vs)
        w = wrk.run(url, bodies, 1, 5)
        rows.append({"nprobe": nprobe, "concurrency": 1, "recall@10": r, "qps": w["qps"],
                     "ms_per_query": 1000.0 / w["qps"]})
    return rows


def milvus_lite(vs: VectorSet, nlist: int, workdir: str) -> Searchers:
    """Milvus Lite (pymilvus[milvus_lite]); IVF_FLAT is the IVF index it offers."""
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(os.path.join(workdir, "milvus.db"))
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=vs.dim)
    params = client.prepare_index_params()
    params.add_index(field_name="vec", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
    client.create_collection("bench", schema=schema, index_params=params)
    for s in range(0, len(vs.base), 20_000):
        client.insert("bench", [{"id": s + i, "vec": v} for i, v in enumerate(vs.base[s : s + 20_000].tolist())])
    client.flush("bench")  # seal the segments so the IVF index is built and used

    def at(nprobe):
        sp = {"metric_type": "IP", "params": {"nprobe": nprobe}}
        return lambda q: [h["id"] for h in client.search("bench", data=[q.tolist()], limit=K, search_params=sp,
                                                         anns_field="vec")[0]]

    return {n: at(n) for n in NPROBES}


def qdrant_local(vs: VectorSet) -> Searchers:
    """Qdrant's local mode (qdrant-client, in memory): exact search only, no HNSW there."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection("bench", vectors_config=models.VectorParams(size=vs.dim, distance=models.Distance.DOT))
    client.upload_collection("bench", vectors=vs.base, ids=list(range(len(vs.base))))
    return {None: lambda q: [p.id for p in client.query_points("bench", query=q.tolist(), limit=K).points]}


def lancedb_ivfpq(vs: VectorSet, nlist: int, workdir: str) -> Searchers:
    """LanceDB with an IVF-PQ index: dim/4 sub-vectors of 8 bits, candidates re-ranked on the raw
    vectors Lance keeps anyway (refine_factor 10); PQ alone stayed under 0.4 recall@10 here."""
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq

    db = lancedb.connect(os.path.join(workdir, "lance"))
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(vs.base.ravel()), vs.dim)
    table = db.create_table("bench", data=pa.table({"id": pa.array(np.arange(len(vs.base))), "vector": vectors}))
    table.create_index("vector", config=IvfPq(distance_type="dot", num_partitions=nlist, num_sub_vectors=max(1, vs.dim // 4)))

    def at(nprobe):
        return lambda q: table.search(q).distance_type("dot").nprobes(nprobe).refine_factor(10).limit(K) \
            .select(["id"]).to_arrow().column("id").to_pylist()

    return {n: at(n) for n in NPROBES}


PEERS = {"milvus-lite": "pymilvus", "qdrant-local": "qdrant_client", "lancedb-ivfpq": "lancedb"}


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def bench_search(vs: VectorSet, workdir: str, url_for: Callable[[str], str], shards: int = 2,
                 max_exact_peer: int = 200_000, factory: Optional[str] = None) -> list[dict]:
    """Every engine on one vector set; `url_for(index_dir)` serves an index and returns its URL.
    `factory` replaces the service's default for every FAISS engine."""
    factory, nlist = factory_for(vs, factory)
    rows = []

    def run(engine: str, searchers: Searchers, build_s: float, concurrency: int = 1, note: str = ""):
        for nprobe, fn in searchers.items():
            r = measure(fn, vs, concurrency)
            rows.append({"dataset": vs.name, "n": len(vs.base), "engine": engine, "index": note or factory,
                         "nprobe": nprobe if nprobe is not None else "-", "concurrency": concurrency,
                         "build_s": round(build_s, 1), **r})
            LOG.info("%s %s nprobe=%s c=%d: recall@10 %.3f, %.0f QPS", vs.name, engine, nprobe, concurrency,
                     r["recall@10"], r["qps"])

    t = time.time()
    run("faiss (plain)", plain_faiss(vs, factory), time.time() - t)
    index_dir = os.path.join(workdir, f"index-{vs.name}-{re.sub(r'[^A-Za-z0-9]+', '_', factory)}")
    t = time.time()
    local = sharded(vs, factory, index_dir, shards)
    run(f"ShardedIndex ({shards} shards)", local, time.time() - t)
    url = url_for(index_dir)
    for r in service_rows(vs, url, workdir):
        rows.append({"dataset": vs.name, "n": len(vs.base), "engine": "service HTTP (wrk)", "index": factory,
                     "build_s": 0.0, **r})
    for name, module in PEERS.items():
        if not installed(module):
            LOG.info("%s not installed (pip install -e '.[bench]'): skipped", name)
            continue
        if name == "qdrant-local" and len(vs.base) > max_exact_peer:
            LOG.info("qdrant local mode is exact numpy search; skipped above %d vectors", max_exact_peer)
            continue
        peer_dir = tempfile.mkdtemp(prefix=f"bench-{name}-", dir=workdir)
        t = time.time()
        try:
            searchers = {"milvus-lite": lambda: milvus_lite(vs, nlist, peer_dir), "qdrant-local": lambda: qdrant_local(vs),
                         "lancedb-ivfpq": lambda: lancedb_ivfpq(vs, nlist, peer_dir)}[name]()
        except Exception as e:  # a peer that fails to build is reported, not fatal
            LOG.warning("%s failed: %s", name, e)
            rows.append({"dataset": vs.name, "n": len(vs.base), "engine": name, "error": str(e)[:200]})
            shutil.rmtree(peer_dir, ignore_errors=True)
            continue
        note = {"milvus-lite": f"IVF_FLAT nlist={nlist}", "qdrant-local": "exact (local mode)",
                "lancedb-ivfpq": f"IVF_PQ {nlist},PQ{max(1, vs.dim // 4)} refine 10"}[name]
        run(name, searchers, time.time() - t, note=note)
        shutil.rmtree(peer_dir, ignore_errors=True)
    return rows
