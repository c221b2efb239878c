"""Verifier deployment: geometric verification of an image search's shortlist.

The Ingress sends it the query's bytes and its top candidates; it matches local features of the
query against each candidate's own image (embedding.local_features) and answers, for each, how
many inliers one transform explains and how much of the two pictures they cover. It runs on CPUs
of its own (feature extraction is the costly part), keeps the candidates' features in memory, and
stops at its time budget: candidates it did not reach are simply not verified."""
from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import cv2
from ray import serve

from configs.schema import DecodeConfig
from embedding.decode import ImageDecodeError
from deployments.cache import BytesLRU
from embedding.local_features import Features, features_of, match
from indexing import storage
from indexing.catalog import sha_key


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=8, max_queued_requests=32)
class Verifier:
    def __init__(self, decode: dict, cache_bytes: int = 256 * 1024 * 1024, threads: int = 2):
        self.decode = DecodeConfig(**decode)
        # Keyed by uri and content hash: a replaced image is never verified against its old features.
        self.cache = BytesLRU(cache_bytes, size=lambda f: f.nbytes)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="verify")

    def _candidate(self, c: dict, roots: list[str]) -> Optional[Features]:
        key = (c["uri"], c["sha64"])
        f = self.cache.get(key)
        if f is None:
            try:
                data = storage.read_source(c["uri"], roots, lambda d: sha_key(hashlib.sha256(d).hexdigest()) == c["sha64"])
                f = features_of(data, max_bytes=self.decode.max_bytes, max_pixels=self.decode.max_pixels)
            except (storage.SourceUnavailable, ImageDecodeError, cv2.error):
                return None  # not verifiable: it keeps its place
            self.cache.put(key, f)
        return f

    def _verify(self, query: bytes, candidates: list[dict], roots: list[str], deadline: float) -> dict:
        fq = features_of(query, max_bytes=self.decode.max_bytes, max_pixels=self.decode.max_pixels, query=True)

        def one(c: dict) -> Optional[tuple[int, float]]:
            if time.monotonic() > deadline:
                return None
            f = self._candidate(c, roots)
            if f is None or time.monotonic() > deadline:
                return None
            m = match(fq, f)
            return m.inliers, m.coverage

        scores = list(self.pool.map(one, candidates))
        return {c["id"]: s for c, s in zip(candidates, scores) if s is not None}

    async def verify(self, query: bytes, candidates: list[dict], roots: list[str], budget_s: float) -> dict:
        """{candidate id: (inliers, coverage)} for the candidates ({"id", "uri", "sha64"}) verified within
        `budget_s`, read only from under `roots`."""
        deadline = time.monotonic() + budget_s
        try:
            return await asyncio.to_thread(self._verify, query, candidates, roots, deadline)
        except (ImageDecodeError, cv2.error):  # a query that cannot be verified is answered unverified
            return {}

