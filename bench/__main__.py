"""`python -m bench VERB --out DIR [--quick]`

  all        every benchmark below, in one run on this machine; writes all.json, all.md and PNGs
  search     recall@10 vs QPS: service HTTP, ShardedIndex, plain FAISS, Milvus Lite, Qdrant, LanceDB
  serving    every HTTP engine under one load generator (wrk) at 1/8/32 connections: the service (JSON,
             binary; direct and Serve-handle fan-out), one-process uvicorn+FAISS, Chroma's server
             (REST), the generator's ceiling; then CPU ms per request by process and stage (py-spy)
  levers     each Ray Serve fast path on and off, each in a fresh Ray, on the same vectors
  embedding  images/s: Embedder deployment over HTTP and through a handle vs plain loops, torch and ONNX
  indexing   images/s: `python -m indexing build` end to end vs single-process loops, torch and ONNX
  load       p50/p99 of image and vector queries at rising concurrency, with the saturation point
  memory     resident bytes per vector of a shard replica vs the code size of the factory
  routing    shards a query visits under hash vs cell placement, at 8/64/384 simulated shards, on the
             real photos' embeddings and on synthetic vectors (1M; --quick 50k): recall@10, skew
  corpus     images/s of `python -m indexing search` vs POST /search driven by wrk at its best concurrency,
             on mildly edited copies of --images (1,500; --quick 300), and their top-1 agreement
  corpus-scaling  `python -m indexing copy-groups` on 100k vectors with planted near-copies (--quick 20k)
             on a ray.cluster_utils.Cluster of 1 and 2 worker nodes: time per job, work per node
  chaos      a multi-node cluster on this machine under load through node loss, a rolling redeploy
             and SIGKILLs of every component; every request's outcome checked (docs/reliability.md)

Real vectors and images come from --images (default $DATA/scene15, docs/data.md); the peers are optional
extras: pip install -e '.[bench]'."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from configs import logs
from configs.progress import Progress

LOG = logging.getLogger("bench")

SIZES = {  # quick: a few minutes on 2 cores; full: the sizes the issue asks for
    True: {"index_images": 300, "embed_images": 64, "real_views": 1, "synthetic": 50_000, "queries": 200,
           "memory": (20_000, 100_000), "serving": 100_000},
    False: {"index_images": 1500, "embed_images": 256, "real_views": 4, "synthetic": 1_000_000, "queries": 500,
            "memory": (100_000, 1_000_000), "serving": 100_000},
}


class Service:
    """The service deployed from serve_config.yaml, redeployed per index."""

    def __init__(self, port: int):
        self.port, self.url = port, None

    def serve(self, index_dir: str, config: str | None = None) -> str:
        import httpx

        from deployments.__main__ import DEFAULT_SERVE_CONFIG, deploy, load_serve_config

        from ray import serve

        t0 = time.time()
        self.url = deploy(load_serve_config(str(DEFAULT_SERVE_CONFIG), index_dir, config, self.port))
        deadline = t0 + 600
        while time.time() < deadline:  # until this deploy runs and answers, not the one it replaces
            app = serve.status().applications.get("imsearch")
            try:
                if app and app.status == "RUNNING" and app.last_deployed_time_s >= t0 - 1:
                    s = httpx.get(f"{self.url}/stats", timeout=10).json()
                    if s.get("index_dir") == os.path.abspath(index_dir) and s.get("total") is not None:
                        return self.url
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the service did not come up on {index_dir}")


def run(verbs: list[str], images: str, out: str, quick: bool, port: int, factory: str | None = None,
        nprobe: int = 32, baseline_tree: str | None = None) -> dict:
    from bench import plots
    from bench.common import machine, write_results

    import ray

    from deployments import environment

    environment.apply()
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), namespace="serve", include_dashboard=False, logging_level="WARNING")
    size = SIZES[quick]
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    results: dict = {"machine": machine(), "quick": quick, "sizes": size}
    svc = Service(port)
    t0 = time.time()
    # One line per benchmark finished: the full run takes about an hour on 2 cores.
    progress = Progress("bench", len(verbs), "benchmarks", every_s=0)
    real_index = None
    if "indexing" in verbs or "embedding" in verbs or "load" in verbs:
        from bench.indexing_speed import bench_indexing

        results["indexing"], real_index = bench_indexing(images, work, size["index_images"])
        if "indexing" in verbs:
            progress.update()
    if "embedding" in verbs:
        from bench.embedding_speed import bench_embedding
        from bench.load import queries

        def serve_in(runtime: str) -> str:
            config = os.path.join(work, f"runtime-{runtime}.yaml")  # written by the indexing benchmark
            return svc.serve(real_index, config)

        _, blobs = queries(real_index, size["embed_images"])
        results["embedding"] = bench_embedding(blobs, serve_in)
        progress.update()
    if "load" in verbs:
        from bench.load import bench_load

        url = svc.serve(real_index)
        results["load"] = bench_load(real_index, url, quick)
        progress.update()
    if "memory" in verbs:
        from bench.memory import bench_memory

        results["memory"] = bench_memory(work, size["memory"], baseline_tree=baseline_tree)
        progress.update()
    from bench.vectors import real_embeddings, synthetic

    def serving_set():  # the vectors of issue 12's serving comparison: 100k x 256, clustered
        return synthetic(size["serving"], dim=256, queries=size["queries"])

    if "search" in verbs:
        from bench.search import bench_search

        results["search"] = []
        for make in (serving_set,
                     lambda: real_embeddings(images, os.path.join(work, "cache"), size["real_views"], size["queries"]),
                     lambda: synthetic(size["synthetic"], queries=size["queries"])):
            results["search"] += bench_search(make(), work, svc.serve, factory=factory)
        progress.update()
    if "serving" in verbs:
        from bench.serving import bench_serving

        results["serving"] = bench_serving(serving_set(), work, svc.serve, nprobe=nprobe,
                                           seconds=5 if quick else 10, profile_s=10 if quick else 20)
        progress.update()
    if "corpus" in verbs:
        from bench.corpus import bench_bulk, plot, write

        results["corpus"] = bench_bulk(images, work, svc.serve, size["index_images"], seconds=5 if quick else 10)
        write(out, "corpus-search", results["corpus"])
        plot(results["corpus"], os.path.join(out, "corpus-search.png"))
        progress.update()
    if "levers" in verbs:
        from bench.levers import run_levers
        from bench.search import factory_for, sharded

        vs = serving_set()
        index_dir = os.path.join(work, f"index-{vs.name}")
        sharded(vs, factory_for(vs)[0], index_dir, 2)
        ray.shutdown()  # each lever starts its own Ray
        results["levers"] = run_levers(vs, index_dir, work, nprobe)
        progress.update()
    progress.close()
    results["seconds"] = round(time.time() - t0, 1)
    write_results(out, "all" if len(verbs) > 1 else verbs[0], results, plots.markdown(results))
    plots.plot_all(results, out)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("verb", choices=["all", "search", "serving", "levers", "embedding", "indexing", "load", "memory", "chaos", "routing",
                                      "verify", "corpus", "corpus-scaling"])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--images", default=os.path.join(os.environ.get("DATA", os.path.join("..", "shared", "data")), "scene15"),
                   help="folder of real photos (default: $DATA/scene15, see docs/data.md)")
    p.add_argument("--quick", action="store_true", help="small sizes that finish in minutes on 2 cores")
    p.add_argument("--port", type=int, default=8311, help="port of the benchmarked service")
    p.add_argument("--baseline-tree", help="memory: also measure the shard code of this checkout of an earlier "
                   "revision (git worktree add DIR REV) on the same indexes")
    p.add_argument("--factory", help="search: FAISS factory for every engine instead of the service's default "
                   "(e.g. 'IVF{nlist},Flat' to compare at Chroma's recall)")
    p.add_argument("--nprobe", type=int, default=32, help="serving, levers: nprobe of the HTTP engines (32: recall@10 "
                   "1.000 on the serving vectors, so quantization flatters no one)")
    p.add_argument("--minutes", type=float, default=10, help="chaos: how long the faults go on")
    p.add_argument("--seed", type=int, default=0, help="chaos: seed of the load and of the order of the kills")
    p.add_argument("--replicas", type=int, default=2, help="chaos: replicas per shard (1: node loss gives partial answers)")
    p.add_argument("--compact-after-bytes", type=int, help="chaos: shards compact after this many log bytes "
                   "(small: many compactions under the faults)")
    p.add_argument("--switch-shards", type=int, help="chaos: a last phase rebalances to this many shards under "
                   "load and switches to the new version")
    p.add_argument("--url", help="verify: the running service to measure, serving an index of --images")
    args = p.parse_args(argv)
    logs.setup(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.verb == "chaos":
        from bench.chaos import markdown, run_chaos, write_report

        report = run_chaos(os.path.join(args.out, "work-chaos"), args.minutes, args.seed, args.replicas, args.port,
                           args.compact_after_bytes, args.switch_shards)
        write_report(args.out, report)
        print(markdown(report))
        return 0
    if args.verb == "corpus-scaling":
        from bench.corpus import bench_scaling, plot, write

        work = os.path.join(args.out, "work")
        os.makedirs(work, exist_ok=True)
        report = bench_scaling(work, 20_000 if args.quick else 100_000, 1_000 if args.quick else 5_000)
        print(write(args.out, "corpus-scaling", report))
        plot(report, os.path.join(args.out, "corpus-scaling.png"))
        return 0
    if not os.path.isdir(args.images):
        print(f"error: --images {args.images} is not a folder of photos", file=sys.stderr)
        return 2
    if args.verb == "verify":
        if not args.url:
            print("error: verify measures a running service: give --url (an index of --images)", file=sys.stderr)
            return 2
        from bench.verify import markdown, run_verify, write_report

        report = run_verify(args.url, args.images, 30 if args.quick else 100)
        write_report(report, args.out)
        print(markdown(report))
        return 0
    if args.verb == "routing":
        from bench.routing import markdown, run_routing, write_report
        from bench.vectors import real_embeddings, synthetic

        size = SIZES[args.quick]
        sets = [real_embeddings(args.images, os.path.join(args.out, "work", "cache"), size["real_views"]),
                synthetic(size["synthetic"], queries=2000)]
        report = run_routing(sets)
        import ray

        from bench.routing import served
        from deployments import environment

        environment.apply()
        ray.init(num_cpus=os.cpu_count(), namespace="serve", include_dashboard=False, logging_level="WARNING")
        report["served"] = served(synthetic(size["serving"], queries=500, seed=1), os.path.join(args.out, "work"),
                                  args.port, requests=100 if args.quick else 400)
        write_report(report, args.out)
        print(markdown(report))
        return 0
    verbs = ["indexing", "embedding", "load", "memory", "search", "serving"] if args.verb == "all" else [args.verb]
    results = run(verbs, args.images, args.out, args.quick, args.port, args.factory, args.nprobe, args.baseline_tree)
    print(open(os.path.join(args.out, f"{'all' if args.verb == 'all' else args.verb}.md")).read())
    print(json.dumps({"seconds": results["seconds"], "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
