"""Choosing and training the one FAISS template that every shard copies."""
from __future__ import annotations

import math

from configs.schema import IndexConfig

# FAISS warns below ~39 training points per centroid; fewer gives poor cells.
MIN_POINTS_PER_CELL = 39


def choose_nlist(n: int, n_train: int) -> int:
    """IVF cells: about 4*sqrt(n) (inside the usual sqrt(n)..16*sqrt(n) range), a power of two,
    and never more than the training sample supports."""
    want = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1)))))
    return max(1, min(want, n_train // MIN_POINTS_PER_CELL))


def choose_factory(cfg: IndexConfig, n: int, dim: int, n_train: int, override: str | None = None) -> str:
    """The concrete factory string for a corpus of n vectors of size dim.

    'auto' means exact Flat below `flat_below` vectors, `auto_factory` up to `compact_above` and
    `compact_factory` from there on; {nlist} and {m} placeholders are filled from the config or
    from the corpus size.
    """
    factory = override or cfg.factory
    if factory == "auto":
        factory = "Flat" if n < cfg.flat_below else cfg.auto_factory if n < cfg.compact_above else cfg.compact_factory
    nlist = cfg.nlist or choose_nlist(n, n_train)
    m = cfg.pq_m or max(1, dim // 4)
    try:
        return factory.format(nlist=nlist, m=m)
    except (KeyError, IndexError) as e:
        raise ValueError(f"index.factory {factory!r}: unknown placeholder {e}; use {{nlist}} or {{m}}") from None
