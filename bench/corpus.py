"""The corpus jobs measured (`python -m bench corpus` and `python -m bench corpus-scaling`).

corpus: `python -m indexing search` against the HTTP path on the same machine in the same run.
  Queries are mildly edited copies (evaluation.edits.MILD_EDITS) of the --images photos, the index
  holds the photos. The job runs first, with the machine to itself; then the service is deployed
  on the same index and wrk (bench/wrk.py) posts the same query files to `POST /search` at rising
  concurrency; the best level is the HTTP path's throughput. Both unverified (the job's default,
  `?verify=false`). One more pass over HTTP collects each query's top-1 to compare with the job's.
corpus-scaling: `python -m indexing copy-groups` on synthetic vectors with planted near-copies
  (vectors only: no images, no hashes) on a `ray.cluster_utils.Cluster` with 1 and then 2 worker
  nodes, each node's processes held to a core of their own, timed per job, with the vectors each
  node searched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from bench import wrk
from bench.common import markdown_table, write_results


def edited_queries(images: str, out: str, n: int, edits: list[dict]) -> list[str]:
    """Write each of `edits` of the first n photos under `images` into `out`; their paths."""
    from evaluation.edits import edited_copy
    from indexing.storage import list_files

    os.makedirs(out, exist_ok=True)
    paths = []
    for i, (f, _) in enumerate(list(list_files(images, (".jpg", ".jpeg", ".png")))[:n]):
        for e, edit in enumerate(edits):
            dst = os.path.join(out, f"{i:06d}-{e}.jpg")
            if not os.path.exists(dst):
                with open(f, "rb") as src:
                    data = edited_copy(src.read(), **edit)
                with open(dst, "wb") as w:
                    w.write(data)
            paths.append(dst)
    return paths


def timed_job(queries: str, index: str, out: str) -> dict:
    """`python -m indexing search` (in this process's Ray) over a folder: its summary."""
    import pyarrow.parquet as pq

    from configs.schema import load_config
    from indexing.bulksearch import bulk_search

    s = bulk_search(queries, index, out, load_config(), k=10)
    top1 = {r["query_uri"]: r["id"] for r in pq.read_table(os.path.join(out, "results.parquet")).to_pylist()
            if r["rank"] == 1}
    return {"images": s.queries, "seconds": round(s.seconds, 1), "images_per_s": round(s.queries / s.seconds, 1),
            "first_answers_s": round(s.first_s, 1),
            # The rate once running: the queries answered after the first answers, over the time since.
            "after_first_images_per_s": round((s.queries - s.first_n) / max(s.seconds - s.first_s, 1e-9), 1),
            "line": s.line(), "top1": top1}


def bench_bulk(images: str, work: str, serve, n: int, levels=(1, 2, 4, 8, 16), seconds: float = 10) -> dict:
    """Images/s of the bulk job (on n mildly edited copies, and on 4n: four edits each, so start-up
    weighs less) and of the HTTP path at its best concurrency, and how often their top-1 agree.
    `serve(index_dir)` deploys the service and returns its URL."""
    import httpx
    from ray import serve as ray_serve

    from bench.indexing_speed import sample_folder
    from evaluation.edits import COPY_EDITS, MILD_EDITS
    from indexing.__main__ import main as indexing_main

    photos, index = os.path.join(work, "corpus-photos"), os.path.join(work, "corpus-index")
    sample_folder(images, photos, n)
    if not os.path.exists(os.path.join(index, "manifest.json")):
        assert indexing_main(["build", "--images", photos, "--index-dir", index, "--shards", "2"]) == 0
    queries = edited_queries(photos, os.path.join(work, "corpus-queries"), n, [MILD_EDITS])
    jobs = [timed_job(os.path.dirname(queries[0]), index, os.path.join(work, "corpus-search"))]
    more = edited_queries(photos, os.path.join(work, "corpus-queries-4x"), n, list(COPY_EDITS.values()))
    jobs.append(timed_job(os.path.dirname(more[0]), index, os.path.join(work, "corpus-search-4x")))
    url = serve(index)
    blobs = [open(q, "rb").read() for q in queries]
    path = "/search?k=10&verify=false"
    http_top1 = {}
    with httpx.Client(base_url=url, timeout=60) as client:  # also warms every replica up
        for q, b in zip(queries, blobs):
            r = client.post(path, content=b, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            hits = r.json()["results"]
            http_top1[q] = hits[0]["id"] if hits else None
    bodies = wrk.write_bodies(work, "corpus-queries", path, "image/jpeg", blobs)
    rows = []
    for c in levels:
        wrk.settle()
        rows.append(wrk.run(url, bodies, c, seconds))
    ray_serve.shutdown()
    best = max(rows, key=lambda r: r["qps"] if r["errors"] == 0 else 0)
    same = sum(jobs[0]["top1"].get(q) == http_top1[q] for q in queries)
    for j in jobs:
        j.pop("top1")
        j["ratio"] = round(j["images_per_s"] / best["qps"], 2)
        j["ratio_after_first"] = round(j["after_first_images_per_s"] / best["qps"], 2)
    return {"images": n, "index_shards": 2, "jobs": jobs,
            "http_levels": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
            "http_best": {"concurrency": best["concurrency"], "images_per_s": round(best["qps"], 1)},
            "ratio": jobs[0]["ratio"], "top1_identical": round(same / len(queries), 4)}


def planted_vectors(n: int, copies: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n clustered unit vectors of which `copies` are near-copies (cosine about 0.99) of others:
    (vectors, for each planted copy its source's row)."""
    from bench.vectors import synthetic

    rng = np.random.default_rng(seed)
    x = synthetic(n - copies, dim=dim, queries=1, seed=seed).base
    src = rng.choice(len(x), copies, replace=False)
    near = x[src] + 0.006 * rng.standard_normal((copies, dim)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    return np.concatenate([x, near]), src


def bench_scaling(work: str, n: int, copies: int, dim: int = 256, shards: int = 4, workers=(1, 2)) -> dict:
    """copy-groups on `n` vectors (`copies` planted) on 1 and 2 worker nodes of one Ray Cluster each."""
    import ray
    from ray.cluster_utils import Cluster

    import pyarrow.parquet as pq

    from indexing.__main__ import main as indexing_main

    index = os.path.join(work, f"planted-{n // 1000}k")
    x, src = planted_vectors(n, copies, dim)
    if not os.path.exists(os.path.join(index, "manifest.json")):
        np.save(os.path.join(work, "planted.npy"), x)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        try:
            assert indexing_main(["build", "--vectors", os.path.join(work, "planted.npy"), "--index-dir", index,
                                  "--shards", str(shards)]) == 0
        finally:
            ray.shutdown()
    planted = {(int(s), int(n - copies + i)) for i, s in enumerate(src)}
    rows = []
    for w in workers:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        cores = sorted(os.sched_getaffinity(0))
        try:
            for i in range(w):
                # Each worker "node" gets a core of its own: its raylet, and every worker it forks,
                # inherit this affinity. Without it both nodes share every core of this machine,
                # and one node alone would already use them all.
                os.sched_setaffinity(0, {cores[i % len(cores)]})
                cluster.add_node(num_cpus=1)
        finally:
            os.sched_setaffinity(0, cores)
        config = os.path.join(work, f"scaling-{w}.yaml")
        with open(config, "w") as f:
            # The planted copies are each other's nearest vectors: 10 neighbours are plenty.
            f.write(f"corpus:\n  neighbours: 10\n  search_actors: {w}\n  search_actor_cpus: 0.4\n  reader_cpus: 0.1\n")
        out = os.path.join(work, f"scaling-{w}")
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "indexing", "copy-groups", "--index-dir", index, "--out", out,
                                "--config", config, "--address", cluster.address], capture_output=True, text=True)
        finally:
            cluster.shutdown()
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError(f"copy-groups failed on {w} workers: {p.stderr[-2000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        g = pq.read_table(os.path.join(out, "groups.parquet"), columns=["group", "id"]).to_pydict()
        group = dict(zip(g["id"], g["group"]))
        found = sum(a in group and group.get(a) == group.get(b) for a, b in planted)
        rows.append({"workers": w, "job_s": round(summary["seconds"], 1), "wall_s": round(wall, 1),
                     "vectors": summary["images"], "groups": summary["groups"],
                     "planted_pairs_found": round(found / len(planted), 4),
                     "searched_per_node": sorted(summary["searched_per_node"].values(), reverse=True)})
    return {"vectors": n, "planted": copies, "dim": dim, "shards": shards, "rows": rows,
            "speedup": round(rows[0]["job_s"] / rows[-1]["job_s"], 2) if len(rows) > 1 else None}


def write(out: str, name: str, payload: dict) -> str:
    """JSON + markdown table of either benchmark; returns the table."""
    if "rows" in payload:
        table = markdown_table([{**r, "searched_per_node": " / ".join(map(str, r["searched_per_node"]))}
                                for r in payload["rows"]],
                               ["workers", "job_s", "wall_s", "vectors", "groups", "planted_pairs_found",
                                "searched_per_node"])
    else:
        rows = [{"path": f"python -m indexing search, {j['images']} images", "concurrency": "-",
                 "images_per_s": j["images_per_s"], "after_first": j["after_first_images_per_s"],
                 "vs_best_http": j["ratio"]} for j in payload["jobs"]]
        rows += [{"path": "POST /search?verify=false (wrk)", "concurrency": r["concurrency"],
                  "images_per_s": round(r["qps"], 1), "vs_best_http": round(r["qps"] / payload["http_best"]["images_per_s"], 2)}
                 for r in payload["http_levels"]]
        table = markdown_table(rows, ["path", "concurrency", "images_per_s", "after_first", "vs_best_http"]) + \
            f"\n\ntop-1 identical (job vs HTTP, {payload['images']} queries): {payload['top1_identical']}\n"
    write_results(out, name, payload, table)
    return table


def plot(payload: dict, path: str) -> None:
    """A bar chart: images/s per path (corpus), or seconds per job per worker count (scaling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    if "rows" in payload:
        ax.bar([f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in payload["rows"]],
               [r["job_s"] for r in payload["rows"]], color="tab:blue")
        ax.set_ylabel("seconds per copy-groups job")
        ax.set_title(f"copy-groups, {payload['vectors'] // 1000}k vectors, {payload['shards']} shards")
    else:
        labels = [f"job, {j['images']}" for j in payload["jobs"]] + [f"HTTP c={r['concurrency']}"
                                                                     for r in payload["http_levels"]]
        values = [j["images_per_s"] for j in payload["jobs"]] + [r["qps"] for r in payload["http_levels"]]
        ax.bar(labels, values, color=["tab:green"] * len(payload["jobs"]) + ["tab:gray"] * len(payload["http_levels"]))
        ax.set_ylabel("query images / s")
        ax.set_title(f"{payload['images']} query images, unverified")
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
