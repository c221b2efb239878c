"""`python -m bench levers`: each Ray Serve fast path measured on and off, the rest held equal.

Serve reads its fast-path variables when Ray starts, so every lever runs in a fresh Ray in a
child process (`python -m bench.levers worker ...`) with its own environment, serving the same
index and answering the same queries; the parent only builds the index and collects rows."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np

from deployments.environment import FAST_PATH

LOG = logging.getLogger(__name__)
OFF = {k: "0" for k in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_SERVE_ENABLE_HA_PROXY")}
# (name, environment, serve-config changes): cumulative, top to bottom, then single levers off.
LEVERS = [
    ("plain Serve (no fast path, no batching)", OFF, {"serve": {"search_batch_size": 1}}),
    ("plain Serve + batched fan-out", OFF, {}),
    ("+ throughput optimized + gRPC", {**OFF, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                                       "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, {}),
    ("+ HAProxy ingress (the default)", FAST_PATH, {}),
    ("default, batched fan-out off", FAST_PATH, {"serve": {"search_batch_size": 1}}),
    ("default + 2 Ingress replicas", FAST_PATH, {"ingress_replicas": 2}),
]


def run_levers(vs, index_dir: str, workdir: str, nprobe: int = 32) -> list[dict]:
    """One child per lever; rows of (lever, engine, concurrency, recall, QPS, p50, p99)."""
    vec = os.path.join(workdir, f"levers-{vs.name}.npz")
    np.savez(vec, queries=vs.queries, truth=vs.truth)
    rows = []
    for name, env, changes in LEVERS:
        out = os.path.join(workdir, "lever.json")
        child_env = {**os.environ, **env}
        cmd = [sys.executable, "-m", "bench.levers", "worker", index_dir, vec, out, json.dumps(changes), str(nprobe)]
        LOG.info("lever: %s", name)
        r = subprocess.run(cmd, env=child_env, timeout=1200)
        if r.returncode != 0:
            rows.append({"lever": name, "errors": f"worker exited {r.returncode}"})
            continue
        for row in json.load(open(out)):
            rows.append({"lever": name, "dataset": vs.name, **row})
            LOG.info("%s %s c=%d: %.0f QPS p50 %.1f ms", name, row["engine"], row["concurrency"], row["qps"], row["p50_ms"])
    return rows


def worker(index_dir: str, vec: str, out: str, changes: dict, nprobe: int) -> None:
    """Serve the index in a fresh Ray with this process's environment and measure it under wrk
    (bench/serving.py measure_engine), JSON and binary bodies."""
    import ray
    from ray import serve

    from bench.common import free_port
    from bench.serving import measure_engine, service_bodies, service_ids
    from bench.vectors import VectorSet
    from deployments.__main__ import DEFAULT_SERVE_CONFIG, deploy, load_serve_config, wait_healthy

    data = np.load(vec)
    vs = VectorSet("levers", np.zeros((0, data["queries"].shape[1]), np.float32), data["queries"], data["truth"])
    cfg = load_serve_config(str(DEFAULT_SERVE_CONFIG), index_dir, None, free_port())
    if "serve" in changes:
        for app in cfg["applications"]:
            app["args"]["overrides"] = {"serve": changes["serve"]}
    if "ingress_replicas" in changes:
        for d in cfg["applications"][0]["deployments"]:
            if d["name"] == "Ingress":
                d["num_replicas"] = changes["ingress_replicas"]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    url = deploy(cfg)
    if not wait_healthy(url, 300):
        raise SystemExit("service did not become healthy")
    bodies = service_bodies(vs, nprobe, os.path.dirname(out), "lever")
    rows = measure_engine("service HTTP json", url, *bodies["json"], service_ids, vs, 10)
    rows += measure_engine("service HTTP binary", url, *bodies["binary"], service_ids, vs, 10)
    json.dump(rows, open(out, "w"))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    logging.basicConfig(level=logging.WARNING)
    a = sys.argv[2:]
    worker(a[0], a[1], a[2], json.loads(a[3]), int(a[4]))
