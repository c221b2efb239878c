"""Service jobs.

`python -m deployments run --index-dir DIR`: deploy serve_config.yaml on a local (or given) Ray and
block, printing the URL and a ready curl once every shard is loaded.
`python -m deployments run --images FOLDER`: the same for the index of a folder of photos, built
first when it is missing or the folder changed (indexing/folders.py).
`python -m deployments allow FOLDER`: let the running service read one more folder (what an
ingest of that folder needs for thumbnails and verification; deployments/allow.py).
`python -m deployments env`: the shell lines that set Serve's fast paths (deployments/environment.py),
for `eval` before `serve run` or `ray start`.
`python -m deployments switch [--version N]`: move the running service to another manifest version
without downtime (see deployments/switch.py)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import yaml

from configs import logs

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def load_serve_config(path: str, index_dir: str | None, config: str | None, port: int | None) -> dict:
    """serve_config.yaml with the index directory, app config and port filled in."""
    cfg = yaml.safe_load(Path(path).read_text())
    for app in cfg["applications"]:  # the front and the index application read the same directory
        if index_dir:
            app["args"]["index_dir"] = index_dir if "://" in index_dir else os.path.abspath(index_dir)
        if config:
            app["args"]["config"] = os.path.abspath(config)
    if port:
        cfg.setdefault("http_options", {})["port"] = port
    return cfg


def deploy(cfg: dict, address: str | None = None, metrics_port: int | None = None) -> str:
    """Start Serve and deploy the config the way `serve run CONFIG` does; returns the base URL."""
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from deployments import environment

    schema = ServeDeploySchema.model_validate(cfg)
    logs.quiet_ray()
    if not ray.is_initialized():
        environment.apply(local=not address)
        # Replica and controller output stays in Ray's log files (Serve writes its logs there
        # anyway) instead of interleaving start-up banners and retry notices with this terminal.
        quiet = dict(namespace="serve", logging_level="WARNING", log_to_driver=False)
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _metrics_export_port=metrics_port, **quiet)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    host = schema.http_options.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{schema.http_options.port}"


def wait_healthy(url: str, timeout_s: float) -> bool:
    """Poll /healthz until it answers 200."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="serve an index over HTTP")
    r.add_argument("--index-dir", help="index directory (default: the one in serve_config.yaml; with --images, "
                   "data/indexes/<folder>-<hash>)")
    r.add_argument("--images", help="a folder of photos: serve its index, built first when missing or when the "
                   "folder changed since")
    r.add_argument("--serve-config", default=str(DEFAULT_SERVE_CONFIG))
    r.add_argument("--config", help="app config YAML (default: configs/default.yaml)")
    r.add_argument("--port", type=int)
    r.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--metrics-port", type=int,
                   help="Prometheus port of the local Ray (default: one Ray picks; printed at start)")
    r.add_argument("--timeout-s", type=float, default=300, help="how long to wait for the service to be healthy")
    w = sub.add_parser("switch", help="serve another manifest version without downtime")
    w.add_argument("--app", default="imsearch", help="the front application (default: imsearch)")
    w.add_argument("--version", type=int, help="manifest version (default: the current manifest.json)")
    w.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    w.add_argument("--timeout-s", type=float, default=600, help="how long each step may take")
    w.add_argument("--drain-s", type=float, default=5, help="time given to searches inside the old version")
    w.add_argument("--no-replay", action="store_true",
                   help="switch even when writes the old version took cannot be carried over")
    e = sub.add_parser("env", help="print the shell lines that turn Serve's fast paths on (before `serve run`)")
    e.add_argument("--local", action="store_true", help="also the settings for a Ray on this one machine")
    a = sub.add_parser("allow", help="let the running service read the images under more folders")
    a.add_argument("folders", nargs="+", help="folders (or object-store prefixes) whose images writers may add by uri")
    a.add_argument("--app", default="imsearch", help="the front application (default: imsearch)")
    a.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    args = p.parse_args(argv)
    logs.setup(logging.WARNING)
    if args.verb == "switch":
        return _switch(args)
    if args.verb == "allow":
        return _allow(args)
    if args.verb == "env":
        from deployments import environment

        print(environment.exports(args.local))
        return 0
    index_dir = args.index_dir
    if args.images:
        index_dir = _folder_index(args.images, index_dir, args.config)
        if index_dir is None:
            return 2
    if index_dir and "://" not in index_dir and not Path(index_dir, "manifest.json").exists():
        print(f"error: no index at {index_dir} (manifest.json missing); build one with `python -m indexing build`",
              file=sys.stderr)
        return 2
    # systemd and container runtimes stop a service with SIGTERM: treat it like Ctrl-C, so Serve and
    # the local Ray it started shut down instead of dying mid-request and leaving workers behind.
    # Set again once Ray is up: ray.init installs its own crash handler for SIGTERM.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = deploy(load_serve_config(args.serve_config, index_dir, args.config, args.port), args.address,
                     args.metrics_port)
        signal.signal(signal.SIGTERM, _interrupt)
        if not wait_healthy(url, args.timeout_s):
            print(f"error: the service at {url} did not become healthy in {args.timeout_s:.0f} s", file=sys.stderr)
            _shutdown()
            return 1
        print(f"\nimage search is up at {url}\n\n  web page:  {url}/\n  API:       {url}/openapi.json\n"
              f"  metrics:   {_metrics_url()} (Prometheus)\n")
        sample = _sample(url)
        if sample:
            print(f"  curl -s -X POST '{url}/search?k=5' -H 'Content-Type: image/jpeg' --data-binary @{shlex.quote(sample)}")
        print(f"  curl -s {url}/stats\n\nlogs (a line per request, and any problem): {_log_dir()}\n"
              "Ctrl-C (or SIGTERM) stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _shutdown()
        print("stopped: Serve shut down" + ("" if args.address else " and the local Ray exited"), flush=True)
    return 0


def _folder_index(images: str, index_dir: str | None, config: str | None) -> str | None:
    """The index directory of a folder of photos, built (by `python -m indexing build`, so its Ray
    comes and goes before the service's) when missing or stale; None after printing why not."""
    import subprocess

    from configs.schema import load_config
    from indexing import folders

    images = os.path.expanduser(images)
    if not os.path.isdir(images):
        print(f"error: --images {images} is not a folder", file=sys.stderr)
        return None
    extensions = load_config(config).build.extensions
    index_dir = index_dir or folders.default_index_dir(images)
    state = folders.state(images, index_dir, extensions)
    if state == "stale-with-writes":
        print(f"note: {images} changed since {index_dir} was built, and the index holds writes made since; it is "
              f"served as it is (add new photos with `python -m indexing ingest`, or remove {index_dir} to rebuild)")
    if state in ("missing", "stale"):
        print(f"indexing {images} into {index_dir}" + (" (the folder changed since the last build)"
                                                       if state == "stale" else ""), flush=True)
        work = f"{index_dir}.building"
        shutil.rmtree(work, ignore_errors=True)
        build = [sys.executable, "-m", "indexing", "build", "--images", images, "--index-dir", work]
        if subprocess.run(build + (["--config", config] if config else [])).returncode != 0:
            return None
        folders.record(images, work, extensions)
        shutil.rmtree(index_dir, ignore_errors=True)
        os.replace(work, index_dir)
    return index_dir


def _sample(url: str) -> str | None:
    """A real image of the served index for the printed curl."""
    from configs.schema import load_config
    from indexing import folders

    try:
        sources = httpx.get(f"{url}/stats", timeout=10).json().get("sources", [])
    except (httpx.HTTPError, ValueError):
        return None
    return folders.sample_image(sources, load_config().build.extensions)


def _allow(args) -> int:
    import ray

    from deployments.allow import allow
    from deployments.switch import SwitchError

    ray.init(address=args.address, namespace="serve", logging_level="WARNING", log_to_driver=False)
    logs.quiet_ray()
    try:
        roots = allow(args.app, args.folders)
    except SwitchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"allowed: the service may now read images under {', '.join(roots)}")
    return 0


def _log_dir() -> str:
    """Where this node's Ray session keeps Serve's logs (each node of a cluster has its own)."""
    from ray._private.worker import global_worker  # no public API names the session folder

    return os.path.join(global_worker.node.get_session_dir_path(), "logs", "serve")


def _metrics_url() -> str:
    """This node's Prometheus endpoint, where Ray exports Serve's metrics and the service's own."""
    import ray
    from ray._private.worker import global_worker

    node = global_worker.node
    port = next((n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node.node_id), None)
    return f"http://{node.node_ip_address}:{port}/metrics"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _shutdown() -> None:
    """Serve down, then Ray; a second signal meanwhile does not cut the shutdown short. What Ray
    prints meanwhile (the raylet's notice that the controller's last task died with it, by
    design) goes to shutdown.log in Ray's log folder, not to the user's terminal."""
    import contextlib
    import io

    import ray
    from ray import serve

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not ray.is_initialized():
        return
    log, said = _log_dir(), io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        serve.shutdown()
        ray.shutdown()
    if said.getvalue():
        with open(os.path.join(log, "shutdown.log"), "a") as f:
            f.write(said.getvalue())


def _switch(args) -> int:
    import json

    import ray

    from deployments.switch import SwitchError, switch

    ray.init(address=args.address, namespace="serve", logging_level="WARNING")
    try:
        out = switch(args.app, args.version, args.timeout_s, args.drain_s, replay=not args.no_replay)
    except (SwitchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
