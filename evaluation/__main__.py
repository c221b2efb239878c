"""`python -m evaluation run|ann|edits|codecs|copies|copy-groups`: retrieval quality of the model, ANN quality
of an index, robustness to edits, and the quality of copy groups."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from configs import logs
from configs.schema import ConfigError, load_config


def _print_table(d: dict) -> None:
    for key, v in d.items():
        if not isinstance(v, (dict, list)):
            print(f"  {key:>12}: {v:.4f}" if isinstance(v, float) else f"  {key:>12}: {v}")


def _cmd_run(args) -> int:
    from evaluation.run import (
        category_judgements, in_process_searcher, model_summary, pair_judgements, run_evaluation, service_searcher,
    )

    if bool(args.labels) == bool(args.pairs):
        raise ValueError("give exactly one of --labels CSV (path,category) or --pairs CSV (query,relevant)")
    if args.params and not args.url:
        raise ValueError("--params are sent with --url searches; there is no service without --url")
    if args.labels and not args.leave_one_out:
        raise ValueError("category labels are evaluated leave-one-out: add --leave-one-out")
    root = args.root or os.path.dirname(os.path.abspath(args.labels or args.pairs))
    if args.queries and not args.labels:
        raise ValueError("--queries picks query images among --labels; with --pairs the queries are the CSV's")
    judged = category_judgements(args.labels, args.queries) if args.labels else pair_judgements(args.pairs, args.database)
    cfg = load_config(args.config)
    if args.url:
        search = service_searcher(root, args.url, args.token or os.environ.get("IMSEARCH_TOKEN"), args.params)
        where = {"url": args.url, **({"params": args.params} if args.params else {})}
    else:
        import ray

        from evaluation.run import read_images

        read_images(root, judged.database[:1] + judged.database[-1:])  # a wrong --root fails before Ray starts
        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        search, factory = in_process_searcher(root, judged.database, cfg, args.factory)
        where = {"factory": factory}
    result = run_evaluation(judged, search, args.k, args.recall_k, depth=min(len(judged.database), 1000) if args.url else None)
    result.update(model=model_summary(cfg.model), **where)
    print(f"{judged.protocol}: {result['queries']} queries against {result['database']} images")
    _print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _cmd_ann(args) -> int:
    from evaluation.ann import ann_sweep, plot_sweep

    result = ann_sweep(args.index_dir, args.nprobe, args.queries)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ann.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_sweep(result, os.path.join(args.out, "ann.png"))
    print(f"{result['factory']}: {result['ntotal']} vectors, dim {result['dim']}, "
          f"{result['code_bytes_per_vector']} code bytes/vector, default nprobe {result['default_nprobe']}")
    print("| nprobe | " + " | ".join(k for k in result["rows"][0] if k != "nprobe") + " |")
    for r in result["rows"]:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return 0


def _cmd_edits(args) -> int:
    import json

    from embedding.embedder import Embedder
    from evaluation.edits import HEAVY_EDITS, verified_recall
    from evaluation.run import read_csv, read_images

    root = args.root or os.path.dirname(os.path.abspath(args.labels))
    paths = [r[0] for r in read_csv(args.labels, ("path",))][:: args.every]
    originals = read_images(root, paths)
    queries = list(range(0, len(originals), args.queries_every))
    cfg = load_config(args.config)
    emb = Embedder(cfg.model)
    mild = dict(scale=args.scale, quality=args.quality, crop=args.crop, rotate=args.rotate, hue=args.hue,
                saturation=args.saturation)
    min_inliers = args.min_inliers or cfg.serve.verify_min_inliers
    rows = []
    print(f"{len(queries)} edited copies searched among {len(originals)} images (image_size {emb.cfg.image_size}, "
          f"verified with >= {min_inliers} inliers)")
    for name, edit in ([] if args.heavy else [("mild", mild)]) + [("heavy", HEAVY_EDITS)]:
        for r in verified_recall(emb, originals, queries, edit, args.verify_top, min_inliers, cfg.decode):
            rows.append({"edits": name, **r})
            cost = f", {r['ms_per_query_cached']} ms/query with candidate features at hand, " \
                   f"{r['ms_per_query_uncached']} ms without" if r["verify_top"] else ""
            held = f" (original in the top {r['verify_top']}: {r['shortlist_recall']:.4f})" if r["verify_top"] else ""
            print(f"{name:5s} verify top {r['verify_top']:3d}: recall@1 {r['recall@1']:.4f}, "
                  f"recall@10 {r['recall@10']:.4f}{held}{cost}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"images": len(originals), "queries": len(queries), "min_inliers": min_inliers,
                       "mild": mild, "heavy": HEAVY_EDITS, "rows": rows}, f, indent=1)
    return 0


def _cmd_copies(args) -> int:
    from evaluation.edits import copy_hash_report
    from evaluation.run import read_csv, read_images

    root = args.root or os.path.dirname(os.path.abspath(args.labels))
    paths = [r[0] for r in read_csv(args.labels, ("path",))][:: args.every]
    cfg = load_config(args.config)
    bits = cfg.serve.near_duplicate_bits if args.bits is None else args.bits
    if bits is None:
        raise ValueError("serve.near_duplicate_bits is null (identical bytes only): give --bits to calibrate")
    rows = copy_hash_report(read_images(root, paths), cfg.model.image_size, bits, cfg.decode)
    print(f"perceptual-hash bits (of 64) over {len(paths)} images, image_size {cfg.model.image_size}:")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return 0


def _cmd_codecs(args) -> int:
    from evaluation.codecs import FACTORIES, codec_quality, embed_study
    from evaluation.run import category_judgements, read_images

    judged = category_judgements(args.labels)
    root = args.root or os.path.dirname(os.path.abspath(args.labels))
    read_images(root, judged.database[:1])  # a wrong --root fails now, not after minutes of embedding
    edit = {"crop": args.crop, "scale": args.scale, "quality": args.quality}
    study = embed_study(root, judged.database, args.views, edit, args.cache)
    nprobe = load_config(args.config).index.nprobe
    rows = []
    for factory in args.factories or FACTORIES:
        rows.append(codec_quality(judged, judged.database, study, factory, nprobe))
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in rows[-1].values()) + " |",
              flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"photos": len(judged.database), "views": args.views, "edit": edit, "nprobe": nprobe,
                       "rows": rows}, f, indent=1)
    return 0


def _cmd_copy_groups(args) -> int:
    from evaluation.groups import pairwise_quality, read_truth, write_copy_corpus
    from evaluation.run import read_csv
    from indexing.__main__ import main as indexing_main

    root = args.root or os.path.dirname(os.path.abspath(args.labels))
    corpus, index, out = (os.path.join(args.work, d) for d in ("corpus", "index", "groups"))
    if not os.path.exists(os.path.join(corpus, "truth.csv")):
        paths = [r[0] for r in read_csv(args.labels, ("path",))]
        rows = write_copy_corpus(root, paths, corpus, args.copied, args.seed)
        print(f"wrote {len(rows)} files ({len(paths)} photos, {args.copied} of them with 4 edited copies) to {corpus}")
    config = ["--config", args.config] if args.config else []
    if not os.path.exists(os.path.join(index, "manifest.json")):
        if indexing_main(["build", "--images", corpus, "--index-dir", index, *config]):
            return 2
    extra = ["--neighbours", str(args.neighbours)] if args.neighbours else []
    if indexing_main(["copy-groups", "--index-dir", index, "--out", out, *config, *extra]):
        return 2
    import pyarrow.parquet as pq

    groups = pq.read_table(os.path.join(out, "groups.parquet"), columns=["group", "uri"]).to_pylist()
    group_of = {os.path.relpath(g["uri"], corpus): g["group"] for g in groups}
    result = pairwise_quality(group_of, read_truth(corpus))
    if args.same_photo:
        also = pairwise_quality(group_of, read_truth(corpus, args.same_photo))
        result["with_same_photo"] = {"file": args.same_photo, "precision": also["precision"],
                                     "recall_all": also["recall_all"], "wrong": also["wrong"]}
    with open(os.path.join(out, "summary.json")) as f:
        result["job"] = json.load(f)
    recall = ", ".join(f"{k} {result[f'recall_{k}']:.4f}" for k in ("mild", "heavy", "all")
                       if result[f"recall_{k}"] is not None)
    print(f"pairwise precision {result['precision']:.4f} over {result['pairs_grouped']} grouped pairs; recall: {recall}")
    for w in result["wrong"]:
        print(f"  {w['pairs']} pairs join the files of two photos: {' and '.join(w['photos'])}")
    if args.same_photo:
        print(f"pairwise precision {result['with_same_photo']['precision']:.4f} counting the pairs of {args.same_photo} "
              "as one photo each")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="nDCG@k, P@k, mAP, recall@k and MRR on labelled images")
    r.add_argument("--labels", help="CSV path,category (category level)")
    r.add_argument("--pairs", help="CSV query,relevant (instance level)")
    r.add_argument("--database", help="for --pairs: file listing the database images, one per line")
    r.add_argument("--root", help="folder the CSV paths are relative to (default: the CSV's folder)")
    r.add_argument("--leave-one-out", action="store_true", help="every image queries all the others")
    r.add_argument("--queries", help="with --labels: file listing the query images, one per line (default: all); "
                   "the database stays every labelled image, e.g. the held-out list `training train` writes")
    r.add_argument("--k", type=int, default=10, help="cutoff of nDCG@k and P@k")
    r.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    r.add_argument("--url", help="evaluate a running service instead of an in-process index")
    r.add_argument("--params", default="", help="query-string parameters of each --url search, e.g. verify=false")
    r.add_argument("--token", help="bearer token for a service with read tokens (default: env IMSEARCH_TOKEN)")
    r.add_argument("--factory", help="index factory for the in-process index (default: the config's)")
    r.add_argument("--config", help="YAML config (model settings)")
    r.add_argument("--out", help="write the metrics as JSON here")
    r.set_defaults(fn=_cmd_run)
    a = sub.add_parser("ann", help="recall@1/10/100 vs exact search, swept over nprobe")
    a.add_argument("--index-dir", required=True)
    a.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    a.add_argument("--queries", type=int, default=1000)
    a.add_argument("--out", default="bench/results/ann")
    a.set_defaults(fn=_cmd_ann)
    e = sub.add_parser("edits", help="rank-1 self retrieval of edited copies (near-duplicate robustness)")
    e.add_argument("--labels", required=True, help="CSV whose first column lists the images")
    e.add_argument("--root", help="folder the CSV paths are relative to (default: the CSV's folder)")
    e.add_argument("--every", type=int, default=1, help="use every n-th image")
    e.add_argument("--crop", type=float, default=0.05, help="fraction cropped from each side")
    e.add_argument("--scale", type=float, default=0.5)
    e.add_argument("--quality", type=int, default=50, help="JPEG quality of the copy")
    e.add_argument("--rotate", type=float, default=0.0, help="rotation in degrees (corners cropped off)")
    e.add_argument("--hue", type=float, default=0.0, help="hue shift, fraction of the colour wheel")
    e.add_argument("--saturation", type=float, default=1.0, help="saturation factor")
    e.add_argument("--heavy", action="store_true",
                   help="only the heavy edit set (crop to 50%% area, 15 deg, hue+saturation, q20), not the mild one too")
    e.add_argument("--queries-every", type=int, default=1, help="an edited copy of every n-th image is a query")
    e.add_argument("--verify-top", type=int, nargs="+", default=[0],
                   help="re-rank the top N by geometric verification (local features + RANSAC); 0: none")
    e.add_argument("--min-inliers", type=int, help="inliers that make a verified match (default serve.verify_min_inliers)")
    e.add_argument("--out", help="write the rows as JSON here")
    e.add_argument("--config", help="YAML config (model settings)")
    e.set_defaults(fn=_cmd_edits)
    q = sub.add_parser("codecs", help="quality per byte: nDCG@10, mAP and near-duplicate recall@1 of FAISS factories")
    q.add_argument("--labels", required=True, help="CSV path,category")
    q.add_argument("--root", help="folder the CSV paths are relative to (default: the CSV's folder)")
    q.add_argument("--views", type=int, default=5, help="the photos plus views-1 augmented views train the codecs")
    q.add_argument("--factories", nargs="+", help="factory strings with optional {nlist} (default: a sweep of code sizes)")
    q.add_argument("--crop", type=float, default=0.05, help="edited copy: fraction cropped from each side")
    q.add_argument("--scale", type=float, default=0.5, help="edited copy: resize factor")
    q.add_argument("--quality", type=int, default=50, help="edited copy: JPEG quality")
    q.add_argument("--cache", default="bench/results/cache", help="where the embeddings are cached")
    q.add_argument("--config", help="YAML config (index.nprobe)")
    q.add_argument("--out", help="write the rows as JSON here")
    q.set_defaults(fn=_cmd_codecs)
    c = sub.add_parser("copies", help="perceptual-hash bits of edited copies vs distinct images (collapse threshold)")
    c.add_argument("--labels", required=True, help="CSV whose first column lists the images")
    c.add_argument("--root", help="folder the CSV paths are relative to (default: the CSV's folder)")
    c.add_argument("--every", type=int, default=1, help="use every n-th image")
    c.add_argument("--bits", type=int, help="threshold to report the share within (default: serve.near_duplicate_bits)")
    c.add_argument("--config", help="YAML config (model.image_size, serve.near_duplicate_bits)")
    c.set_defaults(fn=_cmd_copies)
    g = sub.add_parser("copy-groups", help="pairwise precision and recall of `indexing copy-groups` on photos with "
                       "planted edited copies")
    g.add_argument("--labels", required=True, help="CSV whose first column lists the photos (e.g. scene15's labels.csv)")
    g.add_argument("--root", help="folder the CSV paths are relative to (default: the CSV's folder)")
    g.add_argument("--work", required=True, help="folder for the corpus, its index and the groups (reused when present)")
    g.add_argument("--copied", type=int, default=300, help="photos given 2 mild and 2 heavy edited copies")
    g.add_argument("--seed", type=int, default=0, help="which photos are copied")
    g.add_argument("--neighbours", type=int, help="candidates per image (default: corpus.neighbours)")
    g.add_argument("--same-photo", help="CSV of pairs of --labels paths that show one photo (the set's own copies, "
                   "checked by eye): precision is also given counting them as one photo")
    g.add_argument("--config", help="YAML config")
    g.add_argument("--out", help="write the result as JSON here")
    g.set_defaults(fn=_cmd_copy_groups)
    args = p.parse_args(argv)
    logs.setup(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per query sent to --url
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
