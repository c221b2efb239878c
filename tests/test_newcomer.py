"""A new user's first ten minutes, scripted: the README's one command on a folder of 30 photos,
the page in a browser, the README's ingest recipe for a second folder (whose file names repeat the
first's), and a stop with SIGTERM (what Ctrl-C, systemd and container runtimes send). Every step's
output is read the way a user reads it: no line says "failed", "error" or "Traceback"."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port, isolated_serve_env, result_grid
from tests.images import distinct_images, jpeg

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret"
ALARMING = re.compile(r"failed|error|traceback", re.IGNORECASE)


def alarming(output: str) -> list[str]:
    return [line for line in output.splitlines() if ALARMING.search(line)]


def gcs_address(pid: int) -> str:
    """The address of the Ray a process started (what `--address` takes), from its raylet's flags."""
    for child in psutil.Process(pid).children(recursive=True):
        for arg in child.cmdline():
            if arg.startswith("--gcs-address="):
                return arg.split("=", 1)[1]
    raise AssertionError("no Ray started")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """30 photos in one folder, 6 others in a second one under the same file names."""
    photos = distinct_images()
    first, second = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("more-photos")
    more = [photos[name] for name in ("motorcycle_left/q0", "motorcycle_left/q1", "rocket/full", "rocket/q2",
                                      "retina/q0", "page/q1")]
    for folder, chosen in ((first, list(photos.values())[:30]), (second, more)):
        for i, img in enumerate(chosen):
            (folder / f"IMG_{i:04d}.jpg").write_bytes(jpeg(img.convert("RGB")))
    return first, second


def test_own_photos_from_the_readme(folders, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    photos, more = folders
    env = {**isolated_serve_env(), "IMSEARCH_WRITE_TOKENS": TOKEN}
    port = free_port()
    proc = subprocess.Popen(["make", "-s", "run", f"IMAGES={photos}", f"INDEX_DIR={tmp_path / 'index'}",
                             f"PORT={port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    shown = []
    try:
        for line in proc.stdout:
            shown.append(line)
            if "stops it" in line:
                break
        else:
            pytest.fail("the service did not start:\n" + "".join(shown[-60:]))
        line = next(x for x in shown if x.startswith("  curl -s -X POST"))
        url = f"http://127.0.0.1:{port}"
        assert url in "".join(shown)
        started = psutil.Process(proc.pid).children(recursive=True)

        # The printed curl, run as printed, searches with a real photo of the folder: it comes back first.
        sample = shlex.split(line)[-1].lstrip("@")
        assert Path(sample).parent == photos and Path(sample).is_file()
        answer = json.loads(subprocess.run(line, shell=True, capture_output=True, text=True, timeout=60).stdout)
        assert answer["results"][0]["uri"] == sample and answer["results"][0]["same_photo"], answer

        # The page: every result's thumbnail loads, results are labelled by file name.
        browser.get(url + "/")
        browser.find_element("id", "file").send_keys(str(photos / "IMG_0007.jpg"))
        WebDriverWait(browser, 60).until(lambda d: result_grid(d)[0] and result_grid(d)[1])
        names = browser.execute_script("return [...document.querySelectorAll('#results .file')].map(e => e.textContent)")
        assert names[0] == "IMG_0007.jpg" and all(n.endswith(".jpg") for n in names)
        with httpx.Client(base_url=url, timeout=60) as c:
            for id_ in result_grid(browser)[0]:
                r = c.get(f"/images/{id_}/thumbnail")
                assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"

        # The README's ingest recipe: the operator allows the folder, then ingest sends it.
        python = sys.executable  # the repository's .venv/bin/python, as in the README
        # The suite's own Ray runs beside this one: name the service's (and, as Ray asks of a
        # driver given an address, say that the cluster uses its token).
        allow = subprocess.run([python, "-m", "deployments", "allow", str(more), "--address", gcs_address(proc.pid)],
                               cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                               timeout=120)
        assert allow.returncode == 0, allow.stderr[-3000:]
        ingest = subprocess.run([python, "-m", "indexing", "ingest", "--images", str(more), "--url", url], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert ingest.returncode == 0, ingest.stdout + ingest.stderr
        assert "added 6 images" in ingest.stdout and not alarming(ingest.stdout + ingest.stderr)
        assert "HTTP Request" not in ingest.stderr
        img = distinct_images()["rocket/full"].convert("RGB")  # IMG_0002.jpg of the second folder
        w, h = img.size
        query = jpeg(img.crop((w // 16, h // 16, w - w // 16, h - h // 16)))
        with httpx.Client(base_url=url, timeout=60) as c:
            top = c.post("/search?k=5", content=query, headers={"content-type": "image/jpeg"}).json()["results"][0]
            assert top["uri"] == str(more / "IMG_0002.jpg") and top["same_photo"] and top["inliers"] >= 8, top
            assert c.get(f"/images/{top['id']}/thumbnail").status_code == 200

        # SIGTERM to the service itself (make waits for it and exits with it), as systemd sends it.
        service = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "deployments" in p.cmdline() and "run" in p.cmdline())
        service.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed check: stop the service the way it stops cleanly first
            for p in psutil.Process(proc.pid).children(recursive=True):
                if "deployments" in p.cmdline():
                    p.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(shown) + rest
    assert proc.returncode == 0, output[-3000:]
    assert not alarming(output), alarming(output)
    assert rest.strip().splitlines() == ["stopped: Serve shut down and the local Ray exited"], rest
    # Nothing the service started outlives it.
    deadline = time.time() + 30
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started):
        time.sleep(0.5)
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
