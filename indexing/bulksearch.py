"""Bulk search: a folder or URI prefix of query images against a whole index, each answered as
`POST /search` answers it, as one Ray Data job.

Read and decode (the build's tasks) -> embed as queries (the build's actor pool) -> search every
shard and merge (indexing.readers: the service's fan-out over one actor per shard) -> the
service's ranking policy (indexing.policy: private and unsafe left out unless asked, copies
collapsed unless asked, and with `verify` the shortlist verified by local features) -> one
parquet file of results, failed.jsonl for the queries that could not be read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.progress import Progress, replace_ray_data_bars
from configs.schema import AppConfig
from indexing import storage
from indexing.catalog import sha_key
from indexing.manifest import read_manifest

RESULTS_FILE, FAILED_FILE = "results.parquet", "failed.jsonl"
RESULTS_SCHEMA = pa.schema([("query_uri", pa.string()), ("rank", pa.int32()), ("id", pa.int64()),
                            ("uri", pa.string()), ("score", pa.float32()), ("verified", pa.bool_())])


@dataclass
class SearchSummary:
    queries: int
    failed: int
    results: int
    seconds: float
    first_s: float  # until the first answers came back: the job's start-up (actors, model, shards)
    first_n: int    # queries those first answers held

    def line(self) -> str:
        rate = self.queries / self.seconds if self.seconds > 0 else 0.0
        unreadable = f", {self.failed} unreadable ({FAILED_FILE})" if self.failed else ""
        return (f"searched {self.queries - self.failed} images{unreadable} in {self.seconds:.1f} s "
                f"({rate:.1f} images/s; first answers after {self.first_s:.1f} s); {self.results} results "
                f"({RESULTS_FILE})")


class SearchBatch:
    """Ray Data actor: searches a batch of embedded queries over every shard and ranks each one's
    hits as the service ranks an image search's (deployments/ingress.py search_image)."""

    def __init__(self, readers: list, index_dir: str, version: int, serve_cfg: dict, decode: dict, k: int,
                 verify: bool, dedupe: bool, roots: list[str], nprobe: Optional[int]):
        from configs.schema import DecodeConfig, ServeConfig
        from indexing.manifest import read_manifest
        from indexing.readers import JobRouter
        from indexing.verification import CandidateVerifier

        self.cfg = ServeConfig(**serve_cfg)
        self.router = JobRouter(readers, index_dir, read_manifest(index_dir, version))
        self.k, self.dedupe, self.roots, self.nprobe = k, dedupe, roots, nprobe
        self.verify = verify and self.cfg.verify_top > 0
        self.verifier = CandidateVerifier(DecodeConfig(**decode), self.cfg.verify_cache_bytes,
                                          self.cfg.verify_threads) if self.verify else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from deployments.pipeline import rank
        from indexing.build import arrow_to_vectors
        from indexing.policy import fetch_size, verification_shortlist, verified_first

        ok = np.asarray(batch.column("error").to_pylist()) == ""
        uris = batch.column("uri").to_pylist()
        rows: dict[str, list] = {name: [] for name in RESULTS_SCHEMA.names}
        rows["error"] = []
        for i in np.flatnonzero(~ok):
            self._row(rows, uris[i], 0, None, batch.column("error")[int(i)].as_py())
        if ok.any():
            x = arrow_to_vectors(batch.column("embedding"))[ok]
            own = [sha_key(s) for s in np.asarray(batch.column("sha256").to_pylist())[ok]]
            depth = max(self.k, self.cfg.verify_top) if self.verify else self.k
            exclude = self.cfg.exclude_query_image
            hits = self.router.search(x, fetch_size(depth, self.cfg.dedupe_fetch_factor, self.dedupe, exclude), self.nprobe)
            results, _ = rank(hits, depth, copy_bits=self.cfg.near_duplicate_bits, query_sha256=own,
                              exclude_query=exclude, dedupe=self.dedupe)
            for uri, own_sha, ranked in zip(np.asarray(uris, dtype=object)[ok], own, results):
                if self.verify and ranked:
                    exact, others, candidates = verification_shortlist(ranked, hits.meta, own_sha, self.cfg.verify_top)
                    try:
                        found = self.verifier.verify(storage.read_bytes(uri), candidates, self.roots)
                    except OSError:  # the query file went away since it was embedded: answered unverified
                        found = {}
                    ranked = exact + verified_first(others, found, self.cfg.verify_min_inliers)
                for r, hit in enumerate(ranked[: self.k], 1):
                    self._row(rows, uri, r, hit, "")
        return pa.table({**{f.name: pa.array(rows[f.name], f.type) for f in RESULTS_SCHEMA},
                         "error": pa.array(rows["error"], pa.string())})

    @staticmethod
    def _row(rows: dict, query_uri: str, rank_: int, hit: Optional[dict], error: str) -> None:
        hit = hit or {"id": -1, "uri": "", "score": 0.0}
        for name, value in (("query_uri", query_uri), ("rank", rank_), ("id", hit["id"]), ("uri", hit["uri"]),
                            ("score", hit["score"]), ("verified", bool(hit.get("same_photo"))), ("error", error)):
            rows[name].append(value)


def bulk_search(images: str, index_dir: str, out: str, cfg: AppConfig, *, k: int = 10, verify: bool = False,
                include_private: bool = False, dedupe: bool = True, nprobe: Optional[int] = None,
                allow: Optional[list[str]] = None) -> SearchSummary:
    """Search every image under `images` in the index at `index_dir`; write out/results.parquet
    (query_uri, rank, id, uri, score, verified) and out/failed.jsonl. Verification reads indexed
    images from the index's folders, `serve.uri_roots` and `allow`, as the service does."""
    import ray

    from configs.schema import index_model
    from indexing.build import embedded_images, fit_to_free_cpus, write_failed_rows
    from indexing.readers import open_readers

    t0 = time.time()
    manifest = read_manifest(index_dir)
    listed = list(storage.list_files(images, cfg.build.extensions))
    if not listed:
        raise FileNotFoundError(f"no images with endings {list(cfg.build.extensions)} under {images}")
    c = cfg.corpus
    model = index_model(cfg.model, manifest.model)  # queries embedded as the service embeds them
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # Every reservation of the job in one request, before any is made: waiting for CPUs that the
    # job's own readers hold would be waiting for nothing.
    extra = c.search_actors * c.search_actor_cpus + manifest.num_shards * c.reader_cpus
    b = fit_to_free_cpus(cfg.build, use_gpu, extra=extra)
    scale = b.decode_num_cpus / cfg.build.decode_num_cpus
    readers = open_readers(index_dir, manifest, c.reader_cpus * scale, include_hidden=include_private)
    try:
        ds, _ = embedded_images(images, listed, b, use_gpu, model, cfg.decode.model_dump(), slot_table=None,
                                for_index=False)
        roots = cfg.serve.uri_roots + list(allow or []) + list(manifest.sources)
        ds = ds.map_batches(SearchBatch, batch_size=b.embed_batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=c.search_actors),
                            num_cpus=c.search_actor_cpus * scale,
                            fn_constructor_kwargs=dict(readers=readers, index_dir=index_dir,
                                                       version=manifest.version, serve_cfg=cfg.serve.model_dump(),
                                                       decode=cfg.decode.model_dump(), k=k, verify=verify,
                                                       dedupe=dedupe, roots=roots, nprobe=nprobe))
        replace_ray_data_bars()
        storage.makedirs(out)
        failed, results, first, first_n = [], 0, None, 0
        local = storage.join(out, RESULTS_FILE)
        with _ParquetOut(local) as writer, Progress("searching", len(listed), "images") as progress:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                answered = len(set(batch.column("query_uri").to_pylist()))
                if first is None:
                    first, first_n = time.time() - t0, answered
                err = np.asarray(batch.column("error").to_pylist())
                bad = np.flatnonzero(err != "")
                failed += [(batch.column("query_uri")[int(i)].as_py(), str(err[i])) for i in bad]
                good = batch.filter(pa.array(err == "")).select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)
                writer.write(good)
                results += good.num_rows
                progress.update(answered)
    finally:
        for r in readers:
            ray.kill(r)
    write_failed_rows(storage.join(out, FAILED_FILE), failed)
    return SearchSummary(len(listed), len(failed), results, time.time() - t0, first or 0.0, first_n)


class _ParquetOut:
    """One parquet file written batch by batch, published atomically when complete."""

    def __init__(self, uri: str):
        self.uri = uri
        self.sink = pa.BufferOutputStream()
        self.writer = pq.ParquetWriter(self.sink, RESULTS_SCHEMA)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.writer.close()
        if kind is None:
            storage.write_bytes_atomic(self.uri, self.sink.getvalue().to_pybytes())
