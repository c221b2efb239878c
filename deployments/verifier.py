"""Verifier deployment: geometric verification of an image search's shortlist.

The Ingress sends it the query's bytes and its top candidates; it matches local features of the
query against each candidate's own image (embedding.local_features) and answers how many
inliers each has. It runs on CPUs of its own (feature extraction is the costly part), keeps the
candidates' features in memory, and stops at its time budget: candidates it did not reach are
simply not verified."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ray import serve

from configs.schema import DecodeConfig
from embedding.decode import ImageDecodeError
from embedding.local_features import Features, features_of, inliers
from indexing import storage
from indexing.catalog import sha_key


class FeatureCache:
    """Least-recently-used features, bounded by their bytes; keyed by uri and content hash, so a
    replaced image is never verified against its old features."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, Features] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Optional[Features]:
        with self._lock:
            f = self._items.get(key)
            if f is not None:
                self._items.move_to_end(key)
            return f

    def put(self, key: tuple, f: Features) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = f
            self.bytes += f.nbytes
            while self.bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=8, max_queued_requests=32)
class Verifier:
    def __init__(self, decode: dict, cache_bytes: int = 256 * 1024 * 1024, threads: int = 2):
        self.decode = DecodeConfig(**decode)
        self.cache = FeatureCache(cache_bytes)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="verify")

    def _candidate(self, c: dict, roots: list[str]) -> Optional[Features]:
        key = (c["uri"], c["sha64"])
        f = self.cache.get(key)
        if f is None:
            try:
                data = storage.read_source(c["uri"], roots, lambda d: sha_key(_sha256(d)) == c["sha64"])
                f = features_of(data, max_bytes=self.decode.max_bytes, max_pixels=self.decode.max_pixels)
            except (storage.SourceUnavailable, ImageDecodeError):
                return None  # not verifiable: it keeps its place
            self.cache.put(key, f)
        return f

    def _verify(self, query: bytes, candidates: list[dict], roots: list[str], deadline: float) -> dict:
        fq = features_of(query, max_bytes=self.decode.max_bytes, max_pixels=self.decode.max_pixels)

        def one(c: dict) -> Optional[int]:
            if time.monotonic() > deadline:
                return None
            f = self._candidate(c, roots)
            return None if f is None or time.monotonic() > deadline else inliers(fq, f)

        scores = list(self.pool.map(one, candidates))
        return {c["id"]: s for c, s in zip(candidates, scores) if s is not None}

    async def verify(self, query: bytes, candidates: list[dict], roots: list[str], budget_s: float) -> dict:
        """{candidate id: inliers} for the candidates ({"id", "uri", "sha64"}) verified within
        `budget_s`, read only from under `roots`."""
        deadline = time.monotonic() + budget_s
        try:
            return await asyncio.to_thread(self._verify, query, candidates, roots, deadline)
        except ImageDecodeError:
            return {}


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
