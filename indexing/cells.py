"""Cell placement: vectors live on the shard that owns their IVF coarse cell, and neighbouring cells
share a shard, so a query's `nprobe` nearest cells sit on a few shards and the others are skipped.

Exactness: every shard holds a copy of the one template, so its IVF search visits the same
`nprobe` nearest cells an unsharded index would; a shard that owns none of a query's cells has
nothing in them and would answer with nothing. Sending a query only to the owners of its cells
therefore returns exactly what the unsharded IVF returns (merged by score, then id).

The cell table (cell -> shard) is made once from the template's centroids: k-means over the
centroids, weighted by how many vectors each cell holds, gives groups of neighbouring cells; a
capacity-bounded assignment then evens out the vectors per shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import faiss
import numpy as np

# A shard's vectors may exceed the mean by this factor while cells are packed (or by one cell,
# when a single cell is larger); bench routing measures what it gives.
CAPACITY = 1.1


def coarse_parts(template: faiss.Index) -> tuple[list, faiss.IndexIVF]:
    """The transforms applied before the coarse quantizer (OPQ, PCA: possibly none) and the IVF."""
    transforms, index = [], faiss.downcast_index(template)
    while isinstance(index, faiss.IndexPreTransform):
        transforms += [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        index = faiss.downcast_index(index.index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or not isinstance(index, faiss.IndexIVF):
        raise ValueError("cell placement needs an IVF index (factory 'IVF...'), "
                         f"not {type(index).__name__}")
    return transforms, index


class CoarseQuantizer:
    """The template's coarse quantizer alone (centroids, and the transforms before it): what the
    front needs to find a query's cells without holding any codes."""

    def __init__(self, template: faiss.Index):
        transforms, ivf = coarse_parts(template)
        self.transforms, self.nlist = transforms, ivf.nlist
        self.centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        self.quantizer = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)
        self.quantizer.add(self.centroids)

    def cells(self, x: np.ndarray, nprobe: int) -> np.ndarray:
        """(n, nprobe) the nearest cells of each vector, as the IVF search visits them."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        for t in self.transforms:
            x = t.apply(x)
        return self.quantizer.search(x, int(min(nprobe, self.nlist)))[1]


@dataclass
class CellRouting:
    """What a reader of a cell-placed index needs to route: the coarse quantizer, the cell table
    and the index's default nprobe."""

    quantizer: CoarseQuantizer
    cell_table: np.ndarray
    nprobe: int

    @classmethod
    def open(cls, index_dir: str, template: str, cell_table: list[int], nprobe: int) -> "CellRouting":
        """From an index directory's template file and its manifest's cell table."""
        from indexing import storage
        from indexing.shards import read_index

        return cls(CoarseQuantizer(read_index(storage.join(index_dir, template))), np.asarray(cell_table), nprobe)

    @property
    def num_shards(self) -> int:
        return int(self.cell_table.max()) + 1

    def rows(self, queries: np.ndarray, nprobe: Optional[int]) -> list[np.ndarray]:
        """For each shard, the query rows it must search (see shard_rows)."""
        return shard_rows(self.quantizer.cells(queries, nprobe or self.nprobe), self.cell_table, self.num_shards)

    def shard_of_vector(self, vector: np.ndarray) -> int:
        """The shard that holds a vector: the owner of its nearest cell."""
        return int(self.cell_table[self.quantizer.cells(np.atleast_2d(vector), 1)[0, 0]])


def group_cells(centroids: np.ndarray, counts: np.ndarray, num_shards: int, seed: int = 0,
                capacity: float = CAPACITY) -> list[int]:
    """cell -> shard: groups of neighbouring cells with about the same number of vectors each.

    k-means over the centroids (weighted by their vector counts) gives one centre per shard; cells
    are then placed largest first on the nearest centre whose group still has room (capacity x the
    mean), and the centres move to their groups' weighted means; a few rounds settle it.
    """
    nlist, dim = centroids.shape
    if num_shards > nlist:
        raise ValueError(f"cell placement needs at least as many cells as shards: {nlist} cells, {num_shards} shards")
    weights = np.asarray(counts, dtype=np.float64) + 1.0  # an empty cell still gets a home
    km = faiss.Kmeans(dim, num_shards, niter=20, seed=seed, min_points_per_centroid=1, max_points_per_centroid=nlist)
    km.train(np.ascontiguousarray(centroids, dtype=np.float32), weights=weights.astype(np.float32))
    centres = km.centroids
    room = max(capacity * weights.sum() / num_shards, weights.max())
    order = np.argsort(-weights, kind="stable")
    table = np.zeros(nlist, np.int64)
    for _ in range(4):
        load = np.zeros(num_shards)
        # Every shard's centres ranked by distance from each cell: nearest first.
        pref = np.argsort(_distances(centroids, centres), axis=1)
        for c in order:
            for s in pref[c]:
                if load[s] + weights[c] <= room or s == pref[c][-1]:
                    table[c] = s
                    load[s] += weights[c]
                    break
        for s in range(num_shards):  # centres follow their groups
            mine = table == s
            if mine.any():
                centres[s] = np.average(centroids[mine], axis=0, weights=weights[mine])
    _fill_empty(table, weights, num_shards)
    return table.tolist()


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared L2 distances, (len(a), len(b))."""
    return (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]


def _fill_empty(table: np.ndarray, weights: np.ndarray, num_shards: int) -> None:
    """Give every shard at least one cell (a shard without cells would never be asked anything):
    the lightest cell of the fullest shard moves over."""
    for s in range(num_shards):
        if not (table == s).any():
            loads = np.bincount(table, weights=weights, minlength=num_shards)
            donor = int(np.argmax(np.where(np.bincount(table, minlength=num_shards) > 1, loads, -1)))
            cells = np.flatnonzero(table == donor)
            table[cells[np.argmin(weights[cells])]] = s


def shard_rows(cells: np.ndarray, cell_table, num_shards: Optional[int] = None) -> list[np.ndarray]:
    """For each shard, the query rows that have at least one of their cells there."""
    table = np.asarray(cell_table, dtype=np.int64)
    num_shards = num_shards or int(table.max()) + 1
    owners = table[np.where(cells < 0, 0, cells)]
    hit = np.zeros((len(cells), num_shards), bool)
    hit[np.arange(len(cells))[:, None], owners] = True
    return [np.flatnonzero(hit[:, s]) for s in range(num_shards)]


def spread(part: tuple[np.ndarray, np.ndarray], rows: np.ndarray, n: int, metric: str):
    """A shard's (D, I) for some query rows, as (n, k) arrays for all n rows (the others empty:
    id -1 and the worst score), ready for merge_topk."""
    D, I = part
    if len(rows) == n:
        return D, I
    full_d = np.full((n, D.shape[1]), -np.inf if metric == "ip" else np.inf, np.float32)
    full_i = np.full((n, D.shape[1]), -1, np.int64)
    full_d[rows], full_i[rows] = D, I
    return full_d, full_i


def shards_touched(cells: np.ndarray, cell_table) -> np.ndarray:
    """Distinct shards each query visits."""
    owners = np.sort(np.asarray(cell_table, dtype=np.int64)[cells], axis=1)
    return 1 + (np.diff(owners, axis=1) != 0).sum(axis=1)
