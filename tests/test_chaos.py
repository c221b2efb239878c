"""Many nodes and faults: `python -m bench chaos` runs the service on a Ray cluster of three nodes
on this machine (ray.cluster_utils.Cluster) under mixed load, through the loss of a shard node, a
rolling redeploy and a SIGKILL of every component, and checks every request's outcome. Each run
is its own process with its own cluster, beside the test session's Ray. Each costs minutes of a
second cluster, so all of them are `slow`: `make test-all` (what CI runs) has them, `make test`
does not."""
import json
import subprocess
import sys

import pytest

from tests.conftest import free_port, isolated_serve_env


def chaos(tmp_path, minutes: float, replicas: int, seed: int = 0) -> dict:
    env = isolated_serve_env()
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the session's
    out = tmp_path / f"chaos-{replicas}"
    proc = subprocess.run([sys.executable, "-m", "bench", "chaos", "--minutes", str(minutes), "--replicas",
                           str(replicas), "--seed", str(seed), "--port", str(free_port()), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "chaos.json").read_text())


def searches(report: dict, phase: str) -> dict:
    """Outcomes of the image and vector searches of one phase, summed."""
    out: dict = {}
    for kind in ("image_search", "vector_search"):
        for outcome, n in report["outcomes"].get(phase, {}).get(kind, {}).items():
            out[outcome] = out.get(outcome, 0) + n
    return out


def nothing_lost(report: dict) -> None:
    assert report["acknowledged_upserts_checked"] > 0 and report["acknowledged_deletes_checked"] > 0
    assert report["private_checked"] > 0
    assert report["lost_upserts"] == [] and report["deletes_still_present"] == []
    assert report["private_returned_during_run"] == [] and report["private_returned_at_end"] == []
    assert report["total_matches"], (report["total"], report["total_expected_range"])


@pytest.mark.slow
def test_two_replicas_on_distinct_nodes_survive_node_loss_redeploy_and_kills(tmp_path):
    r = chaos(tmp_path, minutes=0.5, replicas=2)
    assert r["replicas_on_distinct_nodes"], r["placement"]
    # Losing a node that holds one replica of every shard, and a rolling redeploy: no search
    # fails, none comes back partial.
    for phase in ("node_loss", "redeploy"):
        s = searches(r, phase)
        assert s.get("acknowledged", 0) > 0 and set(s) == {"acknowledged"}, (phase, s)
        assert r["partial_answers"].get(phase, 0) == 0
    faults = [e["fault"] for e in r["events"]]
    assert faults[:2] == ["node loss", "rolling redeploy"] and len(faults) == 7
    assert r["all_recovered"], r["events"]
    nothing_lost(r)


@pytest.mark.slow
def test_one_replica_node_loss_answers_partial_never_an_error(tmp_path):
    """One replica per shard: a lost node takes shards with it, and searches answer partial."""
    r = chaos(tmp_path, minutes=0.5, replicas=1)
    s = searches(r, "node_loss")
    assert r["partial_answers"].get("node_loss", 0) > 0, r["partial_answers"]
    assert s.get("failed", 0) == 0 and s.get("no_answer", 0) == 0, s
    assert r["shards_down_reported"], "/healthz never named the lost shard"
    assert r["all_recovered"], r["events"]
    nothing_lost(r)


@pytest.mark.slow
def test_chaos_soak(tmp_path):
    """The long soak: ten minutes of faults."""
    r = chaos(tmp_path, minutes=10, replicas=2, seed=1)
    assert r["replicas_on_distinct_nodes"] and r["all_recovered"]
    nothing_lost(r)
