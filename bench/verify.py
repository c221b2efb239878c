"""What verification costs an image query over HTTP at concurrency 1: a running service (built
from the same photos) is sent each photo and a heavily edited copy of it, verified and not, after
a first verified pass that fills the Verifier's feature cache (reported as the cold case)."""
from __future__ import annotations

import os
import statistics
import time

from bench.common import markdown_table, write_results

COLUMNS = ["query", "verify", "p50_ms", "p90_ms", "mean_ms", "x_unverified_p50"]


def _stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"p50_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
            "mean_ms": round(statistics.mean(ms), 1)}


def run_verify(url: str, images: str, queries: int = 100) -> dict:
    """Latency rows per query kind (photo, heavy edit) and mode (cold, verified, unverified)."""
    import httpx

    from evaluation.edits import HEAVY_EDITS, edited_copy

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(images) for f in fs if f.lower().endswith((".jpg", ".png")))
    files = files[:: max(1, len(files) // queries)][:queries]
    photos = [open(f, "rb").read() for f in files]
    kinds = {"photo": photos, "heavy edit": [edited_copy(d, **HEAVY_EDITS) for d in photos]}
    rows = []
    with httpx.Client(base_url=url, timeout=60) as client:
        def timed(blobs: list[bytes], params: str) -> list[float]:
            out = []
            for data in blobs:
                t = time.perf_counter()
                r = client.post(f"/search?k=10{params}", content=data, headers={"content-type": "image/jpeg"})
                out.append(1000 * (time.perf_counter() - t))
                r.raise_for_status()
            return out

        for kind, blobs in kinds.items():
            cold = _stats(timed(blobs, "&verify=true"))
            off, on = _stats(timed(blobs, "&verify=false")), _stats(timed(blobs, "&verify=true"))
            for verify, s in (("yes, features not cached", cold), ("no", off), ("yes", on)):
                rows.append({"query": kind, "verify": verify, **s, "x_unverified_p50": round(s["p50_ms"] / off["p50_ms"], 2)})
    return {"url": url, "queries": len(photos), "rows": rows}


def markdown(report: dict) -> str:
    return (f"Image-query latency at concurrency 1, {report['queries']} queries per row:\n\n"
            + markdown_table(report["rows"], COLUMNS))


def plot(report: dict, out: str) -> None:
    """verify.png: p50 and p90 per query kind and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['query']}\n{r['verify']}" for r in rows]
    ax.bar(range(len(rows)), [r["p90_ms"] for r in rows], color="#ccc", label="p90")
    ax.bar(range(len(rows)), [r["p50_ms"] for r in rows], color="#4a7", label="p50")
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set(ylabel="ms per image query", title="Verification cost over HTTP, concurrency 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "verify.png"), dpi=120)


def write_report(report: dict, out: str) -> None:
    """verify.json, verify.md and verify.png under out."""
    write_results(out, "verify", report, markdown(report))
    plot(report, out)
