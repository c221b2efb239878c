"""`python -m indexing VERB`: build, ingest, rebalance, copy-groups, search, demo-images."""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from configs import logs
from configs.schema import ConfigError, load_config

LOG = logging.getLogger("indexing")


class UsageError(ValueError):
    """Bad command-line input; printed without a traceback."""


def _cmd_build(args) -> int:
    from indexing.build import build_from_images, build_from_vectors

    if bool(args.images) == bool(args.vectors):
        raise UsageError("give exactly one of --images PATH or --vectors FILE.npy")
    if args.ids and not args.vectors:
        raise UsageError("--ids goes with --vectors")
    if args.shards is not None and args.shards < 1:
        raise UsageError(f"--shards must be >= 1, got {args.shards}")
    cfg = load_config(args.config, {"index": {"placement": args.placement}} if args.placement else None)
    if args.vectors:
        vectors = _load_npy(args.vectors, "--vectors")
        ids = _load_npy(args.ids, "--ids") if args.ids else None
        _init_ray(args.address)
        summary = build_from_vectors(vectors, ids, args.index_dir, cfg, args.shards, args.factory)
    else:
        _check_images(args.images, cfg.build.extensions)
        _init_ray(args.address)
        summary = build_from_images(args.images, args.index_dir, cfg, args.shards, args.factory)
    print(summary.line(), flush=True)
    return 0


def _cmd_ingest(args) -> int:
    import os

    from indexing.ingest import ingest

    # The service's own variable works too (its first token), so one export serves both sides.
    token = args.token or os.environ.get("IMSEARCH_TOKEN") or os.environ.get("IMSEARCH_WRITE_TOKENS", "").split(",")[0].strip()
    if not token:
        raise UsageError("a write token is needed: --token, or the environment variable IMSEARCH_WRITE_TOKENS "
                         "(the one the service reads) or IMSEARCH_TOKEN")
    cfg = load_config(args.config)
    import httpx

    try:
        summary = ingest(args.images, args.url, token, cfg.build.extensions, args.concurrency, args.prefix, args.replace)
    except httpx.HTTPError as e:
        raise UsageError(f"cannot talk to the service at {args.url}: {e}") from None
    print(summary.line(), flush=True)
    if summary.collisions:
        print(f"error: {len(summary.collisions)} files under the index's image folders hold other bytes than the "
              "image indexed under their path, and were not sent: overwrite with --replace, or give this folder "
              "ids of its own with --prefix NAME:\n  "
              + "\n  ".join(summary.collisions[:20]), file=sys.stderr)
    return 0 if summary.failed == summary.collided == 0 else 1


def _cmd_rebalance(args) -> int:
    from indexing.manifest import read_manifest
    from indexing.rebalance import rebalance

    if args.shards < 1:
        raise UsageError(f"--shards must be >= 1, got {args.shards}")
    read_manifest(args.index_dir)  # no index there fails now, not after Ray has started
    _init_ray(args.address)
    cfg = load_config(args.config)
    m = rebalance(args.index_dir, args.shards, task_cpus=cfg.build.shard_task_cpus)
    sizes = [s.count for s in m.shards]
    print(f"version {m.version}: {m.total} vectors over {m.num_shards} shards, sizes {sizes}", flush=True)
    return 0


def _cmd_copy_groups(args) -> int:
    from indexing.copygroups import copy_groups
    from indexing.manifest import read_manifest

    _check_nprobe(args.nprobe)
    read_manifest(args.index_dir)  # no index there fails now, not after Ray has started
    cfg = load_config(args.config, _corpus_overrides(args))
    _init_ray(args.address)
    summary = copy_groups(args.index_dir, args.out, cfg, args.nprobe, _allowed(args.allow))
    print(summary.line(), flush=True)
    return 0


def _cmd_search(args) -> int:
    from indexing.bulksearch import bulk_search
    from indexing.manifest import read_manifest

    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    _check_nprobe(args.nprobe)
    cfg = load_config(args.config)
    read_manifest(args.index_dir)
    _check_images(args.images, cfg.build.extensions)
    _init_ray(args.address)
    summary = bulk_search(args.images, args.index_dir, args.out, cfg, k=args.k, verify=args.verify,
                          include_private=args.include_private, dedupe=not args.no_dedupe, nprobe=args.nprobe,
                          allow=_allowed(args.allow))
    print(summary.line(), flush=True)
    return 0


def _check_images(images: str, extensions: tuple[str, ...]) -> None:
    """A missing folder, or a local one without images, fails before Ray starts, not after."""
    from indexing import storage

    storage.check_folder(images)
    if storage.is_local(images) and next(storage.list_files(images, extensions), None) is None:
        raise UsageError(f"no images with endings {list(extensions)} under {images}")


def _check_nprobe(nprobe: int | None) -> None:
    if nprobe is not None and nprobe < 1:
        raise UsageError(f"--nprobe must be >= 1, got {nprobe}")


def _job_options(p: argparse.ArgumentParser, nprobe_default: str) -> None:
    """The options the corpus jobs share: the index, where verification may read, the cluster."""
    p.add_argument("--index-dir", required=True, help="the index (path or URI), read as the service reads it")
    p.add_argument("--nprobe", type=int, help=f"IVF cells visited per search (default: {nprobe_default})")
    p.add_argument("--allow", action="append", metavar="FOLDER",
                   help="verification may also read images under FOLDER (as `deployments allow` lets the service); "
                        "the index's image folders and serve.uri_roots always")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")


def _allowed(folders: list[str] | None) -> list[str]:
    """--allow folders as the service's `deployments allow` records them (absolute, links resolved)."""
    import os

    return [f if "://" in f else os.path.realpath(f) for f in folders or []]


def _corpus_overrides(args) -> dict:
    over = {k: v for k, v in (("neighbours", args.neighbours), ("min_score", args.min_score)) if v is not None}
    if args.no_verify:
        over["verify"] = False
    return {"corpus": over} if over else {}


def _cmd_demo_images(args) -> int:
    from indexing.demo import write_demo_images

    n = write_demo_images(args.out, with_variants=not args.originals_only)
    print(f"wrote {n} demo images to {args.out}")
    return 0


def _load_npy(path: str, flag: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: cannot read as .npy ({e})")


def _init_ray(address: str | None) -> None:
    import os

    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(num_cpus=os.cpu_count(), logging_level="WARNING", include_dashboard=False)
    logs.quiet_ray()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m indexing", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="build a sharded FAISS index from images or vectors")
    b.add_argument("--images", help="folder or URI prefix of images (s3://bucket/prefix, ...)")
    b.add_argument("--vectors", help=".npy file of (n, d) float32 vectors embedded elsewhere")
    b.add_argument("--ids", help=".npy file of n int64 ids for --vectors (default 0..n-1)")
    b.add_argument("--index-dir", required=True, help="where the index is written (path or URI)")
    b.add_argument("--shards", type=int, help="number of shards (default: index.shards in the config)")
    b.add_argument("--factory", help="FAISS index_factory string, overriding index.factory")
    b.add_argument("--placement", choices=["hash", "cells"],
                   help="hash: ids by slot, every query visits every shard; cells: vectors by IVF cell, a query "
                        "visits only the shards of its nearest cells (default: index.placement in the config)")
    b.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    b.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    b.set_defaults(fn=_cmd_build)
    g = sub.add_parser("ingest", help="send new images to a running service through its write API")
    g.add_argument("--images", required=True, help="folder or URI prefix of new images")
    g.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--token", help="write token (default: env IMSEARCH_TOKEN, else the first of IMSEARCH_WRITE_TOKENS)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    g.add_argument("--prefix", default="", help="name this folder's images by path: id = hash(PREFIX/relative path) "
                   "(default: a file under the index's image folders gets the build's id of its path, any other "
                   "an id from its bytes)")
    g.add_argument("--replace", action="store_true",
                   help="overwrite an indexed image whose id a different file here derives (default: report it)")
    g.add_argument("--config", help="YAML config (image file endings)")
    g.set_defaults(fn=_cmd_ingest)
    r = sub.add_parser("rebalance", help="redistribute the vectors over M shards (no re-embedding)")
    r.add_argument("--index-dir", required=True)
    r.add_argument("--shards", type=int, required=True)
    r.add_argument("--config", help="YAML config (build.shard_task_cpus)")
    r.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    r.set_defaults(fn=_cmd_rebalance)
    c = sub.add_parser("copy-groups", help="group the indexed images that are copies of each other")
    _job_options(c, "corpus.nprobe")
    c.add_argument("--out", required=True, help="folder for groups.parquet, pairs.parquet, failed.jsonl, summary.json")
    c.add_argument("--neighbours", type=int, help="nearest vectors taken as candidates (default: corpus.neighbours)")
    c.add_argument("--min-score", type=float, help="lowest candidate score (default: corpus.min_score)")
    c.add_argument("--no-verify", action="store_true",
                   help="no local-feature verification: the hash rule and corpus.sure_score alone")
    c.add_argument("--config", help="YAML config (corpus, serve.near_duplicate_bits, serve.verify_min_inliers)")
    c.set_defaults(fn=_cmd_copy_groups)
    s = sub.add_parser("search", help="search a folder of query images as POST /search would, as one batch job")
    _job_options(s, "the index's")
    s.add_argument("--images", required=True, help="folder or URI prefix of query images")
    s.add_argument("--out", required=True, help="folder for results.parquet and failed.jsonl")
    s.add_argument("--k", type=int, default=10, help="results per query")
    s.add_argument("--verify", action="store_true", help="verify the shortlist by local features (?verify=true)")
    s.add_argument("--include-private", action="store_true", help="return private and unsafe images too")
    s.add_argument("--no-dedupe", action="store_true", help="keep copies of a better result (?dedupe=false)")
    s.add_argument("--config", help="YAML config (model, serve ranking policy, corpus)")
    s.set_defaults(fn=_cmd_search)
    d = sub.add_parser("demo-images", help="write the demo corpus (scikit-image photos + variants)")
    d.add_argument("--out", required=True)
    d.add_argument("--originals-only", action="store_true")
    d.set_defaults(fn=_cmd_demo_images)
    args = p.parse_args(argv)
    logs.setup(logging.INFO)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError, PermissionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
