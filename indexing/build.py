"""The batch indexing job: images (or vectors) -> embeddings parquet -> template -> N shards.

Ray Data reads and decodes images in tasks, embeds them on an actor pool (one GPU per actor when
the cluster has GPUs) and writes the embeddings partitioned by shard; each shard is then filled
from its own partition by a separate Ray task and written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from configs.progress import Progress, poll, replace_ray_data_bars
from configs.schema import AppConfig, BuildConfig, ModelConfig
from indexing import storage
from indexing.ids import id_from_path, initial_slot_table, shard_of
from indexing.manifest import Manifest, ShardEntry, next_version, publish_manifest
from indexing.shards import add_to_shard, deserialize, make_template, serialize, write_index
from indexing.template import choose_factory

LOG = logging.getLogger(__name__)
CATALOG_COLUMNS = ["id", "uri", "sha256", "phash", "width", "height"]


class BuildError(RuntimeError):
    """A build that cannot go on; the message says why (id collision, empty corpus, ...)."""


@dataclass
class BuildSummary:
    indexed: int
    failed: int
    seconds: float
    manifest: Manifest

    def line(self) -> str:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        # Unreadable files are named only when there are some: "failed 0" read as a failure.
        unreadable = f", {self.failed} unreadable (failed.jsonl)" if self.failed else ""
        return (
            f"indexed {self.indexed} images{unreadable} in {self.seconds:.1f} s "
            f"({rate:.1f} images/s); {self.manifest.num_shards} shards, factory {self.manifest.factory}, "
            f"version {self.manifest.version}"
        )


def versioned(name: str, version: int) -> str:
    """Artifact name for a manifest version: v1 keeps the plain name, later ones add .vN."""
    if version == 1:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.v{version}.{ext}" if dot else f"{name}.v{version}"


def shard_files(num_shards: int, version: int) -> list[str]:
    """The shard file names of a manifest version, relative to the index directory."""
    return [versioned(f"shard-{i:03d}.faiss", version) for i in range(num_shards)]


def assign_ids(rel_paths: list[str]) -> np.ndarray:
    """Ids of relative paths; two paths with one id is an error naming both."""
    seen: dict[int, str] = {}
    ids = np.empty(len(rel_paths), np.int64)
    for i, rel in enumerate(rel_paths):
        x = id_from_path(rel)
        if x in seen:
            raise BuildError(f"id collision: {seen[x]!r} and {rel!r} both hash to {x}")
        seen[x] = rel
        ids[i] = x
    return ids


# ---------------------------------------------------------------- Ray Data stages


def decode_batch(batch: dict, *, root: str, scheme: str, image_size: int, decode: dict) -> dict:
    """Ray Data stage: raw bytes -> fixed-size pixels, id, catalog fields (with the perceptual hash
    of those pixels, as the service computes it for uploads), and an error string."""
    from embedding.copies import perceptual_hash
    from embedding.decode import ImageDecodeError, decode_image, resize_rgb

    n = len(batch["path"])
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    out = {k: [] for k in ("id", "uri", "sha256", "phash", "width", "height", "error")}
    for i, (path, data) in enumerate(zip(batch["path"], batch["bytes"])):
        rel = posixpath.relpath(str(path), root)
        out["id"].append(id_from_path(rel))
        out["uri"].append(scheme + str(path))
        out["sha256"].append(hashlib.sha256(data).hexdigest())
        try:
            img = decode_image(data, **decode, draft=image_size)  # the decode Embedder.prepare does
            out["width"].append(img.info["full_size"][0])
            out["height"].append(img.info["full_size"][1])
            pixels[i] = resize_rgb(img, image_size)
            out["phash"].append(perceptual_hash(pixels[i]))
            out["error"].append("")
        except ImageDecodeError as e:
            out["phash"].append(0)
            out["width"].append(0)
            out["height"].append(0)
            out["error"].append(str(e))
    res = {k: np.asarray(v) for k, v in out.items()}
    res["id"] = res["id"].astype(np.int64)
    res["phash"] = res["phash"].astype(np.int64)
    res["pixels"] = pixels
    return res


class Tally:
    """A count the workers of a job add to and its driver reads (progress of a Ray Data pipeline,
    whose rows the driver never sees), optionally split by a key (the node that did the work).
    Used as a Ray actor of no CPU."""

    def __init__(self):
        self.n = 0
        self.keys: dict[str, int] = {}

    def add(self, n: int, key: Optional[str] = None) -> None:
        self.n += n
        if key is not None:
            self.keys[key] = self.keys.get(key, 0) + n

    def get(self) -> int:
        return self.n

    def by_key(self) -> dict[str, int]:
        return dict(self.keys)


class EmbedBatch:
    """Ray Data actor: loads the model once, embeds the rows that decoded (as an index holds them,
    or with `for_index=False` as a search's query), and with a slot table tags each row's shard.
    Each batch done is added to `tally` (a Tally actor) when one is given."""

    def __init__(self, model: dict, slot_table: Optional[list[int]], tally=None, for_index: bool = True):
        from embedding.embedder import Embedder

        self.embedder = Embedder(ModelConfig(**model))
        self.slot_table, self.tally, self.for_index = slot_table, tally, for_index

    def __call__(self, batch: dict) -> pa.Table:
        ok = batch["error"] == ""
        emb = np.zeros((len(ok), self.embedder.dim), np.float32)
        if ok.any():
            emb[ok] = self.embedder.embed_pixels(batch["pixels"][ok], for_index=self.for_index)
        cols = {k: batch[k] for k in ("id", "uri", "sha256", "phash", "width", "height", "error")}
        if self.slot_table is not None:
            cols["shard"] = shard_of(batch["id"], self.slot_table)
        table = pa.table({k: pa.array(np.asarray(v)) for k, v in cols.items()})
        if self.tally is not None:
            self.tally.add.remote(len(ok))  # not awaited: a count, off the pipeline's path
        return table.append_column("embedding", vectors_to_arrow(emb))


def vectors_to_arrow(x: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> Arrow fixed-size lists, readable without Ray's tensor extension."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def arrow_to_vectors(col) -> np.ndarray:
    """Arrow fixed-size list column -> (n, d) float32."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, arr.type.list_size), np.float32)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size).astype(np.float32)


# ---------------------------------------------------------------- embeddings parquet


def embeddings_dataset(uri: str) -> pads.Dataset:
    """The embeddings written by a build, partitioned by shard (hive layout: shard=3/...)."""
    fs, path = storage.resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")


def read_embeddings(uri: str, shard: Optional[int] = None, columns=("id", "embedding")) -> pa.Table:
    """Rows that embedded successfully, optionally of one shard."""
    flt = pads.field("error") == ""
    if shard is not None:
        flt = flt & (pads.field("shard") == shard)
    return embeddings_dataset(uri).to_table(columns=list(columns), filter=flt)


def sample_embeddings(uri: str, n: int, seed: int = 0) -> np.ndarray:
    """Up to n embeddings for training, read fragment by fragment in random order to bound I/O."""
    ds = embeddings_dataset(uri)
    frags = list(ds.get_fragments(filter=pads.field("error") == ""))
    rng = np.random.default_rng(seed)
    rng.shuffle(frags)
    parts, have = [], 0
    for f in frags:
        t = f.to_table(columns=["embedding"], filter=pads.field("error") == "")
        parts.append(arrow_to_vectors(t.column("embedding")))
        have += t.num_rows
        if have >= 4 * n:
            break
    x = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return x[rng.choice(len(x), n, replace=False)] if len(x) > n else x


def write_vectors_parquet(uri: str, ids: np.ndarray, vectors: np.ndarray, slot_table: list[int]) -> None:
    """Write externally embedded vectors in the same partitioned layout a Ray Data build writes."""
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "uri": pa.array([""] * len(ids)),
            "sha256": pa.array([""] * len(ids)),
            "phash": pa.nulls(len(ids), pa.int64()),  # no pixels: only exact duplicates by sha256 collapse
            "width": pa.array(np.zeros(len(ids), np.int64)),
            "height": pa.array(np.zeros(len(ids), np.int64)),
            "error": pa.array([""] * len(ids)),
            "shard": pa.array(shard_of(ids, slot_table)),
        }
    ).append_column("embedding", vectors_to_arrow(vectors))
    fs, path = storage.resolve(uri)
    pads.write_dataset(
        table, path, filesystem=fs, format="parquet", partitioning=["shard"], partitioning_flavor="hive",
        existing_data_behavior="delete_matching",
    )


def place_by_cells(emb_uri: str, template, num_shards: int, batch_rows: int = 65536) -> list[int]:
    """Cell placement: count the vectors of each IVF cell, group neighbouring cells into shards
    (indexing.cells.group_cells), and rewrite the embeddings' shard partitions to follow the
    cells, so each shard task still reads only its own partition. Returns the cell table.

    Two passes over the vectors on this process: at a scale where that is too slow, the same two
    passes are Ray Data maps; the cell table is the only thing they need to share."""
    from indexing.cells import CoarseQuantizer, group_cells

    quantizer = CoarseQuantizer(template)
    ds = embeddings_dataset(emb_uri)

    def cells_of(batch: pa.RecordBatch) -> np.ndarray:
        cells = np.full(batch.num_rows, -1, np.int64)
        ok = np.asarray(batch.column("error").to_numpy(zero_copy_only=False)) == ""
        if ok.any():  # failed images carry zero vectors and no cell; they stay for failed.jsonl
            cells[ok] = quantizer.cells(arrow_to_vectors(batch.column("embedding"))[ok], 1)[:, 0]
        return cells

    counts = np.zeros(quantizer.nlist, np.int64)
    for batch in ds.to_batches(columns=["embedding", "error"], batch_size=batch_rows):
        cells = cells_of(batch)
        counts += np.bincount(cells[cells >= 0], minlength=quantizer.nlist)
    table = np.asarray(group_cells(quantizer.centroids, counts, num_shards))
    columns = [f for f in ds.schema.names if f != "shard"]
    fs, path = storage.resolve(emb_uri)

    def placed():
        for batch in ds.to_batches(columns=columns, batch_size=batch_rows):
            yield batch.append_column("shard", pa.array(table[np.maximum(cells_of(batch), 0)]))

    schema = pa.schema([ds.schema.field(c) for c in columns] + [pa.field("shard", pa.int64())])
    pads.write_dataset(placed(), path + ".cells", schema=schema, filesystem=fs, format="parquet",
                       partitioning=["shard"], partitioning_flavor="hive")
    fs.delete_dir(path)
    fs.move(path + ".cells", path)
    return table.tolist()


# ---------------------------------------------------------------- shards


def fill_shard(template: bytes, emb_uri: str, shard: int, out_uri: str, add_batch: int) -> int:
    """Copy the template, add this shard's vectors, write it atomically; returns the vector count."""
    index = deserialize(template)
    t = read_embeddings(emb_uri, shard)
    if t.num_rows:
        add_to_shard(index, t.column("id").to_numpy(), arrow_to_vectors(t.column("embedding")), add_batch)
    write_index(index, out_uri)
    return int(index.ntotal)


def write_shards(index_dir: str, version: int, template: bytes, emb_uri: str, num_shards: int, b: BuildConfig):
    """Fill every shard as its own Ray task; returns the manifest's shard entries."""
    import ray

    task = ray.remote(num_cpus=b.shard_task_cpus)(fill_shard)
    names = shard_files(num_shards, version)
    tref = ray.put(template)
    refs = [task.remote(tref, emb_uri, i, storage.join(index_dir, names[i]), b.add_batch_size) for i in range(num_shards)]
    with Progress("filling shards", num_shards, "shards") as progress:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            progress.update(len(ready))
    return [ShardEntry(path=p, count=c) for p, c in zip(names, ray.get(refs))]


def write_catalog(index_dir: str, emb_uri: str, name: str) -> None:
    """catalog.parquet: id -> uri, sha256, perceptual hash, width, height of every indexed image."""
    storage.write_parquet_atomic(storage.join(index_dir, name), read_embeddings(emb_uri, columns=CATALOG_COLUMNS).sort_by("id"))


def write_failed(index_dir: str, emb_uri: str) -> int:
    """failed.jsonl: one {"uri", "error"} object per image that could not be decoded."""
    t = embeddings_dataset(emb_uri).to_table(columns=["uri", "error"], filter=pads.field("error") != "")
    return write_failed_rows(storage.join(index_dir, "failed.jsonl"),
                             zip(t.column("uri").to_pylist(), t.column("error").to_pylist()))


def write_failed_rows(uri: str, rows) -> int:
    """A failed.jsonl at `uri`: one {"uri", "error"} object per (uri, error) of `rows`, sorted, as
    every job lists what it could not read; returns how many."""
    rows = sorted(rows)
    storage.write_bytes_atomic(uri, "".join(json.dumps({"uri": u, "error": e}) + "\n" for u, e in rows).encode())
    return len(rows)


def finish_index(
    index_dir: str, cfg: AppConfig, version: int, emb_name: str, num_shards: int, slot_table: list[int],
    factory_override: Optional[str], model: Optional[dict], sources: Optional[list[str]] = None,
) -> Manifest:
    """Train the template on a sample, fill the shards and publish the manifest."""
    emb_uri = storage.join(index_dir, emb_name)
    n = read_embeddings(emb_uri, columns=["id"]).num_rows
    if n == 0:
        raise BuildError("no vectors to index: every input failed or the input is empty")
    train = sample_embeddings(emb_uri, cfg.index.train_sample)
    dim = train.shape[1]
    factory = choose_factory(cfg.index, n, dim, len(train), factory_override)
    t0 = time.time()
    try:
        template = make_template(factory, dim, cfg.index.metric, train)
    except RuntimeError as e:
        raise BuildError(f"cannot build factory {factory!r} for {n} vectors of dim {dim}: {e}") from None
    LOG.info("template %s trained in %.1f s", factory, time.time() - t0)
    template_name = versioned("template.faiss", version)
    write_index(template, storage.join(index_dir, template_name))
    cell_table = None
    if cfg.index.placement == "cells":
        try:
            cell_table = place_by_cells(emb_uri, template, num_shards)
        except ValueError as e:
            raise BuildError(f"index.placement cells: {e}") from None
    entries = write_shards(index_dir, version, serialize(template), emb_uri, num_shards, cfg.build)
    catalog = versioned("catalog.parquet", version)
    write_catalog(index_dir, emb_uri, catalog)
    manifest = Manifest(
        version=version, dim=dim, metric=cfg.index.metric, factory=factory, nprobe=cfg.index.nprobe,
        total=sum(e.count for e in entries), template=template_name, num_slots=len(slot_table),
        slot_table=slot_table, shards=entries, catalog=catalog, embeddings=emb_name, model=model,
        sources=sources or [], placement=cfg.index.placement, cell_table=cell_table,
    )
    publish_manifest(index_dir, manifest)
    return manifest


def build_from_vectors(
    vectors: np.ndarray, ids: Optional[np.ndarray], index_dir: str, cfg: AppConfig,
    shards: Optional[int] = None, factory: Optional[str] = None,
) -> BuildSummary:
    """Index vectors embedded elsewhere; ids default to 0..n-1."""
    t0 = time.time()
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise BuildError(f"--vectors must hold a non-empty (n, d) array, got shape {vectors.shape}")
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(vectors),):
        raise BuildError(f"--ids has shape {ids.shape}, expected ({len(vectors)},)")
    if len(np.unique(ids)) != len(ids) or (ids < 0).any():
        raise BuildError("--ids must be unique non-negative int64 values")
    num_shards = shards or cfg.index.shards
    slot_table = initial_slot_table(cfg.index.slots, num_shards)
    version = next_version(index_dir)
    emb_name = versioned("embeddings", version)
    write_vectors_parquet(storage.join(index_dir, emb_name), ids, vectors, slot_table)
    m = finish_index(index_dir, cfg, version, emb_name, num_shards, slot_table, factory, None)
    write_failed(index_dir, storage.join(index_dir, emb_name))
    return BuildSummary(m.total, 0, time.time() - t0, m)


class _CpuAlarmFilter(logging.Filter):
    """Drops Ray Data's "no available CPUs ... the Dataset job will hang" warning. Ray Data checks
    free CPUs again when the write stage starts, while the finished embedding actors still hold
    theirs, so a healthy build printed it every time; fit_to_free_cpus makes the real check."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


def free_cpus(need: float, wait_s: float = 30.0, settle_s: float = 3.0) -> float:
    """The Ray cluster's free CPUs, once `need` are free (or all the cluster has, when it has
    fewer) or the count stops growing (see fit_to_free_cpus); raises BuildError when none is free."""
    import ray

    free, deadline = ray.available_resources().get("CPU", 0.0), time.time() + wait_s
    settled = time.time() + settle_s
    enough = min(need, ray.cluster_resources().get("CPU", 0.0))
    while free < enough and time.time() < min(deadline, settled):
        time.sleep(0.5)
        now = ray.available_resources().get("CPU", 0.0)
        if now > free:
            settled = time.time() + settle_s
        free = now
    if free < min(need, 0.1):
        raise BuildError(f"no CPU is free on the Ray cluster ({free:.2f}): stop what holds them or add nodes")
    return free


def fit_cpus(want: float) -> float:
    """`want` CPUs for a job's tasks, or 90% of those free when fewer are (a service holding part
    of a small machine): a reservation that never fits would leave the job waiting silently."""
    free = free_cpus(want)
    if free >= want:
        return want
    LOG.warning("only %.2f CPUs are free (the job asks for %.2f): reserving %.2f", free, want, free * 0.9)
    return free * 0.9


def fit_to_free_cpus(b: BuildConfig, use_gpu: bool, wait_s: float = 30.0, settle_s: float = 3.0,
                     extra: float = 0.0) -> BuildConfig:
    """The build's CPU reservations, scaled down when the cluster has fewer CPUs free than one
    embedding actor plus one decode task need (a service holding part of a small machine): the
    actor pool would wait for CPUs that never free up, and the build would hang without a word.
    Waits first, up to `wait_s`, for CPUs that are freeing up (the actors of a job that just
    ended), but no longer than `settle_s` once the free count stops growing: a service's
    reservations do not go away by waiting. `extra` CPUs that a later stage of the same job
    reserves count in the need; scale that stage by the ratio the returned config was scaled by."""
    ray_data_log = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _CpuAlarmFilter) for f in ray_data_log.filters):
        ray_data_log.addFilter(_CpuAlarmFilter())
    need = (0 if use_gpu else b.actor_num_cpus * b.min_actors) + b.decode_num_cpus + extra
    free = free_cpus(need, wait_s, settle_s)
    if free >= need:
        return b
    scale = free * 0.9 / need
    LOG.warning("only %.2f CPUs are free (the job asks for %.2f): reserving %.0f%% of the configured "
                "build.actor_num_cpus and build.decode_num_cpus", free, need, scale * 100)
    return b.model_copy(update={"actor_num_cpus": b.actor_num_cpus * scale, "decode_num_cpus": b.decode_num_cpus * scale})


def embedded_images(images: str, listed: list[tuple[str, str]], b: BuildConfig, use_gpu: bool, model: dict,
                    decode: dict, **embed_kwargs):
    """The Ray Data pipeline a build and a bulk search share: read the `listed` files of `images`,
    decode them (decode_batch) and embed them on an actor pool (EmbedBatch(model, **embed_kwargs)),
    reserving `b`'s CPUs, or a GPU per actor with `use_gpu`. Returns (dataset, the folder's uri as
    catalogs name it)."""
    import ray

    fs, root = storage.resolve(images)
    scheme = images.split("://", 1)[0] + "://" if "://" in images and not images.startswith("file://") else ""
    # A pool that waits for more GPUs than the cluster has would never start.
    min_actors = min(b.min_actors, max(1, int(ray.cluster_resources().get("GPU", 0) // b.gpus_per_actor))) \
        if use_gpu else b.min_actors
    ds = ray.data.read_binary_files(
        [p.split("://", 1)[1] if scheme else p for p, _ in listed], include_paths=True, filesystem=fs,
        num_cpus=b.decode_num_cpus,
    )
    ds = ds.map_batches(
        decode_batch, batch_size=b.decode_batch_size, batch_format="numpy", num_cpus=b.decode_num_cpus,
        fn_kwargs=dict(root=root.replace("\\", "/"), scheme=scheme, image_size=ModelConfig(**model).image_size,
                       decode=decode),
    )
    ds = ds.map_batches(
        EmbedBatch, batch_size=b.embed_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=b.max_actors),
        fn_constructor_kwargs=dict(model=model, **embed_kwargs),
        num_gpus=b.gpus_per_actor if use_gpu else 0, num_cpus=None if use_gpu else b.actor_num_cpus,
    )
    return ds, scheme + root


def build_from_images(
    images: str, index_dir: str, cfg: AppConfig, shards: Optional[int] = None, factory: Optional[str] = None,
) -> BuildSummary:
    """Index every image under a folder or URI prefix with Ray Data."""
    import ray

    t0 = time.time()
    listed = list(storage.list_files(images, cfg.build.extensions))
    if not listed:
        raise BuildError(f"no images with endings {list(cfg.build.extensions)} under {images}")
    assign_ids([rel for _, rel in listed])  # fail fast on collisions, before any pixel is read
    num_shards = shards or cfg.index.shards
    slot_table = initial_slot_table(cfg.index.slots, num_shards)
    version = next_version(index_dir)
    emb_name = versioned("embeddings", version)
    emb_uri = storage.join(index_dir, emb_name)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    b = fit_to_free_cpus(cfg.build, use_gpu)
    tally = ray.remote(num_cpus=0)(Tally).remote()
    ds, source = embedded_images(images, listed, b, use_gpu, cfg.model.model_dump(), cfg.decode.model_dump(),
                                 slot_table=slot_table, tally=tally)
    out_fs, out_path = storage.resolve(emb_uri)
    replace_ray_data_bars()
    try:
        with Progress("embedding", len(listed), "images") as progress:
            stop = poll(progress, lambda: ray.get(tally.get.remote()))
            try:
                ds.write_parquet(out_path, filesystem=out_fs, partition_cols=["shard"])
            finally:
                stop()
            progress.update_to(ray.get(tally.get.remote()))
    finally:
        ray.kill(tally)
    failed = write_failed(index_dir, emb_uri)
    m = finish_index(index_dir, cfg, version, emb_name, num_shards, slot_table, factory, cfg.model.model_dump(),
                     [source])
    return BuildSummary(m.total, failed, time.time() - t0, m)


