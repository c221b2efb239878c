"""`python -m bench chaos`: the service on a Ray cluster of several nodes on this machine
(`ray.cluster_utils.Cluster`, the harness Ray tests itself with), under mixed load, through
faults on a fixed schedule drawn from a seed. Every request's outcome is recorded; at the end the
record is checked against the service.

Phases, each under the same load (image and vector searches, PUT/DELETE/PATCH from several
writers):

1. `node_loss`: a shard node (one replica of every shard) is removed, then a node is added back.
   With 2 replicas per shard no search may fail or come back partial; with 1, searches come back
   partial (never an error) and /healthz names the shards that are down.
2. `redeploy` (2 replicas): `serve deploy` of the same config with one changed knob: a rolling
   restart of every shard replica.
3. `kills`: SIGKILL, one at a time, of a shard replica, the Embedder, the Ingress, the HTTP proxy
   and the Serve controller; after each, the time until the service answers in full again.

Checks: every acknowledged upsert is found by its own image, every acknowledged delete is gone,
an image whose private flag was acknowledged is never in a result of a search sent after the
acknowledgement (checked on every answer during the run), and /stats totals match the record.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import httpx
import numpy as np
from PIL import Image

WRITE_TOKEN = "chaos-writer"
AUTH = {"authorization": f"Bearer {WRITE_TOKEN}"}
SHARD_RESOURCE, FRONT_RESOURCE = "shard_host", "front_host"
# Process titles Ray gives each actor (`ray::<class>`): what the fault injector SIGKILLs.
TARGETS = {
    "shard replica": "ray::ServeReplica:imsearch-index:Shard000",
    "embedder": "ray::ServeReplica:imsearch:Embedder",
    "ingress": "ray::ServeReplica:imsearch:Ingress",
    "http proxy": "ray::ProxyActor",
    "serve controller": "ray::ServeController",
}


def picture(seed: int) -> bytes:
    """A distinct JPEG per seed (a smooth random colour field): a writer's image."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((160, 160), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Ledger:
    """Every request's outcome, and what the writers were told."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    phase: str = "warmup"
    outcomes: Counter = field(default_factory=Counter)       # (phase, kind, outcome) -> n
    acked: dict = field(default_factory=dict)                  # id -> last acknowledged op ("upsert"/"delete")
    uncertain: set = field(default_factory=set)                # ids with a write of unknown outcome
    private_since: dict = field(default_factory=dict)          # id -> time its private flag was acknowledged
    violations: list = field(default_factory=list)             # private ids seen in results

    def record(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[(self.phase, kind, outcome)] += 1

    def every_write_made(self) -> bool:
        """An upsert, a delete and a private flag have each been acknowledged."""
        with self.lock:
            return bool(self.private_since) and {"upsert", "delete"} <= set(self.acked.values())

    def check_results(self, sent_at: float, results) -> None:
        """A search answer must not hold an image made private before the search was sent."""
        rows = results if results and isinstance(results[0], list) else [results]
        with self.lock:
            for row in rows:
                for hit in row:
                    t = self.private_since.get(hit["id"])
                    if t is not None and t < sent_at:
                        self.violations.append({"id": hit["id"], "phase": self.phase})


def outcome(r: Optional[httpx.Response]) -> str:
    """acknowledged (2xx), refused (4xx or 503: the client was told to retry), failed (other 5xx),
    or no_answer (timeout or a dropped connection)."""
    if r is None:
        return "no_answer"
    if r.status_code < 300:
        return "acknowledged"
    if r.status_code < 500 or r.status_code == 503:
        return "refused"
    return "failed"


class Load:
    """Searchers and writers in threads until stopped."""

    def __init__(self, url: str, ledger: Ledger, dim: int, writers: int = 2, searchers: int = 2, seed: int = 0):
        self.url, self.ledger, self.dim, self.seed = url, ledger, dim, seed
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._writer, args=(w,), daemon=True) for w in range(writers)]
        self.threads += [threading.Thread(target=self._searcher, args=(s,), daemon=True) for s in range(searchers)]
        self.partial = Counter()  # phase -> partial search answers

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def _call(self, client: httpx.Client, kind: str, method: str, path: str, **kw) -> Optional[httpx.Response]:
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError:
            r = None
        self.ledger.record(kind, outcome(r))
        return r

    def _writer(self, w: int) -> None:
        rng, live = random.Random(self.seed * 1000 + w), []
        next_id = 1_000_000 * (w + 1)
        with httpx.Client(base_url=self.url, timeout=30, headers=AUTH) as client:
            while not self.stop.is_set():
                roll = rng.random()
                if roll < 0.6 or len(live) < 3:
                    id_, op = next_id, "upsert"
                    next_id += 1
                    r = self._call(client, "put", "PUT", f"/images/{id_}", content=picture(id_),
                                   headers={"content-type": "image/jpeg"})
                    if r is not None and r.status_code in (200, 201):
                        live.append(id_)
                elif roll < 0.8:
                    id_, op = live.pop(rng.randrange(len(live))), "delete"
                    r = self._call(client, "delete", "DELETE", f"/images/{id_}")
                else:  # private for good: never written again, so never expected back
                    id_, op = live.pop(rng.randrange(len(live))), "private"
                    r = self._call(client, "patch", "PATCH", f"/images/{id_}", json={"private": True})
                with self.ledger.lock:
                    if r is not None and r.status_code in (200, 201):
                        if op == "private":
                            self.ledger.private_since[id_] = time.time()
                        else:
                            self.ledger.acked[id_] = op
                    elif r is None or r.status_code >= 500:
                        self.ledger.uncertain.add(id_)  # may or may not have been applied
                time.sleep(0.05)

    def _searcher(self, s: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + 100 + s)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                sent = time.time()
                if rng.random() < 0.5:
                    kind = "image_search"
                    r = self._call(client, kind, "POST", "/search?k=10&dedupe=false",
                                   content=picture(int(rng.integers(1_000_000, 3_000_000))),
                                   headers={"content-type": "image/jpeg"})
                else:
                    kind = "vector_search"
                    v = rng.normal(size=self.dim)
                    r = self._call(client, kind, "POST", "/search/vector",
                                   json={"vector": (v / np.linalg.norm(v)).tolist(), "k": 20, "dedupe": False})
                if r is not None and r.status_code == 200:
                    body = r.json()
                    self.ledger.check_results(sent, body["results"])
                    if body["partial"]:
                        with self.ledger.lock:
                            self.partial[self.ledger.phase] += 1
                time.sleep(0.05)


def healthy_in_full(url: str) -> bool:
    """/healthz is 200, and an image search (through the embedder) is answered by every shard."""
    try:
        if httpx.get(f"{url}/healthz", timeout=5).status_code != 200:
            return False
        r = httpx.post(f"{url}/search?k=1", content=picture(7), headers={"content-type": "image/jpeg"}, timeout=5)
        return r.status_code == 200 and not r.json()["partial"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def wait_full(url: str, timeout_s: float) -> Optional[float]:
    """Seconds until healthy_in_full, or None past the timeout."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if healthy_in_full(url):
            return round(time.time() - t0, 1)
        time.sleep(0.25)
    return None


def kill(title: str) -> Optional[int]:
    """SIGKILL the first process of this run's cluster (a descendant of this process: never
    another Ray on the machine) whose title starts with `title`; its pid, or None."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if cmd.startswith(title):
            os.kill(p.pid, signal.SIGKILL)
            return p.pid
    return None


def replica_nodes(app: str, deployments: list[str], replicas: int, timeout_s: float = 120) -> dict:
    """deployment -> the node ids its running replicas are on (asked of each replica actor),
    once every deployment shows `replicas` of them (or at the timeout: what was found)."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        out: dict = {d: [] for d in deployments}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            for d in deployments:
                if name.startswith(f"SERVE_REPLICA::{app}#{d}#"):
                    actor = ray.get_actor(name, namespace=entry["namespace"])
                    try:
                        out[d].append(ray.get(actor.__ray_call__.remote(
                            lambda self: ray.get_runtime_context().get_node_id()), timeout=30))
                    except Exception:  # a replica still starting, or going away: asked again
                        pass
        if all(len(n) >= replicas for n in out.values()) or time.time() > deadline:
            return out
        time.sleep(2)


def run_chaos(work: str, minutes: float, seed: int, replicas: int, port: int = 8321,
              compact_after_bytes: Optional[int] = None, switch_shards: Optional[int] = None) -> dict:
    """Start the cluster, build and serve a small index, run the phases, check the record. With
    `compact_after_bytes` the shards compact every few writes (many compactions under faults);
    with `switch_shards` a last phase rebalances to that many shards under load and switches to
    the new version (writes carried across it, compactions of the old version in between)."""
    import ray
    from ray.cluster_utils import Cluster

    from deployments import environment
    from deployments.__main__ import DEFAULT_SERVE_CONFIG, deploy, load_serve_config, wait_healthy
    from deployments.switch import deploy_config, deployed_config, wait_running
    from indexing.__main__ import main as indexing_main

    environment.apply(local=True)
    os.environ["IMSEARCH_WRITE_TOKENS"] = WRITE_TOKEN  # read by each Ingress replica from its environment
    phase_s = max(10.0, minutes * 60 / 3)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "resources": {FRONT_RESOURCE: 4}})
    shard_node_args = {"num_cpus": 2, "resources": {SHARD_RESOURCE: 8}}  # room for a second version's shards
    shard_nodes = [cluster.add_node(**shard_node_args) for _ in range(max(2, replicas))]
    ray.init(address=cluster.address, namespace="serve", logging_level="WARNING")
    report: dict = {"seed": seed, "replicas": replicas, "minutes": minutes, "nodes": 1 + len(shard_nodes)}
    try:
        images, index_dir = os.path.join(work, "images"), os.path.join(work, "index")
        if not os.path.exists(os.path.join(index_dir, "manifest.json")):
            assert indexing_main(["demo-images", "--out", images, "--originals-only"]) == 0
            assert indexing_main(["build", "--images", images, "--index-dir", index_dir, "--shards", "2"]) == 0
        cfg = load_serve_config(str(DEFAULT_SERVE_CONFIG), index_dir, None, port)
        cfg["proxy_location"] = "HeadOnly"  # the "nodes" share this machine's ports
        cfg["applications"][1]["args"]["overrides"] = {"serve": {
            "shard_replicas": replicas, "shard_max_replicas_per_node": 1, "shard_resources": {SHARD_RESOURCE: 1},
            **({"compact_after_bytes": compact_after_bytes} if compact_after_bytes else {})}}
        for d in cfg["applications"][0]["deployments"]:  # the front stays on the head node
            d.setdefault("ray_actor_options", {})["resources"] = {FRONT_RESOURCE: 1}
            if d["name"] == "Embedder":
                d["autoscaling_config"]["max_replicas"] = 1
        url = deploy(cfg, cluster.address)
        if not wait_healthy(url, 300):
            raise RuntimeError("the service did not come up")
        shards = [f"Shard{i:03d}" for i in range(2)]
        placement = replica_nodes("imsearch-index", shards, replicas)
        report["placement"] = {d: sorted(n[:8] for n in nodes) for d, nodes in placement.items()}
        report["replicas_on_distinct_nodes"] = all(len(set(n)) == len(n) == replicas for n in placement.values())
        dim = httpx.get(f"{url}/stats").json()["dim"]
        base_total = httpx.get(f"{url}/stats").json()["total"]
        ledger = Ledger()
        events = []
        with Load(url, ledger, dim, seed=seed) as load:
            # Faults start once every kind of write has been acknowledged, so the checks at the
            # end always have deletes and private flags to check however slow the writes are.
            t0 = time.time()
            while time.time() - t0 < 5 or (not ledger.every_write_made() and time.time() - t0 < 180):
                time.sleep(0.5)
            report["warmup_s"] = round(time.time() - t0, 1)
            # 1. node loss: the node holding shard 0's first replica holds one replica of every shard.
            ledger.phase = "node_loss"
            victim = next(n for n in shard_nodes if n.node_id in placement["Shard000"])
            t0 = time.time()
            cluster.remove_node(victim, allow_graceful=False)
            shard_nodes.remove(victim)
            down_seen = []
            while time.time() - t0 < phase_s / 2:
                try:
                    h = httpx.get(f"{url}/healthz", timeout=5)
                    down_seen.append(h.json().get("shards_down", []))
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(1)
            shard_nodes.append(cluster.add_node(**shard_node_args))
            back = wait_full(url, 300)
            events.append({"fault": "node loss", "recovered_s": None if back is None else round(time.time() - t0, 1)})
            report["shards_down_reported"] = sorted({s for d in down_seen for s in d})
            if replicas > 1:
                # 2. rolling redeploy: one changed knob restarts every shard replica.
                ledger.phase = "redeploy"
                t0 = time.time()
                live = deployed_config()
                index_app = next(a for a in live["applications"] if a["name"] == "imsearch-index")
                twice = (compact_after_bytes or 16 * 1024 * 1024) * 2  # a changed knob, still small when forced small
                index_app["args"]["overrides"]["serve"]["compact_after_bytes"] = twice
                deploy_config(live)
                time.sleep(2)
                wait_running("imsearch-index", 300)
                events.append({"fault": "rolling redeploy", "recovered_s": round(time.time() - t0, 1)})
                # 3. kills, one at a time, in an order drawn from the seed.
                ledger.phase = "kills"
                order = list(TARGETS)
                random.Random(seed).shuffle(order)
                for what in order:
                    t0 = time.time()
                    pid = kill(TARGETS[what])
                    time.sleep(1)
                    back = wait_full(url, 300)
                    events.append({"fault": f"SIGKILL {what}", "pid": pid,
                                   "recovered_s": None if back is None else round(time.time() - t0, 1)})
                    time.sleep(max(0.0, phase_s / len(order) - (time.time() - t0)))
            if switch_shards:
                # 4. a rebalance while writes go on (the old version compacting meanwhile), then
                # the zero-downtime switch, which carries the writes taken since.
                from deployments.switch import switch
                from indexing.rebalance import rebalance

                ledger.phase = "switch"
                t0 = time.time()
                rebalance(index_dir, switch_shards, task_cpus=0.25)
                time.sleep(phase_s / 3)  # writes (and compactions) after the rebalance read the old logs
                out = switch("imsearch", timeout_s=300, drain_s=2)
                events.append({"fault": "rebalance + switch", "recovered_s": round(time.time() - t0, 1),
                               "writes_carried": out.get("writes_carried"), "writes_paused_s": out.get("writes_paused_s")})
                probe = httpx.put(f"{url}/images/9999999", content=picture(9999999), timeout=60,
                                  headers={**AUTH, "content-type": "image/jpeg"})
                report["writes_paused_at_end"] = probe.status_code == 503
                report["version_at_end"] = httpx.get(f"{url}/stats", timeout=30).json()["version"]
                if probe.status_code < 300:
                    with ledger.lock:
                        ledger.acked[9999999] = "upsert"
            ledger.phase = "settle"
            time.sleep(3)
        report["events"] = events
        report["all_recovered"] = all(e["recovered_s"] is not None for e in events)
        report.update(verify(url, ledger, base_total))
        report["partial_answers"] = dict(load.partial)
        report["outcomes"] = _nested(ledger.outcomes)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


def verify(url: str, ledger: Ledger, base_total: int) -> dict:
    """Check the service against what writers were told."""
    lost_upserts, kept_deletes, private_returned = [], [], []
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        for id_, op in sorted(ledger.acked.items()):
            if id_ in ledger.uncertain or id_ in ledger.private_since:
                continue
            if op == "upsert":
                if not held_and_found(client, id_):
                    lost_upserts.append(id_)
            elif client.get(f"/images/{id_}").status_code != 404:
                kept_deletes.append(id_)
        for id_ in sorted(ledger.private_since):
            r = client.post("/search?k=3&dedupe=false", content=picture(id_), headers={"content-type": "image/jpeg"})
            if r.status_code != 200 or id_ in [h["id"] for h in r.json()["results"]]:
                private_returned.append(id_)
        total = client.get("/stats").json()["total"]
    # Private images are held (and counted), just never returned; uncertain ids may be either way.
    present = sum(1 for i, op in ledger.acked.items() if op == "upsert" and i not in ledger.uncertain)
    low, high = base_total + present, base_total + present + len(ledger.uncertain)
    return {"acknowledged_upserts_checked": present, "acknowledged_deletes_checked":
            sum(1 for i, op in ledger.acked.items() if op == "delete" and i not in ledger.uncertain),
            "private_checked": len(ledger.private_since), "uncertain_writes": len(ledger.uncertain),
            "lost_upserts": lost_upserts, "deletes_still_present": kept_deletes,
            "private_returned_at_end": private_returned, "private_returned_during_run": ledger.violations,
            "total": total, "total_expected_range": [low, high], "total_matches": low <= total <= high}


def held_and_found(client: httpx.Client, id_: int) -> bool:
    """The acknowledged upsert of picture(id_) is held (GET names its bytes' sha256) and found: among
    the ten nearest of a search with its bytes, or else first for its own index vector. A query is
    embedded whole and an indexed image with its centre crops (model.index_views), so among a
    thousand similar colour fields a few own pictures rank below the first ten; their index vector
    finds them exactly."""
    data = picture(id_)
    r = client.get(f"/images/{id_}")
    if r.status_code != 200 or r.json()["sha256"] != hashlib.sha256(data).hexdigest():
        return False
    r = client.post("/search?k=10&dedupe=false", content=data, headers={"content-type": "image/jpeg"})
    if r.status_code == 200 and id_ in [h["id"] for h in r.json()["results"]]:
        return True
    vector = client.post("/embed?index=true", content=data, headers={"content-type": "image/jpeg"}).json()["vector"]
    r = client.post("/search/vector", json={"vector": vector, "k": 1, "dedupe": False})
    return r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [id_]


def _nested(outcomes: Counter) -> dict:
    out: dict = {}
    for (phase, kind, result), n in sorted(outcomes.items()):
        out.setdefault(phase, {}).setdefault(kind, {})[result] = n
    return out


def markdown(report: dict) -> str:
    """The report as a short table for docs/reliability.md."""
    lines = ["| fault | recovered in (s) |", "|---|---|"]
    lines += [f"| {e['fault']} | {e['recovered_s']} |" for e in report.get("events", [])]
    lines += ["", "| phase | request | acknowledged | refused | failed | no answer |", "|---|---|---|---|---|---|"]
    for phase, kinds in report.get("outcomes", {}).items():
        for kind, n in kinds.items():
            lines.append(f"| {phase} | {kind} | {n.get('acknowledged', 0)} | {n.get('refused', 0)} | "
                         f"{n.get('failed', 0)} | {n.get('no_answer', 0)} |")
    lost = len(report.get("lost_upserts", [])) + len(report.get("deletes_still_present", [])) + \
        len(report.get("private_returned_during_run", [])) + len(report.get("private_returned_at_end", []))
    lines += ["", f"lost or wrong: {lost}; totals match: {report.get('total_matches')}; "
              f"partial answers by phase: {report.get('partial_answers')}"]
    return "\n".join(lines) + "\n"


def write_report(out: str, report: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "chaos.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "chaos.md"), "w") as f:
        f.write(markdown(report))
