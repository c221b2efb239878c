"""Every job checks its arguments and inputs before it starts Ray: a typo costs a second, not ten."""
from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "rebalance": (["indexing", "rebalance", "--index-dir", "{tmp}/nothing", "--shards", "2"], "no index at"),
    "ann": (["evaluation", "ann", "--index-dir", "{tmp}/nothing"], "no index at"),
    "evaluate": (["evaluation", "run", "--labels", "{tmp}/labels.csv", "--leave-one-out"], "relative to --root"),
    "train": (["training", "train", "--images", "{tmp}/nothing", "--out", "{tmp}/out"], "not a folder"),
    "train-labels": (["training", "train", "--images", "{tmp}", "--labels", "{tmp}/missing.csv", "--out",
                      "{tmp}/out"], "missing.csv"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_ray_starts(tmp_path, case):
    argv, message = CASES[case]
    (tmp_path / "labels.csv").write_text("path,category\nnot/there.jpg,a\nnot/either.jpg,a\n")
    r = subprocess.run([sys.executable, "-m", *[a.format(tmp=tmp_path) for a in argv]], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "Ray" not in r.stderr  # no local Ray was started to find that out


def test_sigterm_stops_the_service_cleanly(image_index_dir):
    """What systemd and container runtimes send: Serve and the local Ray stop, one line says so,
    no traceback, and no process the service started outlives it."""
    import os
    import signal
    import time

    import psutil

    from tests.conftest import free_port, isolated_serve_env

    env = isolated_serve_env()  # runs beside the test session's service
    proc = subprocess.Popen([sys.executable, "-m", "deployments", "run", "--index-dir", str(image_index_dir),
                             "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:
            if "image search is up" in line:
                break
        else:
            pytest.fail(f"the service did not start: {proc.stderr.read()[-3000:]}")
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "the service started no Ray processes"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1].startswith("stopped: Serve shut down")
    assert "Traceback" not in err, err[-3000:]
    deadline = time.time() + 30
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started):
        time.sleep(1)
    left = [f"{p.pid} {p.name()}" for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"orphaned: {left}"
