"""Embedding: images per second through the Embedder deployment (over HTTP `POST /embed` and
through a DeploymentHandle, both batched by @serve.batch) against a plain torch loop with the
same model and batch size in this process."""
from __future__ import annotations

import asyncio
import logging
import time

import httpx

LOG = logging.getLogger(__name__)


def torch_loop(images: list[bytes], batch_size: int) -> dict:
    """Decode and embed in batches, one process, no Ray."""
    from embedding.embedder import Embedder

    emb = Embedder()
    emb.embed_bytes(images[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        emb.embed_bytes(images[s : s + batch_size])
    return {"path": f"torch loop (batch {batch_size})", "images": len(images),
            "images_per_s": len(images) / (time.perf_counter() - t0)}


def handle(images: list[bytes], app: str, in_flight: int) -> dict:
    """Embedder.embed_image through a DeploymentHandle, `in_flight` requests at a time."""
    from ray import serve

    h = serve.get_deployment_handle("Embedder", app_name=app)
    h.embed_image.remote(images[0]).result()

    async def run():
        sem = asyncio.Semaphore(in_flight)

        async def one(b):
            async with sem:
                return await h.embed_image.remote(b)

        return await asyncio.gather(*[one(b) for b in images])

    t0 = time.perf_counter()
    out = asyncio.run(run())
    errors = sum(1 for o in out if "error" in o)
    return {"path": f"deployment handle ({in_flight} in flight)", "images": len(images), "errors": errors,
            "images_per_s": len(images) / (time.perf_counter() - t0)}


def http(images: list[bytes], url: str, concurrency: int) -> dict:
    """POST /embed over HTTP from `concurrency` client threads."""
    from bench.common import run_load

    client = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency * 2))

    def call(i: int) -> bool:
        return client.post("/embed", content=images[i % len(images)],
                           headers={"content-type": "application/octet-stream"}).status_code == 200

    call(0)
    r = run_load(call, concurrency, len(images))
    return {"path": f"HTTP /embed ({concurrency} clients)", "images": len(images), "errors": r["errors"],
            "images_per_s": r["qps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]}


def bench_embedding(images: list[bytes], url: str, app: str = "imsearch", batch_size: int = 16) -> list[dict]:
    """All three paths on the same images; the service must be running at `url`."""
    rows = [torch_loop(images, batch_size), handle(images, app, 2 * batch_size), http(images, url, batch_size)]
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_torch_loop"] = r["images_per_s"] / base
        LOG.info("%s: %.1f images/s", r["path"], r["images_per_s"])
    return rows
