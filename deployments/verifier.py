"""Verifier deployment: geometric verification of an image search's shortlist.

The Ingress sends it the query's bytes and its top candidates; it matches local features of the
query against each candidate's own image (indexing.verification) and answers, for each, how
many inliers one transform explains and how much of the two pictures they cover. It runs on CPUs
of its own (feature extraction is the costly part), keeps the candidates' features in memory, and
stops at its time budget: candidates it did not reach are simply not verified."""
from __future__ import annotations

import asyncio
import time

from ray import serve

from configs.schema import DecodeConfig
from indexing.verification import CandidateVerifier


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=8, max_queued_requests=32)
class Verifier:
    def __init__(self, decode: dict, cache_bytes: int = 256 * 1024 * 1024, threads: int = 2):
        self.verifier = CandidateVerifier(DecodeConfig(**decode), cache_bytes, threads)

    async def verify(self, query: bytes, candidates: list[dict], roots: list[str], budget_s: float) -> dict:
        """{candidate id: (inliers, coverage)} for the candidates ({"id", "uri", "sha64"}) verified within
        `budget_s`, read only from under `roots`."""
        deadline = time.monotonic() + budget_s
        return await asyncio.to_thread(self.verifier.verify, query, candidates, roots, deadline)
