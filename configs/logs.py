"""Logging of the command-line jobs: one format, and the libraries' start-up chatter kept out."""
from __future__ import annotations

import logging

# Loggers that report, at INFO on every run, things an operator never acts on.
QUIET = (
    "faiss.loader",  # which SIMD build of FAISS loaded, and the ModuleNotFoundError of each it tried first
    "httpx",  # one line per request: an ingest of 60 photos printed 120
)
# Warnings that are no news on a local Ray: "Token authentication is enabled" at every ray.init.
SILENT = ("ray._private.authentication",)


def setup(level: int = logging.INFO) -> None:
    """Log `level` and up to stderr with timestamps, except the chatter in QUIET (WARNING and up)
    and SILENT (ERROR and up)."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for name in SILENT:
        logging.getLogger(name).setLevel(max(level, logging.ERROR))


def quiet_ray() -> None:
    """Ray Data's and Serve's INFO lines in a job's terminal (execution plans, "Started Serve", a
    handle's router starting) stay in Ray's log folder, where Ray writes them too. Call after
    importing ray: Ray Data and Serve set their loggers' levels when imported."""
    import ray.data  # noqa: F401 (configures its loggers)
    import ray.serve  # noqa: F401

    for name in ("ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
