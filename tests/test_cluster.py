"""Cluster configs parse and validate; the capacity plan agrees with hand arithmetic."""
import math
from pathlib import Path

import pytest
import yaml

from cluster.__main__ import main as cluster_main
from cluster.plan import GIB, PlanInput, make_plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.yaml") if ".venv" not in p.parts and "data" not in p.parts))
def test_every_yaml_parses(path):
    assert yaml.safe_load((ROOT / path).read_text()) is not None


def test_launcher_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster/ray-cluster.aws.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and cfg["idle_timeout_minutes"] > 0


def test_serve_configs_agree():
    from ray.serve.schema import ServeDeploySchema

    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    gpu = yaml.safe_load((ROOT / "cluster/serve_config.gpu.yaml").read_text())
    rs = yaml.safe_load((ROOT / "cluster/rayservice.yaml").read_text())
    inner = yaml.safe_load(rs["spec"]["serveConfigV2"])
    for cfg in (local, gpu, inner):
        ServeDeploySchema.model_validate(cfg)
    assert inner["applications"] == gpu["applications"]
    key = lambda cfg: [(a["name"], a["import_path"], sorted(d["name"] for d in a["deployments"])) for a in cfg["applications"]]
    assert key(inner) == key(local)
    emb = next(d for d in gpu["applications"][0]["deployments"] if d["name"] == "Embedder")
    assert emb["ray_actor_options"]["num_gpus"] == 1 and emb["autoscaling_config"]["max_replicas"] > 1


def test_plan_for_100_billion_images_matches_hand_arithmetic():
    p = PlanInput(images=10**11, dim=256, replication=2, node_memory_gib=512, memory_headroom=0.75,
                  max_shard_gib=64, target_qps=2000, shard_replica_qps=500, gpu_images_per_s=2000, reindex_hours=72)
    plan = make_plan(p)
    bpv = 256 + 8
    assert plan["index_bytes"] == 10**11 * bpv
    shards = math.ceil(10**11 * bpv / (64 * GIB))
    assert plan["shards"] == shards == 385
    assert plan["replicas_per_shard"] == 4  # 2000 QPS / 500 per replica beats replication 2
    assert plan["memory_bytes"] == 10**11 * bpv * 4
    per_node = math.floor(512 * GIB * 0.75 / (math.ceil(10**11 / shards) * bpv))
    assert plan["shard_nodes"] == math.ceil(shards * 4 / per_node)
    assert plan["reindex_gpus"] == math.ceil(10**11 / (2000 * 72 * 3600))


def test_plan_cli(capsys):
    assert cluster_main(["plan", "--images", "1e11"]) == 0
    assert "shards" in capsys.readouterr().out
    assert cluster_main(["plan", "--images", "1e11", "--max-shard-gib", "2000"]) == 2
    assert cluster_main(["plan", "--images", "-5"]) == 2


@pytest.mark.parametrize("path", ["cluster/rayservice.yaml", "cluster/ray-cluster.aws.yaml"])
def test_cluster_configs_start_ray_with_the_fast_path(path):
    from deployments.environment import FAST_PATH

    text = (ROOT / path).read_text()
    for name in FAST_PATH:
        assert name in text, f"{path} does not set {name}"


def test_plan_takes_bytes_per_vector_from_a_memory_benchmark(tmp_path, capsys):
    import json

    rows = [{"factory": "IVF4096,SQ8", "impl": "mapped", "vectors": "slope", "scanned_bytes_per_vector": 281.0},
            {"factory": "OPQ64_256,IVF4096,PQ64", "impl": "mapped", "vectors": "slope", "scanned_bytes_per_vector": 90.5},
            {"factory": "OPQ64_256,IVF4096,PQ64", "impl": "baseline", "vectors": "slope", "scanned_bytes_per_vector": 400.0}]
    (tmp_path / "memory.json").write_text(json.dumps({"memory": rows}))
    assert cluster_main(["plan", "--images", "1e11", "--measured", str(tmp_path / "memory.json")]) == 0
    out = capsys.readouterr().out
    assert "90 B/vector (measured, OPQ64_256,IVF4096,PQ64)" in out
    assert cluster_main(["plan", "--images", "1e11", "--measured", str(tmp_path / "memory.json"), "--factory", "IVF4096,SQ8"]) == 0
    assert "281 B/vector (measured, IVF4096,SQ8)" in capsys.readouterr().out
    assert cluster_main(["plan", "--images", "1e11", "--measured", str(tmp_path / "nope.json")]) == 2


def test_cell_placement_plan_searches_few_shards_and_sizes_hot_ones():
    base = dict(images=10**11, replication=2, target_qps=20_000, shard_replica_qps=500)
    hashed, cells = make_plan(PlanInput(**base)), make_plan(PlanInput(**base, placement="cells", touched_shards=12,
                                                                         hot_queries_factor=3.0))
    assert hashed["shards"] == cells["shards"] and hashed["shard_searches_per_query"] == hashed["shards"]
    assert hashed["replicas_per_shard"] == 40  # every shard carries all 20,000 QPS
    share = 12 / cells["shards"]
    assert cells["shard_searches_per_query"] == 12
    assert cells["replicas_per_shard"] == max(2, math.ceil(20_000 * share / 500))
    assert cells["hot_shard_replicas"] == max(2, math.ceil(20_000 * share * 3.0 / 500))
    assert cells["memory_bytes"] < hashed["memory_bytes"] / 10
