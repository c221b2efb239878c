"""Embedder deployment: decodes uploads and embeds them in batches (the only GPU stage)."""
from __future__ import annotations

import asyncio
import os
from typing import Optional

import numpy as np
from ray import serve

from configs.schema import DecodeConfig, ModelConfig
from deployments.metrics import EmbedderMetrics
from embedding.copies import perceptual_hash
from embedding.decode import ImageDecodeError


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, max_queued_requests=128)
class Embedder:
    """Holds one model; `embed_image` decodes one upload, batching happens across concurrent requests."""

    def __init__(self, model: dict, decode: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
                 threads: Optional[int] = None, max_concurrent_decodes: int = 4):
        from embedding.embedder import Embedder as Model

        # Ray pins OMP_NUM_THREADS to the replica's fractional CPU reservation (1 thread); a CPU
        # embedder is the one stage that needs the whole host to keep up with the shards.
        self.model = Model(ModelConfig(**model), DecodeConfig(**decode), threads=threads or os.cpu_count() or 1)
        # Each decode may hold up to decode.max_pixels x 3 bytes (and a copy while converting):
        # a bound on how many run at once is a bound on the replica's memory.
        self.decodes = asyncio.Semaphore(max_concurrent_decodes)
        self.metrics = EmbedderMetrics()
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings can change at runtime through the deployment's user_config."""
        if "max_batch_size" in user_config:
            self._embed_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._embed_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, items: list[tuple[np.ndarray, bool]]) -> list[np.ndarray]:
        self.metrics.batch.observe(len(items))
        pixels, for_index = np.stack([p for p, _ in items]), np.array([i for _, i in items])
        # The forward pass runs in a thread so the replica keeps accepting requests into the next batch.
        vectors = await asyncio.to_thread(self.model.embed_pixels, pixels, for_index)
        return list(vectors)

    def _prepare(self, data: bytes) -> tuple[np.ndarray, int]:
        pixels = self.model.prepare(data)
        return pixels, perceptual_hash(pixels)

    async def embed_image(self, data: bytes, for_index: bool = False) -> dict:
        """{"vector": (D,) float32, "phash": int} or {"error": code, "message": text} for an
        undecodable upload: a query's vector, or with `for_index` that of an image being written
        (model.index_views). The hash is taken from the pixels the model sees, as a build does."""
        try:
            async with self.decodes:
                pixels, phash = await asyncio.to_thread(self._prepare, data)
        except ImageDecodeError as e:
            return {"error": e.code, "message": str(e)}
        return {"vector": await self._embed_batch((pixels, for_index)), "phash": phash}
