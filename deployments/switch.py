"""Zero-downtime switch of a running service to another manifest version.

1. Deploy the version as a new index application `{front}-index-v{N:06d}` beside the serving one
   (every other application's config is kept as deployed), and wait until it runs: every shard
   of the new version is loaded.
2. Pause writes on the front (Ingress user_config, applied in place) and wait until the Ingress
   reports the pause with no write in flight.
3. Catch up: append to the new version's logs the writes the old version logged after the
   rebalance read it (`indexing.catchup`).
4. Point the Ingress at the new application and resume writes, in one in-place config change.
5. Give searches already inside the old application time to finish, then delete it.
Searches never stop: up to step 4 they go to the old version, after it to the new one. Writes are
refused with 503 + Retry-After between steps 2 and 4 (seconds), so none acknowledged is lost.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Optional

from ray import serve

from indexing.catchup import catch_up
from indexing.manifest import read_manifest

LOG = logging.getLogger(__name__)


class SwitchError(RuntimeError):
    """A switch that cannot be made; the service keeps serving the old version."""


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deployed_config() -> dict:
    """The running Serve instance as a deployable config (all applications, as deployed)."""
    details = _client().get_serve_details()
    apps = [a["deployed_app_config"] for a in details["applications"].values() if a.get("deployed_app_config")]
    return {"proxy_location": details.get("proxy_location"), "http_options": details.get("http_options", {}),
            "grpc_options": details.get("grpc_options", {}), "applications": apps}


def deploy_config(cfg: dict) -> None:
    """Apply a full Serve config: changed applications update, missing ones are deleted."""
    from ray.serve.schema import ServeDeploySchema

    _client().deploy_apps(ServeDeploySchema.model_validate({k: v for k, v in cfg.items() if v is not None}),
                          _blocking=False)


def wait_running(app: str, timeout_s: float) -> None:
    """Until the application reports RUNNING; a failed deploy raises with Serve's message."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        a = _client().get_serve_details()["applications"].get(app)
        if a and a["status"] == "RUNNING":
            return
        if a and a["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise SwitchError(f"application {app} is {a['status']}: {a.get('message', '')}")
        time.sleep(0.5)
    raise SwitchError(f"application {app} did not start in {timeout_s:.0f} s")


def wait_gone(app: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and app in _client().get_serve_details()["applications"]:
        time.sleep(0.5)


def wait_routing(front: str, want: dict, timeout_s: float, probes: int = 8, idle: bool = True) -> None:
    """Until `probes` calls in a row find the Ingress applying `want` (and, when `idle`, with no
    write in flight).

    Calls are spread over Ingress replicas by Serve's router; with many replicas raise `probes`."""
    ingress = serve.get_deployment_handle("Ingress", app_name=front)
    try:  # blocking calls from a driver: its router in a loop of its own, whatever the fast path says
        ingress._init(_run_router_in_separate_loop=True)
    except RuntimeError:  # already initialised in this process: used as it is
        pass
    deadline, ok = time.time() + timeout_s, 0
    while time.time() < deadline:
        got = ingress.current_routing.remote().result(timeout_s=10)
        applied = all(got[k] == v for k, v in want.items()) and not (idle and got["writes_in_flight"])
        ok = ok + 1 if applied else 0
        if ok >= probes:
            return
        time.sleep(0.05 if applied else 0.25)
    raise SwitchError(f"the Ingress of {front} did not apply {want} in {timeout_s:.0f} s")


def ingress_config(app_cfg: dict) -> dict:
    """The Ingress deployment's entry in an application's config (added when absent)."""
    for d in app_cfg.setdefault("deployments", []):
        if d["name"] == "Ingress":
            return d
    app_cfg["deployments"].append({"name": "Ingress"})
    return app_cfg["deployments"][-1]


def switch(front: str = "imsearch", version: Optional[int] = None, timeout_s: float = 600, drain_s: float = 5,
           replay: bool = True) -> dict:
    """Switch the front application `front` to manifest `version` (default: the current manifest)."""
    cfg = deployed_config()
    apps = {a["name"]: a for a in cfg["applications"]}
    if front not in apps:
        raise SwitchError(f"no application {front!r} is deployed (deployed: {sorted(apps)})")
    routing = dict(ingress_config(apps[front]).get("user_config") or {})
    old_app = routing.get("index_app")
    if old_app not in apps:
        raise SwitchError(f"{front}'s Ingress names index application {old_app!r}, which is not deployed")
    old_info = serve.get_deployment_handle("Index", app_name=old_app).info.remote().result(timeout_s=30)
    index_dir = old_info["index_dir"]
    target = read_manifest(index_dir, version)
    if target.version == old_info["version"]:
        return {"switched": False, "version": target.version, "index_app": old_app}
    r = target.replay_from
    if replay and (r is None or r.version != old_info["version"]):
        raise SwitchError(
            f"version {target.version} was not made from the served version {old_info['version']} "
            f"(replay_from: {r.version if r else None}), so writes taken since cannot be carried over; "
            "pass replay=False (--no-replay) to switch anyway")

    t0 = time.time()
    new_app = f"{front}-index-v{target.version:06d}"
    new_cfg = copy.deepcopy(apps[old_app])
    new_cfg["name"], new_cfg["args"] = new_app, {**new_cfg["args"], "version": target.version}
    cfg["applications"] = [a for a in cfg["applications"] if a["name"] != new_app] + [new_cfg]
    deploy_config(cfg)
    wait_running(new_app, timeout_s)
    LOG.info("%s is running version %d (%.1f s)", new_app, target.version, time.time() - t0)

    ingress = ingress_config(next(a for a in cfg["applications"] if a["name"] == front))
    t_pause = time.time()
    try:
        ingress["user_config"] = {**routing, "writes_paused": True}
        deploy_config(cfg)
        wait_routing(front, {"index_app": old_app, "writes_paused": True}, timeout_s)
        carried = catch_up(index_dir, target) if replay else 0
    except Exception as e:
        # Nothing has moved to the new version yet: the old one takes writes again (catch_up
        # unsealed its shards), and the new application goes.
        ingress["user_config"] = dict(routing)
        cfg["applications"] = [a for a in cfg["applications"] if a["name"] != new_app]
        deploy_config(cfg)
        wait_routing(front, {"index_app": old_app, "writes_paused": False}, timeout_s)
        raise SwitchError(f"the switch to version {target.version} failed ({e}); {front} stays on version "
                          f"{old_info['version']} and takes writes again. Make a new version from it (indexing "
                          "rebalance) and switch to that") from e
    ingress["user_config"] = {**routing, "index_app": new_app, "writes_paused": False}
    deploy_config(cfg)
    wait_routing(front, {"index_app": new_app, "writes_paused": False}, timeout_s)
    paused_s = time.time() - t_pause
    LOG.info("front %s now on %s; writes were paused %.1f s, %d carried over", front, new_app, paused_s, carried)

    time.sleep(drain_s)
    cfg["applications"] = [a for a in cfg["applications"] if a["name"] != old_app]
    deploy_config(cfg)
    wait_gone(old_app, timeout_s)
    return {"switched": True, "version": target.version, "index_app": new_app, "old_index_app": old_app,
            "writes_carried": carried, "writes_paused_s": round(paused_s, 2), "took_s": round(time.time() - t0, 2)}
