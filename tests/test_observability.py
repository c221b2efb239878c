"""Prometheus metrics: after real requests (searches, writes up to a compaction, an overload, a
partial answer), Ray's metrics endpoint has every metric of deployments/metrics.py, non-zero, and
every series the Grafana dashboard in cluster/ charts."""
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from indexing.ids import shard_of
from indexing.manifest import read_manifest
from tests.conftest import WRITE_TOKEN, shard_info, slow_upload
from tests.images import picture

AUTH = {"authorization": f"Bearer {WRITE_TOKEN}"}
# What an operator's dashboard needs, each found with a non-zero value: (family, required labels).
EXPECTED = [
    ("ray_imsearch_requests", {"route": "/search", "method": "POST", "status": "200"}),
    ("ray_imsearch_requests", {"route": "/images/{id}", "method": "PUT"}),
    ("ray_imsearch_request_seconds", {"route": "/search/vector"}),
    ("ray_imsearch_stage_seconds", {"stage": "decode_embed"}),
    ("ray_imsearch_stage_seconds", {"stage": "fanout"}),
    ("ray_imsearch_stage_seconds", {"stage": "shard_search"}),
    ("ray_imsearch_stage_seconds", {"stage": "merge_rank"}),
    ("ray_imsearch_partial_answers", {}),
    ("ray_imsearch_overload_refusals", {"route": "/search/vector"}),
    ("ray_imsearch_writes", {"op": "upsert"}),
    ("ray_imsearch_writes", {"op": "delete"}),
    ("ray_imsearch_shard_log_bytes", {"shard": "0"}),
    ("ray_imsearch_compactions", {"shard": "0"}),
    ("ray_imsearch_shard_vectors", {"shard": "0"}),
    ("ray_imsearch_embedder_batch_size", {}),
    ("ray_serve_num_http_requests", {}),  # Serve's own series sit beside ours
]


def scrape(port: int) -> dict:
    """family name -> [(sample name, labels, value)] from the node's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def missing(families: dict) -> list:
    """The EXPECTED entries without a non-zero sample (a histogram counts by its _count)."""
    out = []
    for name, labels in EXPECTED:
        samples = [s for s in families.get(name, []) if not s[0].endswith(("_bucket", "_sum"))]
        if not any(v > 0 and all(lab.get(k) == want for k, want in labels.items()) for _, lab, v in samples):
            out.append((name, labels))
    return out


def generation(client, shard: int) -> int:
    return client.get("/stats").json()["shards"][shard]["generation"]


def test_metrics_after_real_requests(service, tight_front, ray_session, image_index_dir, corpus_dir):
    client = httpx.Client(base_url=service, timeout=60)
    root, _ = corpus_dir
    photo = next(p for p in sorted(root.rglob("*.jpg")) if p.parent.name != "broken").read_bytes()
    assert client.post("/search", content=photo, headers={"content-type": "image/jpeg"}).status_code == 200
    dim = read_manifest(str(image_index_dir)).dim
    one = orjson.dumps({"vector": [0.03] * dim, "k": 3})
    assert client.post("/search/vector", content=one, headers={"content-type": "application/json"}).status_code == 200

    # Writes to shard 0 until it compacts (conftest sets a small compact_after_bytes).
    slots = read_manifest(str(image_index_dir)).slot_table
    ids = [i for i in range(10_000, 20_000) if shard_of([i], slots)[0] == 0]
    start = generation(client, 0)
    for n, id_ in enumerate(ids[:200]):
        r = client.put(f"/images/{id_}", content=picture(n), headers={**AUTH, "content-type": "image/jpeg"})
        assert r.status_code in (200, 201), r.text
        if n % 10 == 9 and generation(client, 0) > start:
            break
    else:
        pytest.fail("200 writes did not compact shard 0")
    for id_ in ids[: n + 1]:
        assert client.delete(f"/images/{id_}", headers=AUTH).status_code == 200

    # An overload: both admission slots of a 2-slot front held by slow uploads, then one more request.
    held = [slow_upload(tight_front, one) for _ in range(2)]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            r = httpx.post(f"{tight_front}/search/vector", content=one, headers={"content-type": "application/json"},
                           timeout=30)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded"
                break
            time.sleep(0.2)
        else:
            pytest.fail("2 held requests did not fill the 2-slot front")
    finally:
        for s in held:
            s.sendall(one[10:])
        for s in held:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.close()

    # A partial answer: one shard's replica hangs (SIGSTOP) past serve.shard_timeout_s; the others
    # answer. A killed replica would not do: Serve restarts it in about a second and the query,
    # held for a replica meanwhile, comes back whole.
    pid = shard_info("Shard001")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        partial, deadline = False, time.time() + 60
        while not partial and time.time() < deadline:
            r = client.post("/search/vector", content=one, headers={"content-type": "application/json"})
            partial = r.status_code == 200 and r.json()["partial"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert partial, "a hung shard did not give a partial answer"
    deadline = time.time() + 120
    while client.get("/healthz").status_code != 200 and time.time() < deadline:
        time.sleep(0.3)
    assert client.get("/healthz").status_code == 200, "shard 1 did not come back"

    port = ray_session.nodes()[0]["MetricsExportPort"]
    deadline = time.time() + 60
    while (gaps := missing(scrape(port))) and time.time() < deadline:
        time.sleep(1)
    assert not gaps, f"metrics missing or zero: {gaps}; families: {sorted(scrape(port))}"

    # Every series of the service and of Serve that the Grafana dashboard charts is exported (Ray's
    # node series come from its reporter agent on its own schedule). Ray drops a gauge that was not
    # set for two export intervals, and Serve sets some (replica health) only every few seconds,
    # so a series counts once any scrape within a minute has it.
    dashboard = json.loads((Path(__file__).parent.parent / "cluster" / "grafana-dashboard.json").read_text())
    charted = {name for panel in dashboard["panels"] for t in panel.get("targets", [])
               for name in re.findall(r"\bray_(?:imsearch|serve)_\w+", t["expr"])}
    exported, deadline = set(), time.time() + 60
    while charted - exported and time.time() < deadline:
        exported |= {sample for family in scrape(port).values() for sample, _, _ in family}
        time.sleep(1)
    assert charted and not charted - exported, f"dashboard series nobody exports: {sorted(charted - exported)}"
