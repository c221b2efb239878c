"""Geometric verification of candidates against a query (embedding.local_features), as the
search path and the corpus jobs both run it: the candidates' images are read only from the
folders the operator lets the service read and only while they still hold the indexed bytes;
their features are cached by (uri, sha256 prefix); several are matched at once in threads."""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import cv2

from configs.schema import DecodeConfig
from embedding.decode import ImageDecodeError
from embedding.local_features import Features, features_of, match
from indexing import storage
from indexing.cache import BytesLRU
from indexing.catalog import sha_key


def read_indexed(uri: str, sha64: int, roots: list[str]) -> bytes:
    """An indexed image's bytes, read only from under `roots` and only while they are still the
    bytes indexed (their sha256 prefix is `sha64`); raises storage.SourceUnavailable."""
    return storage.read_source(uri, roots, lambda d: sha_key(hashlib.sha256(d).hexdigest()) == sha64)


class CandidateVerifier:
    """Matches a query's local features against candidates ({"id", "uri", "sha64"})."""

    def __init__(self, decode: DecodeConfig, cache_bytes: int = 256 * 1024 * 1024, threads: int = 2):
        self.decode = decode
        # Keyed by uri and content hash: a replaced image is never verified against its old features.
        self.cache = BytesLRU(cache_bytes, size=lambda f: f.nbytes)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="verify")

    def query_features(self, data: bytes) -> Features:
        """The query's features (a small query enlarged); raises ImageDecodeError or cv2.error."""
        return features_of(data, max_bytes=self.decode.max_bytes, max_pixels=self.decode.max_pixels, query=True)

    def candidate(self, c: dict, roots: list[str]) -> Optional[Features]:
        """A candidate's features, or None when its image cannot be read or decoded."""
        key = (c["uri"], c["sha64"])
        f = self.cache.get(key)
        if f is None:
            try:
                data = read_indexed(c["uri"], c["sha64"], roots)
                f = features_of(data, max_bytes=self.decode.max_bytes, max_pixels=self.decode.max_pixels)
            except (storage.SourceUnavailable, ImageDecodeError, cv2.error):
                return None  # not verifiable: it keeps its place
            self.cache.put(key, f)
        return f

    def verify(self, query: bytes, candidates: list[dict], roots: list[str], deadline: float = float("inf")) -> dict:
        """{candidate id: (inliers, coverage)} for the candidates verified before `deadline`
        (time.monotonic()); an unreadable candidate is left out, an unreadable query answers {}."""
        try:
            fq = self.query_features(query)
        except (ImageDecodeError, cv2.error):  # a query that cannot be verified is answered unverified
            return {}

        def one(c: dict) -> Optional[tuple[int, float]]:
            if time.monotonic() > deadline:
                return None
            f = self.candidate(c, roots)
            if f is None or time.monotonic() > deadline:
                return None
            try:
                m = match(fq, f)
            except cv2.error:  # a degenerate pair is not verified; the others still are
                return None
            return m.inliers, m.coverage

        scores = list(self.pool.map(one, candidates))
        return {c["id"]: s for c, s in zip(candidates, scores) if s is not None}
