"""Markdown tables and PNG plots of a benchmark run."""
from __future__ import annotations

import os

from bench.common import markdown_table

COLUMNS = {
    "indexing": ["path", "images", "seconds", "images_per_s", "vs_torch_loop"],
    "embedding": ["path", "images", "errors", "images_per_s", "vs_torch_loop", "p50_ms", "p99_ms"],
    "load": ["mode", "concurrency", "requests", "errors", "p50_ms", "p99_ms", "qps", "saturation", "stopped"],
    "memory": ["factory", "impl", "vectors", "dim", "code_plus_id_bytes", "ready_s", "load_anon_mb", "load_file_mb",
               "scanned_anon_mb", "scanned_file_mb", "private_bytes_per_vector", "page_cache_bytes_per_vector",
               "scanned_bytes_per_vector"],
    "search": ["dataset", "engine", "index", "nprobe", "concurrency", "recall@10", "qps", "ms_per_query", "p50_ms", "p99_ms", "build_s"],
    "levers": ["lever", "engine", "concurrency", "recall@10", "qps", "p50_ms", "p99_ms", "errors"],
    "serving": ["engine", "concurrency", "recall@10", "qps", "p50_ms", "p99_ms", "errors", "note"],
}
TITLES = {
    "search": "Search: recall@10 vs queries per second (one query per call)",
    "embedding": "Embedding throughput",
    "indexing": "Indexing throughput",
    "load": "Latency under load (HTTP vs in-process)",
    "memory": "Memory per vector in a shard replica",
    "levers": "Ray Serve fast paths, each measured in a fresh Ray (vector queries over HTTP, JSON)",
    "serving": "HTTP engines under one load generator (wrk), vector queries",
}


def markdown(results: dict) -> str:
    """One section per benchmark that ran, with the machine on top."""
    m = results["machine"]
    parts = [f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; run {m['when']} "
             f"({'--quick' if results['quick'] else 'full'} sizes, {results.get('seconds', 0):.0f} s)."]
    for key in ("search", "levers", "indexing", "embedding", "load", "memory"):
        if results.get(key):
            parts.append(f"### {TITLES[key]}\n\n" + markdown_table(results[key], COLUMNS[key]))
    if results.get("serving"):
        parts.append(serving_markdown(results["serving"]))
    return "\n\n".join(parts)


def serving_markdown(out: dict) -> str:
    """The engines table, the issue's ratios, and CPU ms per request by process and stage."""
    from bench.profile import by_stage
    from bench.serving import ratios

    parts = [f"### {TITLES['serving']}\n\n{out['n']:,} x {out['dim']} vectors, k {out['k']}, "
             f"{out['seconds_per_level']:g} s per level\n\n" + markdown_table(out["rows"], COLUMNS["serving"])]
    parts.append("#### Ratios (service JSON)\n\n" + markdown_table(
        ratios(out), ["concurrency", "service_qps", "chroma", "chroma_recall", "over_chroma", "over_one_process",
                      "p99_over_p50"]))
    for name, prof in out.get("profiles", {}).items():
        row = prof["row"]
        procs = [{"process": g, "cpu_ms_per_request": ms} for g, ms in prof["processes"].items()]
        procs.append({"process": "all", "cpu_ms_per_request": sum(prof["processes"].values())})
        stages = [{"stage": s, "cpu_ms_per_request": ms} for s, ms in by_stage(prof).items()]
        parts.append(f"#### CPU per request: {name} (32 connections, {row['qps']:.0f} QPS, "
                     f"{row['cpu_cores_busy']} cores busy)\n\n" + markdown_table(procs, ["process", "cpu_ms_per_request"])
                     + "\n\n" + markdown_table(stages, ["stage", "cpu_ms_per_request"]))
    return "\n\n".join(parts)


def plot_all(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results.get("search"):
        datasets = list(dict.fromkeys(r["dataset"] for r in results["search"]))
        fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            rows = [r for r in results["search"] if r["dataset"] == ds and "qps" in r]
            for engine in dict.fromkeys((r["engine"], r["concurrency"]) for r in rows):
                rs = [r for r in rows if (r["engine"], r["concurrency"]) == engine]
                label = engine[0] + (f" c={engine[1]}" if engine[1] > 1 else "")
                ax.plot([r["recall@10"] for r in rs], [r["qps"] for r in rs], marker="o", label=label)
            ax.set_yscale("log")
            ax.set_xlabel("recall@10")
            ax.set_ylabel("queries per second")
            ax.set_title(ds, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "search.png"), dpi=110)
        plt.close(fig)
    if results.get("serving"):
        rows = [r for r in results["serving"]["rows"] if "qps" in r and "Python client" not in r["engine"]]
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for engine in dict.fromkeys(r["engine"] for r in rows):
            rs = [r for r in rows if r["engine"] == engine]
            a.plot([r["concurrency"] for r in rs], [r["qps"] for r in rs], marker="o", label=engine)
            b.plot([r["concurrency"] for r in rs], [r["p50_ms"] for r in rs], marker="o", label=engine)
        for ax, title in ((a, "queries per second (wrk)"), (b, "p50 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("connections")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        a.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "serving.png"), dpi=110)
        plt.close(fig)
    if results.get("load"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for mode in dict.fromkeys(r["mode"] for r in results["load"]):
            rs = [r for r in results["load"] if r["mode"] == mode]
            a.plot([r["concurrency"] for r in rs], [r["qps"] for r in rs], marker="o", label=mode)
            b.plot([r["concurrency"] for r in rs], [r["p99_ms"] for r in rs], marker="o", label=mode)
        for ax, title in ((a, "queries per second"), (b, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        b.set_yscale("log")
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "load.png"), dpi=110)
        plt.close(fig)
    bars = [(k, "path", "images_per_s", "images per second") for k in ("indexing", "embedding")]
    bars.append(("memory", "impl", "scanned_bytes_per_vector", "resident bytes per vector after a full scan"))
    for key, label, value, title in bars:
        rows = [r for r in results.get(key) or [] if value in r]  # memory: the slope rows
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [f"{r['factory']} {r[label]}" if key == "memory" else str(r[label]) for r in rows]
        ax.barh(names, [r[value] for r in rows])
        if key == "memory":
            for c in sorted({r["code_plus_id_bytes"] for r in rows}):
                ax.axvline(c, color="k", ls="--", lw=0.8)
                ax.axvline(c + 24, color="r", ls=":", lw=0.8)
            ax.set_xlabel("dashed: code + id bytes; dotted: + 24 (the target)", fontsize=7)
        ax.set_title(title)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{key}.png"), dpi=110)
        plt.close(fig)
