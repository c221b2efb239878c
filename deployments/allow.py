"""Let a running service read one more folder: an operator's step, done through Ray.

A writer's `?uri=` may only name files under folders the operator allowed; the service reads
them for thumbnails and verification. The index's own image folders and `serve.uri_roots` are
allowed from the start; `python -m deployments allow FOLDER` adds one while the service runs,
through the Ingress's user_config (applied in place, no restart). Reaching Ray's control plane
is the operator's permission: a write token alone cannot make the service read a file."""
from __future__ import annotations

import os

from deployments.switch import SwitchError, deploy_config, deployed_config, ingress_config, wait_routing


def allow(front: str, folders: list[str], timeout_s: float = 60) -> list[str]:
    """Add local `folders` (made absolute, symlinks resolved) or object-store prefixes to the
    front application's allowed roots; returns the roots now allowed at runtime."""
    cfg = deployed_config()
    apps = {a["name"]: a for a in cfg["applications"]}
    if front not in apps:
        raise SwitchError(f"no application {front!r} is running (running: {sorted(apps) or 'none'})")
    ingress = ingress_config(apps[front])
    routing = dict(ingress.get("user_config") or {})
    roots = list(routing.get("uri_roots", []))
    for folder in folders:
        if "://" not in folder:
            if not os.path.isdir(folder):
                raise SwitchError(f"{folder} is not a folder")
            folder = os.path.realpath(folder)
        if folder not in roots:
            roots.append(folder)
    if roots != routing.get("uri_roots", []):
        ingress["user_config"] = {**routing, "uri_roots": roots}
        deploy_config(cfg)
        wait_routing(front, {"uri_roots": roots}, timeout_s, idle=False)
    return roots
