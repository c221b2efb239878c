"""Service latency and QPS over HTTP against `ShardedIndex.search` in-process, same index, same queries."""
from __future__ import annotations

import logging

import httpx
import numpy as np
import pyarrow.parquet as pq

from bench.common import machine, markdown_table, run_load, write_results
from indexing import ShardedIndex, storage
from indexing.build import arrow_to_vectors, read_embeddings

LOG = logging.getLogger(__name__)
CONCURRENCY = (1, 4, 16)


def _queries(index_dir: str, n: int) -> tuple[np.ndarray, list[bytes]]:
    ix = ShardedIndex.open(index_dir)
    t = read_embeddings(storage.join(index_dir, ix.manifest.embeddings))
    x = arrow_to_vectors(t.column("embedding"))[:n]
    cat = pq.read_table(storage.join(index_dir, ix.manifest.catalog)).column("uri").to_pylist()
    images = [storage.read_bytes(u) for u in cat[:n] if u]
    return x, images


def bench_serving(index_dir: str, out_dir: str, quick: bool = True, port: int = 8311) -> dict:
    """Run every mode at each concurrency; returns the payload written to out_dir/serving.json."""
    from deployments.__main__ import DEFAULT_SERVE_CONFIG, deploy, load_serve_config, wait_healthy
    from embedding.embedder import Embedder

    n_vec, n_img = (200, 40) if quick else (2000, 300)
    x, images = _queries(index_dir, max(n_vec, n_img))
    url = deploy(load_serve_config(str(DEFAULT_SERVE_CONFIG), index_dir, None, port))
    if not wait_healthy(url, 300):
        raise RuntimeError(f"service at {url} did not become healthy")
    ix = ShardedIndex.open(index_dir)
    emb = Embedder()
    client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64))

    def http_vector(i):
        return client.post("/search/vector", json={"vector": x[i % len(x)].tolist(), "k": 10}).status_code == 200

    def http_image(i):
        r = client.post("/search?k=10", content=images[i % len(images)], headers={"content-type": "image/jpeg"})
        return r.status_code == 200

    def local_vector(i):
        ix.search(x[i % len(x)][None, :], 10)
        return True

    def local_image(i):
        ix.search(emb.embed_bytes([images[i % len(images)]]), 10)
        return True

    modes = {"http_vector": (http_vector, n_vec), "inproc_vector": (local_vector, n_vec)}
    if images:
        modes |= {"http_image": (http_image, n_img), "inproc_image": (local_image, n_img)}
    rows = []
    for name, (fn, n) in modes.items():
        fn(0)  # warm up
        for c in CONCURRENCY:
            r = run_load(fn, c, n)
            rows.append({"mode": name, **r})
            LOG.info("%s c=%d p50 %.1f ms p99 %.1f ms qps %.1f", name, c, r["p50_ms"], r["p99_ms"], r["qps"])
    for r in rows:
        if r["mode"].startswith("http_"):
            base = next(b for b in rows if b["mode"] == r["mode"].replace("http_", "inproc_")
                        and b["concurrency"] == r["concurrency"])
            r["p50_vs_inproc"] = r["p50_ms"] / base["p50_ms"]
    payload = {"machine": machine(), "index": ix.manifest.model_dump(exclude={"slot_table"}), "rows": rows}
    table = markdown_table(rows, ["mode", "concurrency", "requests", "errors", "p50_ms", "p99_ms", "qps", "p50_vs_inproc"])
    write_results(out_dir, "serving", payload, table)
    _plot(rows, f"{out_dir}/serving.png")
    client.close()
    return payload


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        a.plot([r["concurrency"] for r in rs], [r["qps"] for r in rs], marker="o", label=mode)
        b.plot([r["concurrency"] for r in rs], [r["p50_ms"] for r in rs], marker="o", label=mode)
    for ax, title in ((a, "queries per second"), (b, "p50 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
