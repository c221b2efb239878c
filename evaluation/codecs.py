"""Retrieval quality per byte: what each FAISS factory keeps of the ranking, against its code size.

Recall against exact search is the wrong yardstick for choosing a compressed index: a projection
that "loses" neighbours can rank categories better. So each factory is judged by what a user gets:
nDCG@10 and mAP (leave-one-out over labelled photos) and near-duplicate recall@1 (an edited copy
finds its original), searched inside the IVF at the default nprobe, next to exact float search.
The template trains on the photos plus augmented views of each (PQ needs thousands of vectors).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import faiss
import numpy as np

from evaluation.run import Judgements, score

LOG = logging.getLogger(__name__)

FACTORIES = (
    "Flat", "IVF{nlist},SQ8", "PCA256,IVF{nlist},SQ8", "PCA128,IVF{nlist},SQ8", "PCA64,IVF{nlist},SQ8",
    "PCA128,IVF{nlist},SQ4", "IVF{nlist},PQ64", "OPQ64_256,IVF{nlist},PQ64",
)


def embed_with_views(root: str, paths: Sequence[str], views: int, seed: int = 0, emb=None) -> np.ndarray:
    """(views * n, d) embeddings: the photos, then `views - 1` rounds of random augmented views of
    each (the training augmentations: crops, flips, colour), in the order of `paths`, by `emb`
    (default: a new Embedder of the default model)."""
    import torch

    from training.augment import source_size, view_transform, views as random_views
    from embedding.embedder import Embedder
    from training.train import preload
    from evaluation.run import embed_paths

    emb = emb or Embedder()
    out = [embed_paths(emb, root, list(paths))]
    if views > 1:
        big = preload(root, list(paths), source_size(emb.cfg.image_size), emb.decode_cfg)
        torch.manual_seed(seed)
        transform = view_transform(emb.cfg.image_size)
        for _ in range(views - 1):
            out.append(emb.embed_pixels(random_views(big, range(len(big)), transform).numpy()))
    return np.concatenate(out)


def embed_study(root: str, paths: Sequence[str], views: int, edit: dict, cache_dir: str) -> dict[str, np.ndarray]:
    """Photos, their views and one edited copy of each, embedded once and cached as .npz."""
    from embedding.embedder import Embedder
    from evaluation.edits import edited_copy
    from evaluation.run import read_images

    tag = "-".join(f"{k}{v}" for k, v in sorted(edit.items()))
    path = os.path.join(cache_dir, f"codecs-{len(paths)}-x{views}-{tag}.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    t0 = time.time()
    emb = Embedder()  # one model for photos, views and copies
    x = embed_with_views(root, paths, views, emb=emb)
    n = len(paths)
    edited = emb.embed_bytes([edited_copy(d, **edit) for d in read_images(root, list(paths))])
    out = {"photos": x[:n], "views": x[n:], "edited": edited}
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, **out)
    LOG.info("embedded %d photos, %d views and %d edited copies in %.0f s", n, len(x) - n, n, time.time() - t0)
    return out


def code_bytes(index: faiss.Index) -> int:
    """Bytes one vector's code takes in `index`, plus its 8-byte id."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.code_size) + 8
    inner = faiss.downcast_index(index)
    inner = faiss.downcast_index(inner.index) if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)) else inner
    return int(inner.code_size) + 8


def codec_quality(judged: Judgements, paths: Sequence[str], study: dict, factory: str, nprobe: int,
                  k: int = 10) -> dict:
    """Bytes per vector, nDCG@k, mAP and near-duplicate recall@1 of one factory (placeholders
    filled as `indexing build` would for this corpus)."""
    from configs.schema import IndexConfig
    from indexing.shards import add_to_shard, make_template, search_shard
    from indexing.template import choose_factory

    x, train = study["photos"], np.concatenate([study["photos"], study["views"]])
    concrete = choose_factory(IndexConfig(), len(x), x.shape[1], len(train), factory)
    t0 = time.time()
    index = make_template(concrete, x.shape[1], "ip", train)
    add_to_shard(index, np.arange(len(x)), x)
    _, I = search_shard(index, x, len(x), nprobe)  # the whole ranking the index gives: mAP needs depth
    ranked = [[paths[j] for j in row if 0 <= j != q] for q, row in enumerate(I)]
    by_query = dict(zip(paths, ranked))
    quality = score(judged, [by_query[q] for q in judged.queries], k, [1, 10])
    _, top = search_shard(index, study["edited"], 1, nprobe)
    return {"factory": concrete, "bytes_per_vector": code_bytes(index), f"ndcg@{k}": quality[f"ndcg@{k}"],
            "map": quality["map"], "near_dup_recall@1": float((top[:, 0] == np.arange(len(x))).mean()),
            "seconds": round(time.time() - t0, 1)}
