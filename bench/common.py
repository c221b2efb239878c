"""Shared benchmark plumbing: closed-loop load generation, percentiles, JSON + markdown + PNG output."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence


def machine() -> dict:
    """What the numbers were measured on."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_load(call: Callable[[int], bool], concurrency: int, requests: int) -> dict:
    """Closed loop: `concurrency` workers issue `requests` calls in total; call(i) returns success.

    Returns p50/p99 latency in ms, queries per second and the error count.
    """
    lat: list[float] = []
    errors = 0

    def one(i: int) -> None:
        nonlocal errors
        t = time.perf_counter()
        ok = call(i)
        lat.append((time.perf_counter() - t) * 1000.0)
        errors += 0 if ok else 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "errors": errors,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "qps": requests / wall}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of rows with the given columns; floats get 2-3 significant decimals."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str, name: str, payload: dict, table: str) -> None:
    """out_dir/name.json and out_dir/name.md."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table + "\n")


def free_port() -> int:
    """A TCP port nothing on this machine listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait until `proc` listens on `port` (RuntimeError when it exits or the time runs out)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")
