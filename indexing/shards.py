"""The shard format: a FAISS index copied from the trained template, holding its own vectors.

This module is the one place that knows how a shard file is laid out, how vectors and ids are
added and how a shard is searched; the build job, ShardedIndex and the shard deployments all
import it.
"""
from __future__ import annotations

import logging
from typing import Optional

import faiss
import numpy as np

from indexing import storage

LOG = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def make_template(factory: str, dim: int, metric: str, train_vectors: np.ndarray) -> faiss.Index:
    """Train an empty index from `factory`, wrapped so that it stores our int64 ids.

    An IVF index keeps ids in its inverted lists, also under a transform (PCA, OPQ): ids go
    through, and removing or merging entries stays exact. Flat and Refine indexes number their
    vectors 0..n-1, so they get an IndexIDMap2 around them.
    """
    index = faiss.index_factory(dim, factory, METRICS[metric])
    if not index.is_trained:
        xt = np.ascontiguousarray(train_vectors, dtype=np.float32)
        LOG.info("training %s on %d vectors", factory, len(xt))
        index.train(xt)
    if not carries_ids(index):
        index = faiss.IndexIDMap2(index)
    return index


def carries_ids(index: faiss.Index) -> bool:
    """Whether an index stores the ids it is given (an IVF, bare or under transforms)."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexIVF)


def is_refine(index: faiss.Index) -> bool:
    """Whether a shard is a Refine index (under its IndexIDMap2), which cannot remove or merge."""
    index = faiss.downcast_index(index)
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexRefine)


def serialize(index: faiss.Index) -> bytes:
    """Index to bytes, the on-disk shard and template format."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    """Bytes to index."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def read_index(uri: str, mmap: bool = False) -> faiss.Index:
    """Load a shard or template from a local path or any pyarrow URI.

    `mmap` maps the codes and inverted lists of a local file instead of reading them (FAISS's
    IO_FLAG_MMAP_IFC): loading costs page-table entries, not a copy, replicas on one node share the
    pages, and the kernel pages them in as searches touch them. Such an index is read-only: adding
    to or removing from it aborts the process, so only LiveShard's base snapshot is mapped."""
    if storage.is_local(uri):
        _, path = storage.resolve(uri)
        return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    return deserialize(storage.read_bytes(uri))


def write_index(index: faiss.Index, uri: str) -> None:
    """Write a shard or template atomically (temporary file, fsync, rename)."""
    storage.write_bytes_atomic(uri, serialize(index))


def add_to_shard(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, batch: int = 65536) -> None:
    """Add vectors under their ids, in batches to bound temporary memory."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != index.d:
        raise ValueError(f"vectors must be (n, {index.d}), got {vectors.shape}")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    for s in range(0, len(ids), batch):
        index.add_with_ids(vectors[s : s + batch], ids[s : s + batch])


def shard_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in a shard."""
    if carries_ids(index):
        ivf = faiss.extract_index_ivf(index)
        invlists = ivf.invlists
        parts = [
            faiss.rev_swig_ptr(invlists.get_ids(l), invlists.list_size(l)).copy()
            for l in range(ivf.nlist)
            if invlists.list_size(l)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def _params(index: faiss.Index, nprobe: int, k_factor: float, sel, keep: list):
    """Nested SearchParameters for `index`, with `sel` on internal ids; `keep` holds SWIG refs alive."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        if sel is not None:
            sel = faiss.IDSelectorTranslated(index.id_map, sel)
            keep.append(sel)
        return _params(index.index, nprobe, k_factor, sel, keep)
    if isinstance(index, faiss.IndexRefine):
        base = _params(index.base_index, nprobe, k_factor, sel, keep)
        p = faiss.IndexRefineSearchParameters(k_factor=float(k_factor), base_index_params=base)
    elif isinstance(index, faiss.IndexPreTransform):
        p = faiss.SearchParametersPreTransform(index_params=_params(index.index, nprobe, k_factor, sel, keep))
    elif isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF(nprobe=int(min(nprobe, index.nlist)))
        p.sel = sel
    else:
        p = faiss.SearchParameters()
        p.sel = sel
    keep.append(p)
    return p


def search_shard(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    *,
    k_factor: float = 4.0,
    exclude: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one shard as (D, I), float32 and int64, -1 padded; `exclude` ids are never returned.

    Parameters travel with the call (never set on the shared index), so concurrent searches with
    different nprobe are safe. Filtering happens inside the search, so k results still come back
    when enough unfiltered vectors exist.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be (n, {index.d}), got {queries.shape}")
    keep: list = []
    sel = None
    if exclude is not None and len(exclude):
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
        sel = faiss.IDSelectorNot(batch)
        keep += [batch, sel]
    params = _params(index, nprobe, k_factor, sel, keep)
    if index.ntotal == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    D, I = index.search(queries, k, params=params)
    return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)



def shard_vectors(index: faiss.Index, start: int = 0, stop: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) at positions start..stop of a shard (its inverted lists one after another,
    or its id map's order), decoded from the codes: exact for Flat codes, within the codec's error
    otherwise (SQ8: cosine within 0.005; PQ: the error its searches have too). An IVF's codes are
    decoded with their list number (sa_decode, through any transform); a Flat or Refine index
    under its id map gives its full vectors."""
    stop = int(index.ntotal) if stop is None else min(stop, int(index.ntotal))
    if start >= stop:
        return np.zeros(0, np.int64), np.zeros((0, index.d), np.float32)
    if not carries_ids(index):
        mapped = faiss.downcast_index(index)
        ids = faiss.vector_to_array(mapped.id_map).astype(np.int64)[start:stop]
        return ids, faiss.downcast_index(mapped.index).reconstruct_n(start, stop - start)
    ivf = faiss.extract_index_ivf(index)
    if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):
        raise ValueError("the vectors of a fast-scan index (factory ...x4fs) cannot be read back from its packed codes")
    invlists, size = ivf.invlists, ivf.coarse_code_size()
    ids, codes, at = [], [], 0
    for l in range(ivf.nlist):
        n = invlists.list_size(l)
        lo, hi = max(start - at, 0), min(stop - at, n)
        at += n
        if lo >= hi:
            if at >= stop:
                break
            continue
        code = faiss.rev_swig_ptr(invlists.get_codes(l), n * invlists.code_size).reshape(n, invlists.code_size)
        listno = np.frombuffer(int(l).to_bytes(size, "little"), np.uint8)
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(l), n)[lo:hi].copy())
        codes.append(np.concatenate([np.broadcast_to(listno, (hi - lo, size)), code[lo:hi]], axis=1))
    return np.concatenate(ids), index.sa_decode(np.ascontiguousarray(np.concatenate(codes)))
