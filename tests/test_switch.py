"""Zero-downtime version switch of a running service, with writes before, during and after a rebalance.

Deploys its own front + index applications under /sw beside the session's service (the switch
keeps every other application as deployed), keeps searching and writing over HTTP throughout,
and checks that no search failed and no acknowledged write is missing from the new version."""
import threading
import time

import httpx
import numpy as np
import pytest

from configs.schema import load_config
from deployments.switch import SwitchError, deployed_config, switch
from indexing.build import build_from_vectors
from indexing.rebalance import rebalance
from tests.conftest import WRITE_TOKEN, side_apps
from tests.images import picture

AUTH = {"authorization": f"Bearer {WRITE_TOKEN}", "content-type": "image/jpeg"}
# The tests share one served index whose versions move forward: they run in file order.
pytestmark = pytest.mark.random_order(disabled=True)
DIM, N = 1280, 1500  # the embedder's dimension, so PUT with an image works


@pytest.fixture(scope="module")
def sw_service(ray_session, service, tmp_path_factory):
    """Apps `sw` (route /sw) and `sw-index` on the session's Serve; yields (base url, index dir)."""
    index_dir = str(tmp_path_factory.mktemp("switch") / "index")
    x = np.random.default_rng(7).standard_normal((N, DIM)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    build_from_vectors(x, None, index_dir, load_config(None), shards=3, factory="Flat")
    # Two Ingress replicas hear of the switch at different times: the shards fence it.
    for url in side_apps(service, "sw", index_dir, ingress_replicas=2):
        yield url, index_dir

class Traffic:
    """Background searches and writes over HTTP, recording every answer."""

    def __init__(self, url: str, first_id: int):
        self.url, self.next_id, self.stop = url, first_id, threading.Event()
        self.search_status: list[tuple[int, bool]] = []
        self.acked: list[int] = []
        self.paused = 0
        self.threads = [threading.Thread(target=self._search), threading.Thread(target=self._write)]

    def _search(self):
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                r = c.post("/search/vector", json={"vector": rng.standard_normal(DIM).tolist(), "k": 10})
                self.search_status.append((r.status_code, r.status_code == 200 and r.json()["partial"]))

    def _write(self):
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                r = c.put(f"/images/{self.next_id}", content=picture(self.next_id), headers=AUTH)
                if r.status_code == 201:
                    self.acked.append(self.next_id)
                    self.next_id += 1
                elif r.status_code == 503 and r.json()["error"]["code"] == "writes_paused":
                    assert r.headers["retry-after"]
                    self.paused += 1
                    time.sleep(0.2)
                else:
                    raise AssertionError(r.text)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_switch_to_rebalanced_version_without_downtime_or_lost_writes(sw_service):
    url, index_dir = sw_service
    c = httpx.Client(base_url=url, timeout=60)
    assert c.get("/stats").json()["version"] == 1
    # Writes the old version took before the rebalance: a delete and a flag change.
    assert c.delete("/images/5", headers=AUTH).status_code == 200
    assert c.patch("/images/6", json={"private": True}, headers=AUTH).status_code == 200
    with Traffic(url, first_id=10**6) as traffic:
        while len(traffic.acked) < 3:
            time.sleep(0.1)
        new = rebalance(index_dir, 2, task_cpus=0.05)
        assert new.version == 2 and new.replay_from.version == 1
        # Writes after the rebalance read the old shards: only the catch-up can carry these.
        after = len(traffic.acked)
        assert c.delete("/images/7", headers=AUTH).status_code == 200
        assert c.patch("/images/8", json={"unsafe": True}, headers=AUTH).status_code == 200
        while len(traffic.acked) < after + 3:
            time.sleep(0.1)
        out = switch("sw", timeout_s=180, drain_s=1)
        # Writes and searches against the new version.
        writes, searches, deadline = len(traffic.acked), len(traffic.search_status), time.time() + 60
        while (len(traffic.acked) < writes + 3 or len(traffic.search_status) < searches + 10) and time.time() < deadline:
            time.sleep(0.1)
    assert out["switched"] and out["index_app"] == "sw-index-v000002" and out["writes_carried"] >= 5
    statuses = traffic.search_status
    assert len(statuses) > 20 and all(s == 200 for s, _ in statuses), {s for s, _ in statuses}
    assert not any(partial for _, partial in statuses)  # every search saw every shard
    stats = c.get("/stats").json()
    assert stats["version"] == 2 and stats["index_app"] == "sw-index-v000002" and len(stats["shards"]) == 2
    assert stats["total"] == N - 2 + len(traffic.acked)  # every acknowledged write, nothing else
    for id_ in traffic.acked:
        assert c.get(f"/images/{id_}").status_code == 200
    assert c.get("/images/5").status_code == 404 and c.get("/images/7").status_code == 404
    assert c.get("/images/6", headers=AUTH).json()["private"] and c.get("/images/8", headers=AUTH).json()["unsafe"]
    assert "sw-index" not in {a["name"] for a in deployed_config()["applications"]}  # the old one is gone
    # Writes flow into the new version once the switch is over.
    assert c.put("/images/424242", content=picture(424242), headers=AUTH).status_code == 201
    assert c.get("/stats").json()["total"] == stats["total"] + 1


def test_switch_refuses_what_it_cannot_carry(sw_service):
    with pytest.raises(SwitchError, match="no application"):
        switch("no-such-app")
    out = switch("sw")  # already on the current version: nothing to do
    assert not out["switched"]


def test_a_switch_that_fails_leaves_the_old_version_serving_and_writable(sw_service):
    """The catch-up cannot read the served version's manifest (gone with a disk, say): the switch
    undoes itself and says so; the front stays on the served version, which takes writes, and
    the new version's application is removed. Runs last in this file (it leaves a newer
    manifest that no switch used)."""
    import os

    url, index_dir = sw_service
    c = httpx.Client(base_url=url, timeout=60)
    served = c.get("/stats").json()["version"]
    new = rebalance(index_dir, 3, task_cpus=0.05)
    held = os.path.join(index_dir, "manifests", f"v{served:06d}.json")
    os.rename(held, held + ".away")
    try:
        with pytest.raises(SwitchError, match=f"stays on version {served} and takes writes again"):
            switch("sw", timeout_s=180, drain_s=1)
    finally:
        os.rename(held + ".away", held)
    assert c.get("/stats").json()["version"] == served
    assert c.put("/images/434343", content=picture(434343), headers=AUTH).status_code == 201
    assert f"sw-index-v{new.version:06d}" not in {a["name"] for a in deployed_config()["applications"]}

