"""Where a request's CPU goes: milliseconds of CPU per request by process and by stage.

Two passes of the same load (bench/wrk.py): the first reads every process's CPU time from the
kernel before and after (nothing else running), the second samples every Python process on the
path with py-spy and sorts each sample into a stage by the frames on its stack. A process's CPU
per request is split over stages in proportion to its samples; processes py-spy cannot read
(HAProxy, raylet, GCS: C/C++) keep one stage of their own."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from typing import Callable

import psutil

# (label, pattern on the command line), first match wins. Serve names its replica processes
# "ray::ServeReplica:<app>:<deployment>".
PROCESSES = [
    ("HAProxy", r"(^|/)haproxy\b"),
    ("Ingress replica", r"ServeReplica:[^:\s]+:Ingress\b"),
    ("shard replicas", r"ServeReplica:[^:\s]+:Shard\d+"),
    ("other Serve replicas", r"ServeReplica:"),
    ("Serve controller", r"ServeController"),
    ("Serve proxy / HAProxy manager", r"ProxyActor|HAProxy"),
    ("raylet", r"(^|/)raylet\b"),
    ("GCS", r"gcs_server"),
    ("dashboard / agents", r"dashboard|agent|log_monitor|monitor\.py"),
    ("idle Ray workers", r"ray::IDLE|default_worker\.py"),
]

# (stage, pattern on "function (file)" frames), checked from the innermost frame outwards: the
# first frame that matches names the stage of the sample.
STAGES = [
    ("FAISS search", r"faiss|\(indexing/shards\.py:"),
    ("shard bookkeeping (filters, metadata)", r"\(indexing/live\.py:"),
    ("merge", r"\(indexing/merge\.py:|spread \("),
    ("rank (policy)", r"\(indexing/policy\.py:"),
    ("metrics", r"ray/util/metrics|serve/metrics|metrics_utils|opencensus|prometheus|deployments/metrics\.py"
                r"|_record \(|observe \("),
    ("logging", r"(^|\W)logging/|serve/_private/logging_utils|_flush_logs"),
    ("JSON / body", r"orjson|\(deployments/http\.py:|\bjson/|render \("),
    ("gRPC / pickle", r"grpc|pickle|cloudpickle|serialization|_raylet\.pyx|serialize|deserialize"),
    ("Serve routing / handle", r"serve/_private/(router|request_router|replica_scheduler|handle|default_impl)"
                               r"|serve/handle\.py|DeploymentResponse"),
    ("Serve replica wrapper", r"serve/_private/(replica|replica_result|http_util|proxy|direct_ingress|utils)\.py"
                              r"|serve/batching"),
    ("HTTP parse / ASGI", r"uvicorn|h11|httptools|starlette|asgi|websockets"),
    ("search connection (wire)", r"\(deployments/wire\.py:"),
    ("Ingress / pipeline code", r"\(deployments/(pipeline|ingress|shard)\.py:"),
    ("asyncio event loop", r"asyncio|uvloop|selectors"),
    # A thread whose Python stack ends here runs native code: Ray's core worker and gRPC threads.
    ("native threads (Ray core worker, gRPC)", r"^Thread\.run \(threading\.py|Worker\.main_loop \("),
    ("threads / executor", r"threading|concurrent/futures"),
]
OTHER = "other Python"


def label(cmdline: str) -> str | None:
    """The process group a command line belongs to (None: not part of the service)."""
    for name, pattern in PROCESSES:
        if re.search(pattern, cmdline):
            return name
    return None


def service_processes(extra: dict[str, list[int]] | None = None) -> dict[int, str]:
    """pid -> group of every process of the service on this machine (plus `extra` groups)."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
        if "py-spy" in cmd or cmd.startswith("wrk "):
            continue
        group = label(cmd)
        if group is not None:
            found[p.info["pid"]] = group
    for group, pids in (extra or {}).items():
        for pid in pids:
            found[pid] = group
    return found


def cpu_seconds(pids) -> dict[int, float]:
    """User + system CPU seconds so far of each pid that still exists."""
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_per_request(groups: dict[int, str], load: Callable[[], dict]) -> tuple[dict, dict]:
    """Run `load()` (returns a wrk row) and measure CPU ms per request of each group over it."""
    before = cpu_seconds(groups)
    t0 = time.perf_counter()
    row = load()
    wall = time.perf_counter() - t0
    after = cpu_seconds(groups)
    per_group: dict[str, float] = defaultdict(float)
    for pid, s in after.items():
        if pid in before:
            per_group[groups[pid]] += s - before[pid]
    n = max(1, row["requests"])
    ms = {g: 1000.0 * s / n for g, s in sorted(per_group.items(), key=lambda kv: -kv[1])}
    row = {**row, "cpu_cores_busy": round(sum(per_group.values()) / wall, 2)}
    return ms, row


def classify(stack: str) -> str:
    """The stage of one py-spy sample ("frame;frame;..." root first)."""
    for frame in reversed(stack.split(";")):
        for stage, pattern in STAGES:
            if re.search(pattern, frame):
                return stage
    return OTHER


def sample(pids: dict[int, str], seconds: float, rate: int, workdir: str) -> dict[str, Counter]:
    """py-spy on each pid for `seconds` at `rate` Hz (non-blocking: the process is not paused);
    returns group -> Counter(stage -> samples)."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    procs = []
    for pid in pids:
        out = os.path.join(workdir, f"{pid}.txt")
        procs.append((pid, out, subprocess.Popen(
            [spy, "record", "--nonblocking", "-r", str(rate), "-d", str(int(seconds)), "-f", "raw", "-o", out,
             "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    stages: dict[str, Counter] = defaultdict(Counter)
    for pid, out, p in procs:
        p.wait(seconds + 60)
        if not os.path.exists(out):
            continue
        for line in open(out):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stages[pids[pid]][classify(stack)] += int(count)
    return stages


def profile(load: Callable[[float], dict], seconds: float, rate: int = 100,
            extra: dict[str, list[int]] | None = None) -> dict:
    """CPU ms per request by process group and stage under `load(seconds)` (a wrk run).

    Returns {"row": the clean pass's wrk row, "processes": {group: ms}, "stages": {group: {stage: ms}}}."""
    groups = service_processes(extra)
    ms, row = cpu_per_request(groups, lambda: load(seconds))
    python = {pid: g for pid, g in groups.items() if _is_python(pid)}
    workdir = tempfile.mkdtemp(prefix="bench-profile-")
    try:
        samples: dict = {}
        t = threading.Thread(target=lambda: samples.update(sample(python, seconds - 2, rate, workdir)))
        t.start()
        load(seconds)
        t.join()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stages = {}
    for group, total_ms in ms.items():
        counts = samples.get(group)
        if not counts:
            stages[group] = {"(native: not sampled)": total_ms}
            continue
        n = sum(counts.values())
        stages[group] = {s: total_ms * c / n for s, c in counts.most_common()}
    return {"row": row, "processes": ms, "stages": stages}


def _is_python(pid: int) -> bool:
    try:
        exe = os.path.basename(psutil.Process(pid).exe())
    except psutil.Error:
        return False
    return exe.startswith("python")


def by_stage(result: dict) -> dict[str, float]:
    """CPU ms per request by stage over every process."""
    total: dict[str, float] = defaultdict(float)
    for group, stages in result["stages"].items():
        for stage, ms in stages.items():
            total[stage if not stage.startswith("(native") else f"{group} (native)"] += ms
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))
