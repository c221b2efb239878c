"""The serving fast path over real HTTP: batched fan-out gives ShardedIndex's exact answers under
concurrency, overload gets a fast JSON 503, and the largest request is bounded."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson
import pytest

from indexing import ShardedIndex
from indexing.build import arrow_to_vectors, read_embeddings
from tests.conftest import slow_upload


@pytest.fixture(scope="module")
def vectors(image_index_dir):
    return arrow_to_vectors(read_embeddings(str(image_index_dir / "embeddings")).column("embedding"))


def test_64_mixed_concurrent_requests_equal_sharded_index(service, image_index_dir, vectors):
    ix = ShardedIndex.open(str(image_index_dir))
    rng = np.random.default_rng(5)
    reqs = []
    for i in range(64):
        n = int(rng.integers(1, 4))
        q = vectors[rng.integers(0, len(vectors), n)] + rng.normal(scale=0.02, size=(n, vectors.shape[1]))
        reqs.append((q.astype(np.float32), int(rng.choice([1, 3, 10, 25])), int(rng.choice([1, 8, 64]))))

    def ask(r):
        q, k, nprobe = r
        if len(q) == 1 and k % 2:  # half the single queries use the binary body
            resp = httpx.post(f"{service}/search/vector?k={k}&nprobe={nprobe}&dedupe=false", timeout=60,
                              content=q.astype("<f4").tobytes(), headers={"content-type": "application/octet-stream"})
            return resp.status_code, [[h["id"] for h in row] for row in resp.json()["results"]]
        resp = httpx.post(f"{service}/search/vector", timeout=60,
                          json={"vectors": q.tolist(), "k": k, "nprobe": nprobe, "dedupe": False})
        return resp.status_code, [[h["id"] for h in row] for row in resp.json()["results"]]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, reqs))
    for (q, k, nprobe), (status, got) in zip(reqs, answers):
        assert status == 200
        _, want = ix.search(q, k, nprobe=nprobe)
        assert got == want.tolist()


def test_overload_gets_fast_503_and_recovers(tight_front, vectors):
    body = orjson.dumps({"vectors": vectors[:16].tolist(), "k": 50, "dedupe": True})  # encoded once: a cheap client
    out = []

    def ask(_):
        r = httpx.post(f"{tight_front}/search/vector", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        out.append((r.status_code, r.json(), r.headers.get("retry-after")))

    with ThreadPoolExecutor(48) as pool:  # far more clients than the 2 admitted
        list(pool.map(ask, range(96)))
    refused = [o for o in out if o[0] == 503]
    accepted = [o for o in out if o[0] == 200]
    assert len(refused) + len(accepted) == len(out), {o[0] for o in out}
    assert refused and accepted
    assert all(o[1]["error"]["code"] == "overloaded" and o[2] for o in refused)
    assert all(len(o[1]["results"]) == 16 for o in accepted)

    # Refused at once, not after a queue: while two slow uploads hold both slots, every other
    # request is answered 503 at once; then the held ones still succeed.
    one = orjson.dumps({"vector": vectors[0].tolist(), "k": 3})
    held = [slow_upload(tight_front, one) for _ in range(2)]
    deadline = time.time() + 30  # until the held two reach the front's admission
    while httpx.post(f"{tight_front}/search/vector", content=one, headers={"content-type": "application/json"},
                     timeout=30).status_code != 503 and time.time() < deadline:
        time.sleep(0.05)
    t0, probes = time.perf_counter(), []
    for _ in range(5):
        r = httpx.post(f"{tight_front}/search/vector", content=one, headers={"content-type": "application/json"},
                       timeout=30)
        probes.append((r.status_code, r.json()["error"]["code"], time.perf_counter() - t0))
    assert [p[:2] for p in probes] == [(503, "overloaded")] * 5
    assert probes[-1][2] < 5.0
    for s in held:
        s.sendall(one[10:])
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()
    r = httpx.post(f"{tight_front}/search/vector", content=one, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200  # recovered alone


def test_largest_request_is_bounded_and_others_keep_flowing(service, vectors):
    big = {"vectors": np.repeat(vectors[:1], 256, axis=0).tolist(), "k": 1000, "nprobe": 1024}
    t = time.perf_counter()
    r = httpx.post(f"{service}/search/vector", json=big, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_much_work"
    assert time.perf_counter() - t < 5
    r = httpx.post(f"{service}/search/vector", json={**big, "nprobe": 1025, "k": 10}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_nprobe"

    stop, small = threading.Event(), []

    def others():
        while not stop.is_set():
            s = httpx.post(f"{service}/search/vector", json={"vector": vectors[1].tolist(), "k": 5}, timeout=30)
            small.append(s.status_code)

    thread = threading.Thread(target=others)
    thread.start()
    try:
        t = time.perf_counter()
        r = httpx.post(f"{service}/search/vector", json={**big, "k": 100}, timeout=60)  # at the limit: answered
        took = time.perf_counter() - t
    finally:
        stop.set()
        thread.join()
    assert r.status_code == 200 and len(r.json()["results"]) == 256 and took < 30
    assert small and all(s == 200 for s in small)


def test_a_read_only_service_says_how_to_enable_writes(tight_front):
    r = httpx.put(f"{tight_front}/images/1", content=b"x", headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "writes_disabled"
    assert "IMSEARCH_WRITE_TOKENS" in r.json()["error"]["message"]


def test_a_start_without_the_fast_paths_is_named(client):
    """`serve run` in a shell without the variables starts Serve at half the speed: the Ingress
    names the levers that are off (here none: the session started Ray the README's way), and
    `deployments env` prints the lines that turn them on."""
    import subprocess
    import sys

    from deployments import environment

    assert client.get("/stats").json()["fast_paths_off"] == []
    assert environment.off({}) == list(environment.LEVERS)
    lines = subprocess.run([sys.executable, "-m", "deployments", "env"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert environment.off(env) == []
