"""The service's Prometheus metrics, through Ray Serve's metrics API.

Each replica creates its own set when it starts (Serve adds its deployment, replica and
application tags at creation); Ray exports them on every node's metrics port next to Serve's
built-in `ray_serve_*` series, prefixed `ray_`. Serve's own request metrics name every route `/`
(the Ingress is one `__call__`), so requests are counted here again by route template.
cluster/grafana-dashboard.json charts them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ray.serve import metrics

# Seconds: 1 ms .. 30 s, about three buckets a decade (the request timeout is 30 s).
LATENCY_BUCKETS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
# Ray forgets a gauge not set again within two export intervals (20 s by default): gauges are
# set again this often, whether or not anything changed.
GAUGE_REFRESH_S = 1.0
# Stages of a search, for imsearch_stage_seconds{stage=...}.
DECODE_EMBED, FANOUT, SHARD_SEARCH, MERGE_RANK, VERIFY = "decode_embed", "fanout", "shard_search", "merge_rank", "verify"


def _stage_histogram() -> metrics.Histogram:
    # Created with the same name and tags by the Ingress (its stages) and by every shard (its own
    # search): one series family, told apart by `stage` and `deployment`.
    return metrics.Histogram("imsearch_stage_seconds", description="Time spent in one stage of a search",
                             boundaries=LATENCY_BUCKETS_S, tag_keys=("stage",))


class IngressMetrics:
    """Requests, their latency by stage, partial answers and overload refusals."""

    def __init__(self):
        self.requests = metrics.Counter("imsearch_requests_total", description="HTTP requests by route template, "
                                        "method and status", tag_keys=("route", "method", "status"))
        self.latency = metrics.Histogram("imsearch_request_seconds", description="HTTP request latency by route",
                                         boundaries=LATENCY_BUCKETS_S, tag_keys=("route",))
        self.stages = _stage_histogram()
        self.partial = metrics.Counter("imsearch_partial_answers_total",
                                       description="Searches answered without some shard (it missed the deadline)")
        self.overloads = metrics.Counter("imsearch_overload_refusals_total",
                                         description="Requests refused with 503 overloaded", tag_keys=("route",))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def stage(self, name: str, seconds: float) -> None:
        self.stages.observe(seconds, tags={"stage": name})


class ShardMetrics:
    """One shard replica: its search time, writes, log, compactions and size."""

    def __init__(self, shard_no: int):
        self.stages = _stage_histogram()
        self.writes = metrics.Counter("imsearch_writes_total", description="Writes applied by operation",
                                      tag_keys=("shard", "op"))
        self.compactions = metrics.Counter("imsearch_compactions_total",
                                           description="Write logs folded into a new shard generation", tag_keys=("shard",))
        self.log_bytes = metrics.Gauge("imsearch_shard_log_bytes", description="Bytes of write log not yet compacted",
                                       tag_keys=("shard",))
        self.vectors = metrics.Gauge("imsearch_shard_vectors", description="Vectors a shard replica holds",
                                     tag_keys=("shard",))
        for metric in (self.writes, self.compactions, self.log_bytes, self.vectors):
            metric.set_default_tags({"shard": str(shard_no)})  # a new dict each: Serve adds its tags to it

    def size(self, vectors: int, log_bytes: int) -> None:
        """Set the size gauges."""
        self.vectors.set(vectors)
        self.log_bytes.set(log_bytes)


def refresh_every(seconds: float, report: Callable[[], None]) -> threading.Thread:
    """Call `report` every `seconds` in a daemon thread, for the life of the replica (gauges)."""
    def loop():
        while True:
            time.sleep(seconds)
            try:
                report()
            except Exception:  # a failed report must not end the reporting
                pass

    thread = threading.Thread(target=loop, name="metrics-refresh", daemon=True)
    thread.start()
    return thread


class EmbedderMetrics:
    """Batch sizes of the embedder's forward passes (are requests being batched at all?)."""

    def __init__(self):
        self.batch = metrics.Histogram("imsearch_embedder_batch_size", description="Images per forward pass",
                                       boundaries=BATCH_BUCKETS)
