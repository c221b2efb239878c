"""Embedding: images per second through the Embedder deployment (over HTTP `POST /embed` and
through a DeploymentHandle, both batched by @serve.batch), with the model in eager torch and in
ONNX Runtime, against plain loops in this process with the same model and batch size: the
eager-torch loop is the yardstick every ratio divides by."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx

LOG = logging.getLogger(__name__)


def loop(images: list[bytes], batch_size: int, runtime: str) -> dict:
    """Decode and embed in batches, one process, no Ray."""
    from configs.schema import ModelConfig
    from embedding.embedder import Embedder

    emb = Embedder(ModelConfig(runtime=runtime))
    emb.embed_bytes(images[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        emb.embed_bytes(images[s : s + batch_size])
    return {"path": f"{runtime} loop (batch {batch_size})", "runtime": runtime, "images": len(images),
            "images_per_s": len(images) / (time.perf_counter() - t0)}


_LOOP: asyncio.AbstractEventLoop | None = None


def handle(images: list[bytes], app: str, in_flight: int) -> dict:
    """Embedder.embed_image through a DeploymentHandle, `in_flight` requests at a time. On one
    event loop for the whole run: Serve's fast path binds a handle's router to the caller's loop."""
    from ray import serve

    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="handles", daemon=True).start()

    async def run():
        h = serve.get_deployment_handle("Embedder", app_name=app)
        await h.embed_image.remote(images[0])
        sem = asyncio.Semaphore(in_flight)

        async def one(b):
            async with sem:
                return await h.embed_image.remote(b)

        t0 = time.perf_counter()
        out = await asyncio.gather(*[one(b) for b in images])
        return out, time.perf_counter() - t0

    out, seconds = asyncio.run_coroutine_threadsafe(run(), _LOOP).result()
    errors = sum(1 for o in out if "error" in o)
    return {"path": f"deployment handle ({in_flight} in flight)", "images": len(images), "errors": errors,
            "images_per_s": len(images) / seconds}


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


def bench_embedding(images: list[bytes], serve, batch_size: int = 16, app: str = "imsearch") -> list[dict]:
    """The loops, then the deployment in each runtime (`serve(runtime)` deploys the service with
    that `model.runtime` and returns its URL): a handle with 2 x batch requests in flight and HTTP
    at 4 clients."""
    rows = [loop(images, batch_size, "torch"), loop(images, batch_size, "onnx")]
    for runtime in ("torch", "onnx"):
        url = serve(runtime)
        for row in (handle(images, app, 2 * batch_size), http(images, url, 4)):
            rows.append({**row, "path": f"{row['path']}, {runtime}", "runtime": runtime})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_torch_loop"] = r["images_per_s"] / base
        LOG.info("%s: %.1f images/s", r["path"], r["images_per_s"])
    return rows
