"""Benchmark vector sets: real image embeddings and synthetic clustered vectors, with exact
ground truth. Every engine gets the same base vectors, the same queries and the same k."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np

LOG = logging.getLogger(__name__)


@dataclass
class VectorSet:
    name: str
    base: np.ndarray       # (n, d) float32, L2-normalised
    queries: np.ndarray    # (q, d), not in base
    truth: np.ndarray      # (q, k) exact inner-product top-k ids (row numbers of base)

    @property
    def dim(self) -> int:
        return self.base.shape[1]


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product neighbours with a flat index (ids are row numbers)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, k)[1]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def synthetic(n: int, dim: int = 128, queries: int = 500, k: int = 10, seed: int = 0) -> VectorSet:
    """A Gaussian mixture on the sphere (clustered like real embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, n // 1000), dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        return _normalise(centers[rng.integers(0, len(centers), m)] + 0.35 * rng.standard_normal((m, dim)).astype(np.float32))

    base, q = draw(n), draw(queries)
    return VectorSet(f"synthetic-{n // 1000}k-d{dim}", base, q, exact_topk(base, q, k))


def real_embeddings(images: str, cache_dir: str, views: int, queries: int = 200, k: int = 10, seed: int = 0) -> VectorSet:
    """EfficientNet-Lite0 embeddings of a folder of photos, plus `views - 1` augmented views of each
    (more real vectors from the same photos); cached as .npy. Queries are held-out photos."""
    from evaluation.codecs import embed_with_views
    from indexing.storage import list_files

    path = os.path.join(cache_dir, f"real-{os.path.basename(os.path.normpath(images))}-x{views}.npy")
    if not os.path.exists(path):
        t0 = time.time()
        paths = [rel for _, rel in list_files(images, (".jpg", ".jpeg", ".png"))]
        out = [embed_with_views(images, paths, views, seed)]
        os.makedirs(cache_dir, exist_ok=True)
        np.save(path, np.concatenate(out))
        LOG.info("embedded %d photos x %d views in %.0f s", len(paths), views, time.time() - t0)
    x = np.load(path)
    rng = np.random.default_rng(seed)
    n_photos = len(x) // views
    held = rng.choice(n_photos, queries, replace=False)
    mask = np.ones(len(x), bool)
    for v in range(views):  # a held-out photo leaves the base with all its views
        mask[held + v * n_photos] = False
    base, q = _normalise(x[mask]), _normalise(x[held])
    return VectorSet(f"real-{n_photos}photos-x{views}-d{x.shape[1]}", base, q, exact_topk(base, q, k))


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k found in the returned top-k."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))
