"""Shared fixtures: one local Ray per test session, one embedder, small generated image sets."""
from __future__ import annotations

import os
import shutil
from typing import Optional

import numpy as np
import pytest

from tests import images as test_images


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, shared by every test that needs Ray."""
    import ray

    from deployments import environment

    environment.apply(local=True)
    # Metrics reach the node's Prometheus endpoint every 10 s by default; tests scrape sooner.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    # Ray Train's controller takes each epoch's report on its 2 s poll; the tests' epochs last 0.1 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedder():
    from embedding.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder of distinct photos (bundled samples and their quadrants) plus two corrupt files."""
    root = tmp_path_factory.mktemp("corpus")
    n = test_images.write_corpus(str(root))
    (root / "broken" ).mkdir()
    (root / "broken" / "not-an-image.jpg").write_bytes(b"this is not a jpeg")
    good = next(p for p in sorted(root.rglob("*.jpg")) if p.parent.name != "broken")
    (root / "broken" / "truncated.jpg").write_bytes(good.read_bytes()[:1500])
    (root / "labels.csv").write_text("not,an,image\n")
    return root, n


@pytest.fixture
def rng():
    return np.random.default_rng(int(os.environ.get("TEST_SEED", "0")))


WRITE_TOKEN = "test-writer-token"
COMPACT_AFTER_BYTES = 128 * 1024


def isolated_serve_env() -> dict:
    """os.environ plus HAProxy ports and files of its own, so a second Serve (a subprocess) runs
    beside the test session's service. A short folder: HAProxy refuses socket paths over 97
    characters. Its replicas' direct-ingress ports come from another range: Serve binds them with
    SO_REUSEPORT, so two Serve instances on one host with the same range share ports, and the
    kernel spreads one's requests over both (seen: a chaos run's /stats answered by the session's
    service). The same holds for the fallback proxy's fixed ports."""
    import tempfile

    haproxy = tempfile.mkdtemp(prefix="hap-")
    return {**os.environ,
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "32000", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "33000",
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "42000", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "43000",
            # The proxy HAProxy falls back to (before replicas register) has fixed ports too.
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()), "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{haproxy}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{haproxy}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{haproxy}/server-state"}


_HANDLE_LOOP = None


def shard_info(deployment: str, app: str = "imsearch-index", timeout_s: float = 10) -> dict:
    """A Shard deployment's info() through a handle (shard_call)."""
    return shard_call(deployment, "info", app=app, timeout_s=timeout_s)


def shard_call(deployment: str, method: str, *args, app: str = "imsearch-index", timeout_s: float = 10):
    """A Shard deployment's `method(*args)` through a handle. Serve's throughput mode wants handle
    calls made from an event loop, the same one each time (its router stays bound to it): one loop
    runs in a thread for the whole test session."""
    import asyncio
    import threading

    from ray import serve

    global _HANDLE_LOOP
    if _HANDLE_LOOP is None:
        _HANDLE_LOOP = asyncio.new_event_loop()
        threading.Thread(target=_HANDLE_LOOP.run_forever, name="handles", daemon=True).start()

    async def ask():
        handle = serve.get_deployment_handle(deployment, app_name=app)
        return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)

    return asyncio.run_coroutine_threadsafe(ask(), _HANDLE_LOOP).result(timeout_s + 5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def image_index_dir(ray_session, corpus_dir, tmp_path_factory):
    """The test corpus indexed into 3 shards (exact Flat: it is small)."""
    from indexing.__main__ import main as indexing_main

    root, _ = corpus_dir
    out = tmp_path_factory.mktemp("served") / "index"
    assert indexing_main(["build", "--images", str(root), "--index-dir", str(out), "--shards", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def client(service):
    """An HTTP client of the session's service."""
    import httpx

    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def service(ray_session, image_index_dir, tmp_path_factory):
    """serve_config.yaml deployed on the session's Ray, serving image_index_dir; yields the base URL.

    No serve.shutdown() at the end: ray_session's ray.shutdown() stops the whole local cluster."""
    from deployments.__main__ import DEFAULT_SERVE_CONFIG, deploy, load_serve_config, wait_healthy

    cfg = load_serve_config(str(DEFAULT_SERVE_CONFIG), str(image_index_dir), None, free_port())
    # Tests ingest from their own temporary folders: PUT uris may name files under any of them.
    cfg["applications"][0]["args"]["overrides"] = {
        "serve": {"write_tokens": [WRITE_TOKEN], "uri_roots": [str(tmp_path_factory.getbasetemp())]}}
    # Shards compact after a few dozen writes (not 64 MiB), so tests meet compaction under load.
    cfg["applications"][1]["args"]["overrides"] = {"serve": {"compact_after_bytes": COMPACT_AFTER_BYTES}}
    url = deploy(cfg)
    assert wait_healthy(url, 180), "service did not become healthy"
    yield url


@pytest.fixture(scope="module")
def tight_front(service):
    """A second front `ov` (route /ov) on the session's index, admitting 2 requests at a time: two
    held requests fill it, where filling the session's front would take 128 held sockets."""
    from deployments.__main__ import DEFAULT_SERVE_CONFIG, load_serve_config, wait_healthy
    from deployments.switch import deploy_config, deployed_config, wait_gone, wait_running

    front = load_serve_config(str(DEFAULT_SERVE_CONFIG), None, None, None)["applications"][0]
    session = {a["name"]: a for a in deployed_config()["applications"]}["imsearch"]
    front.update(name="ov", route_prefix="/ov", args=dict(session["args"]))
    front["args"]["overrides"] = {"serve": {"max_in_flight": 2}}
    for d in front["deployments"]:
        d.setdefault("ray_actor_options", {})["num_cpus"] = 0.05
        if d["name"] == "Embedder":
            d["autoscaling_config"]["max_replicas"] = 1
    cfg = deployed_config()
    cfg["applications"].append(front)
    deploy_config(cfg)
    wait_running("ov", 180)
    assert wait_healthy(service + "/ov", 60)
    yield service + "/ov"
    cfg = deployed_config()
    cfg["applications"] = [a for a in cfg["applications"] if a["name"] != "ov"]
    deploy_config(cfg)
    wait_gone("ov", 60)


def slow_upload(base_url: str, body: bytes):
    """A POST /search/vector whose body is only partly sent: it holds an Ingress admission slot
    until the caller sends the rest (`body[10:]`); returns the socket."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    s = socket.create_connection((url.hostname, url.port))
    s.sendall(f"POST {url.path.rstrip('/')}/search/vector HTTP/1.1\r\nHost: {url.hostname}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    return s


def side_apps(service: str, name: str, index_dir: str, ingress_replicas: int = 1, config: Optional[str] = None,
              front_overrides: Optional[dict] = None, timeout_s: float = 180):
    """Deploy front `name` (route /name) and index application `name-index` serving index_dir
    with `config` (default configs/default.yaml) on the session's Serve, sized to fit beside the
    session's service; the front's serve overrides default to write tokens on and duplicates not
    collapsed. A generator that yields the front's base URL and removes every application named
    `name...` after (a switch's later index versions too). Used as the body of a module fixture."""
    from deployments.__main__ import DEFAULT_SERVE_CONFIG, load_serve_config, wait_healthy
    from deployments.switch import deploy_config, deployed_config, wait_gone, wait_running

    front, index = load_serve_config(str(DEFAULT_SERVE_CONFIG), index_dir, config, None)["applications"]
    front.update(name=name, route_prefix=f"/{name}")
    front["args"]["overrides"] = {"serve": front_overrides if front_overrides is not None else
                                  {"write_tokens": [WRITE_TOKEN], "near_duplicate_bits": None}}
    index.update(name=f"{name}-index")
    index["args"]["overrides"] = {"serve": {"shard_num_cpus": 0.05}}
    for d in front["deployments"] + index["deployments"]:
        d.setdefault("ray_actor_options", {})["num_cpus"] = 0.05
        if d["name"] == "Embedder":
            d["autoscaling_config"]["max_replicas"] = 1
        if d["name"] == "Ingress":
            d["user_config"]["index_app"] = f"{name}-index"
            d["num_replicas"] = ingress_replicas
    cfg = deployed_config()
    cfg["applications"] += [front, index]
    deploy_config(cfg)
    wait_running(name, timeout_s)
    url = f"{service}/{name}"
    assert wait_healthy(url, timeout_s / 2)
    yield url
    cfg = deployed_config()
    cfg["applications"] = [a for a in cfg["applications"] if not a["name"].startswith(name)]
    deploy_config(cfg)
    wait_gone(name, 60)


# ---------------------------------------------------------------------- a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; .ci/run installs them")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def result_grid(driver):
    """(ids, all thumbnails loaded?) of the result grid."""
    return driver.execute_script("""
        const buttons = [...document.querySelectorAll('#results button')];
        const imgs = [...document.querySelectorAll('#results img')];
        return [buttons.map(b => b.dataset.id), imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)];
    """)
