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
