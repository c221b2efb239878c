"""The evaluation job: judged queries -> ranked lists (in-process or over HTTP) -> metrics."""
from __future__ import annotations

import csv
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from configs.schema import AppConfig, ModelConfig
from evaluation.metrics import average_precision, ndcg_at_k, precision_at_k, recall_at_k, reciprocal_rank

LOG = logging.getLogger(__name__)

# A searcher maps query paths (relative to the root) to ranked database paths, best first.
Searcher = Callable[[Sequence[str], int], list[list[str]]]


@dataclass
class Judgements:
    """Queries, the database they search, and each query's relevant database items."""

    queries: list[str]
    database: list[str]
    relevant: dict[str, set[str]]
    exclude_self: bool = False
    protocol: str = ""
    meta: dict = field(default_factory=dict)


def read_csv(path: str, header: Sequence[str]) -> list[list[str]]:
    """The rows of a CSV whose first row must start with `header`: a file without it would
    silently lose its first row as one, so it is refused, naming the header it needs."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if not rows or [c.strip() for c in rows[0][: len(header)]] != list(header):
        got = ",".join(rows[0]) if rows else "an empty file"
        raise ValueError(f"{path}: the first row must be the header {','.join(header)} (got {got!r})")
    if len(rows) < 2:
        raise ValueError(f"{path}: a header and no rows")
    return rows[1:]


def category_judgements(labels_csv: str, queries_list: Optional[str] = None) -> Judgements:
    """`path,category` rows, leave-one-out: every image (or each one `queries_list` names, one path
    per line) queries all the others; same category is relevant."""
    rows = read_csv(labels_csv, ("path", "category"))
    if any(len(r) < 2 for r in rows):
        raise ValueError(f"{labels_csv}: every row needs path,category")
    queries = None
    if queries_list:
        with open(queries_list) as f:
            queries = [line.strip() for line in f if line.strip()]
        unknown = sorted(set(queries) - {r[0] for r in rows})
        if unknown:
            raise ValueError(f"{queries_list}: {len(unknown)} queries are not in {labels_csv}, e.g. {unknown[0]}")
    return labelled_judgements([(r[0], r[1]) for r in rows], queries)


def labelled_judgements(rows: Sequence[tuple[str, str]], queries: Optional[Sequence[str]] = None) -> Judgements:
    """(path, category) pairs, leave-one-out: each query (default: every image) searches all the
    images, itself left out; the others of its category are relevant."""
    by_cat: dict[str, set[str]] = {}
    for path, cat in rows:
        by_cat.setdefault(cat, set()).add(path)
    category = dict(rows)
    paths = [p for p, _ in rows]
    queries = list(queries) if queries is not None else paths
    relevant = {q: by_cat[category[q]] - {q} for q in queries}
    return Judgements(queries, paths, relevant, exclude_self=True, protocol="category leave-one-out",
                      meta={"categories": len(by_cat)})


def pair_judgements(pairs_csv: str, database_list: Optional[str] = None) -> Judgements:
    """`query,relevant` rows after a header starting with `query` (instance level). The database is `database_list` (one path per line)
    or, by default, every image named as relevant."""
    rows = read_csv(pairs_csv, ("query",))  # then the relevant image (e.g. relevant_model)
    relevant: dict[str, set[str]] = {}
    for q, r, *_ in rows:
        relevant.setdefault(q, set()).add(r)
    if database_list:
        with open(database_list) as f:
            database = [l.strip() for l in f if l.strip()]
    else:
        database = sorted({r for rs in relevant.values() for r in rs})
    return Judgements(sorted(relevant), database, relevant, protocol="instance pairs")


def score(judged: Judgements, ranked: list[list[str]], k: int, recall_ks: Sequence[int]) -> dict:
    """Mean nDCG@k, P@k, mAP, recall@k' and MRR over queries with at least one relevant item."""
    per = {f"ndcg@{k}": [], f"p@{k}": [], "map": [], "mrr": [], **{f"recall@{r}": [] for r in recall_ks}}
    for q, lst in zip(judged.queries, ranked):
        rel_set = judged.relevant.get(q, set())
        if not rel_set:
            continue
        rel = [1.0 if p in rel_set else 0.0 for p in lst]
        per[f"ndcg@{k}"].append(ndcg_at_k(rel, k, ideal=[1.0] * len(rel_set)))
        per[f"p@{k}"].append(precision_at_k(rel, k))
        per["map"].append(average_precision(rel, len(rel_set)))
        per["mrr"].append(reciprocal_rank(rel))
        for r in recall_ks:
            per[f"recall@{r}"].append(recall_at_k(rel, r, len(rel_set)))
    out = {name: float(np.mean(v)) if v else float("nan") for name, v in per.items()}
    out["queries"] = len(per["map"])
    return out


def in_process_searcher(
    root: str, database: list[str], cfg: AppConfig, factory: Optional[str], shards: int = 1
) -> tuple[Searcher, str]:
    """Embed the database, index it with the project's build (a temporary index dir, removed once
    loaded), search it through ShardedIndex and rank the hits with the service's policy (copies
    collapse: `serve.near_duplicate_bits`), so the numbers are what the service would return.
    Returns the searcher and the factory the build chose."""
    import hashlib

    from embedding.copies import perceptual_hash
    from embedding.embedder import Embedder
    from indexing import ShardedIndex
    from indexing.build import build_from_vectors
    from indexing.ids import id_from_path
    from indexing.policy import rank_results

    emb = Embedder(cfg.model, cfg.decode)
    t0 = time.time()
    x = np.empty((len(database), emb.dim), np.float32)
    ids = np.array([id_from_path(p) for p in database], np.int64)
    meta = {}
    for s in range(0, len(database), 64):
        blobs = read_images(root, database[s : s + 64])
        pixels = np.stack([emb.prepare(b) for b in blobs])
        x[s : s + len(blobs)] = emb.embed_pixels(pixels, for_index=True)
        for i, path, data, px in zip(ids[s:].tolist(), database[s:], blobs, pixels):
            meta[i] = (path, hashlib.sha256(data).hexdigest(), perceptual_hash(px))
    LOG.info("embedded %d database images in %.1f s", len(database), time.time() - t0)
    with tempfile.TemporaryDirectory(prefix="eval-index-") as tmp:
        # Built by the service's own build, then held in memory: its files are not needed after.
        build_from_vectors(x, ids, tmp, cfg, shards, factory)
        ix = ShardedIndex.open(tmp)
    # A query is embedded whole, as the service embeds an upload: an indexed image's own vector
    # (with model.index_views) is not the vector its bytes get as a query.
    cache = {} if cfg.model.index_views else dict(zip(database, x))
    shas = {path: sha for path, sha, _ in meta.values()}

    def search(queries: Sequence[str], depth: int) -> list[list[str]]:
        missing = [q for q in queries if q not in cache]
        if missing:
            cache.update(zip(missing, embed_paths(emb, root, missing)))
        q = np.stack([cache[p] for p in queries])
        D, I = ix.search(q, min(depth * cfg.serve.dedupe_fetch_factor, ix.ntotal))
        # As the service ranks an image search: the query's own bytes, where indexed, lead its copies.
        rows, _ = rank_results(D, I, depth, meta, copy_bits=cfg.serve.near_duplicate_bits,
                               query_sha256=[shas.get(p) for p in queries])
        return [[r["uri"] for r in row] for row in rows]

    return search, ix.manifest.factory


def service_searcher(root: str, url: str, token: Optional[str] = None, params: str = "") -> Searcher:
    """Send each query image to a running service (with a bearer token when it needs one, and the
    query-string `params`, e.g. "verify=false"); results map back to paths through their uri."""
    import httpx

    root_abs = os.path.abspath(root)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=url.rstrip("/"), timeout=120, headers=headers)

    def rel(uri: str) -> str:
        return os.path.relpath(uri.split("://", 1)[-1], root_abs)

    def search(queries: Sequence[str], depth: int) -> list[list[str]]:
        out = []
        for data in read_images(root, queries):
            r = client.post(f"/search?k={min(depth, 1000)}" + (f"&{params}" if params else ""), content=data,
                            headers={"content-type": "application/octet-stream"})
            if r.status_code != 200:
                raise ValueError(f"{url} answered {r.status_code} to a search: {r.text[:500]}")
            # An image written without a uri cannot be a labelled one: it counts as a miss.
            out.append([rel(h["uri"]) if h["uri"] else f"<id {h['id']}>" for h in r.json()["results"]])
        return out

    return search


def read_images(root: str, paths: Sequence[str]) -> list[bytes]:
    """The bytes of image files named relative to root."""
    out = []
    for p in paths:
        try:
            with open(os.path.join(root, p), "rb") as f:
                out.append(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"{os.path.join(root, p)} does not exist: paths in the CSV are relative to "
                                    "--root (default: the CSV's folder)") from None
    return out


def embed_paths(emb, root: str, paths: Sequence[str], batch: int = 64) -> np.ndarray:
    """Embed image files under root, in batches."""
    return np.concatenate([emb.embed_bytes(read_images(root, paths[s : s + batch])) for s in range(0, len(paths), batch)])


def run_evaluation(judged: Judgements, search: Searcher, k: int = 10, recall_ks: Sequence[int] = (1, 5, 10),
                   depth: Optional[int] = None) -> dict:
    """Rank every query to `depth` (default: the whole database, for exact mAP) and score it."""
    depth = depth or len(judged.database)
    t0 = time.time()
    ranked = search(judged.queries, depth + (1 if judged.exclude_self else 0))
    if judged.exclude_self:
        ranked = [[p for p in lst if p != q][:depth] for q, lst in zip(judged.queries, ranked)]
    database = set(judged.database)
    if ranked and not any(p in database for lst in ranked for p in lst):
        raise ValueError(f"none of the {sum(map(len, ranked))} results is one of the {len(database)} labelled images: "
                         "the index holds other images, or its uris do not resolve under --root")
    result = score(judged, ranked, k, recall_ks)
    result.update(protocol=judged.protocol, database=len(judged.database), depth=depth,
                  seconds=round(time.time() - t0, 2), **judged.meta)
    return result


def model_summary(cfg: ModelConfig) -> dict:
    """The model settings a report should name."""
    return {"name": cfg.name, "weights": cfg.weights, "image_size": cfg.image_size, "pooling": cfg.pooling}
