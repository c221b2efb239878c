"""Logging of the command-line jobs: one format, and the libraries' start-up chatter kept out."""
from __future__ import annotations

import logging

# Loggers that report, at INFO on every run, things an operator never acts on.
QUIET = (
    "faiss.loader",  # which SIMD build of FAISS loaded, and the ModuleNotFoundError of each it tried first
)


def setup(level: int = logging.INFO) -> None:
    """Log `level` and up to stderr with timestamps, except the chatter in QUIET (WARNING and up)."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
