"""ANN quality of a built index: recall@1/10/100 against exact search on its stored embeddings,
swept over nprobe, with queries per second."""
from __future__ import annotations

import time
from typing import Sequence

import faiss
import numpy as np

from indexing import ShardedIndex, storage
from indexing.build import arrow_to_vectors, read_embeddings

RECALL_KS = (1, 10, 100)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Ground-truth ids (row numbers of x) by brute force."""
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index.search(q, k)[1]


def recall_at(ann: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k."""
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(ann, exact)]))


def ann_sweep(index_dir: str, nprobes: Sequence[int], num_queries: int = 1000, seed: int = 0) -> dict:
    """Recall and QPS of ShardedIndex.search at each nprobe, queries drawn from the indexed vectors."""
    ix = ShardedIndex.open(index_dir)
    t = read_embeddings(storage.join(index_dir, ix.manifest.embeddings))
    x, ids = arrow_to_vectors(t.column("embedding")), t.column("id").to_numpy()
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), min(num_queries, len(x)), replace=False)]
    kmax = min(max(RECALL_KS), len(x))
    exact = ids[exact_topk(x, q, kmax, ix.manifest.metric)]
    rows = []
    for nprobe in nprobes:
        ix.search(q[:10], kmax, nprobe)  # warm up
        t0 = time.perf_counter()
        _, I = ix.search(q, kmax, nprobe)
        secs = time.perf_counter() - t0
        row = {"nprobe": nprobe, "qps": len(q) / secs}
        row.update({f"recall@{k}": recall_at(I, exact, k) for k in RECALL_KS if k <= kmax})
        rows.append(row)
    code = ix.shards[0].sa_code_size() if hasattr(ix.shards[0], "sa_code_size") else None
    return {"index_dir": index_dir, "factory": ix.manifest.factory, "ntotal": ix.ntotal, "dim": ix.dim,
            "default_nprobe": ix.manifest.nprobe, "queries": len(q), "code_bytes_per_vector": code,
            "rows": rows}


def plot_sweep(result: dict, path: str) -> None:
    """Recall@10 against QPS, one point per nprobe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in RECALL_KS:
        key = f"recall@{k}"
        pts = [(r["qps"], r[key], r["nprobe"]) for r in result["rows"] if key in r]
        if pts:
            ax.plot([p[1] for p in pts], [p[0] for p in pts], marker="o", label=key)
    for r in result["rows"]:
        if "recall@10" in r:
            ax.annotate(f"nprobe {r['nprobe']}", (r["recall@10"], r["qps"]), fontsize=7)
    ax.set_xlabel("recall vs exact search")
    ax.set_ylabel("queries per second")
    ax.set_yscale("log")
    ax.set_title(f"{result['factory']}, {result['ntotal']} vectors")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
