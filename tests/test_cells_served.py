"""A cell-placed index served over HTTP: 4 shards answer exactly as one unsharded IVF index, writes
(upsert, a move to another cell's shard, delete, flag) land where the placement says, and a
rebalance to 3 shards, switched to with writes in between, answers the same."""
import httpx
import numpy as np
import pytest

from configs.schema import load_config
from deployments.switch import switch
from indexing import storage
from indexing.build import build_from_vectors
from indexing.cells import CellRouting
from indexing.manifest import read_manifest
from indexing.merge import merge_topk
from indexing.rebalance import rebalance
from indexing.shards import add_to_shard, read_index, search_shard
from tests.conftest import WRITE_TOKEN, shard_call, side_apps
from tests.images import picture

AUTH = {"authorization": f"Bearer {WRITE_TOKEN}"}
JPEG = {**AUTH, "content-type": "image/jpeg"}
PICTURES = 640  # the corpus: uploads (pictures too) then fall into cells of every shard


@pytest.fixture(scope="module")
def cells_service(ray_session, service, tmp_path_factory):
    """Apps `cl` (route /cl) and `cl-index`: 4 shards, placement cells. Yields (url, dir, ids, vectors).
    The subject is placement, not retrieval quality: the real backbone runs at 64 px, here and in the
    service's embedder (12x fewer pixels than 224)."""
    from embedding.embedder import Embedder

    work = tmp_path_factory.mktemp("cells")
    index_dir, small = str(work / "index"), work / "small.yaml"
    small.write_text("model:\n  image_size: 64\n")
    cfg = load_config(str(small), {"index": {"placement": "cells"}})
    x = Embedder(cfg.model).embed_bytes([picture(10_000 + i) for i in range(PICTURES)]).astype(np.float32)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 3
    build_from_vectors(x, ids, index_dir, cfg, 4, "IVF32,Flat")
    for url in side_apps(service, "cl", index_dir, ingress_replicas=2, config=str(small)):
        yield url, index_dir, ids, x


def found(ids: np.ndarray) -> list[list[int]]:
    """Id rows without FAISS's -1 padding (the service returns fewer than k hits instead)."""
    return [[int(i) for i in row if i >= 0] for row in ids]


def served(c: httpx.Client, queries: np.ndarray, nprobe: int) -> list[list[int]]:
    r = c.post("/search/vector", json={"vectors": queries.tolist(), "k": 10, "nprobe": nprobe, "dedupe": False})
    assert r.status_code == 200 and not r.json()["partial"], r.text
    return [[h["id"] for h in row] for row in r.json()["results"]]


def test_cell_placement_served_end_to_end(cells_service):
    url, index_dir, ids, x = cells_service
    c = httpx.Client(base_url=url, timeout=60)
    m = read_manifest(index_dir)
    assert m.placement == "cells" and m.num_shards == 4
    rng = np.random.default_rng(2)
    queries = (x[rng.choice(len(x), 24, replace=False)] + rng.normal(scale=0.03, size=(24, x.shape[1]))).astype(np.float32)

    # Exactly the unsharded IVF: the same template holding every vector (ties in the service's order).
    whole = read_index(storage.join(index_dir, m.template))
    add_to_shard(whole, ids, x)
    for nprobe in (1, 4, 16):
        want = merge_topk([search_shard(whole, queries, 10, nprobe)], 10)[1]
        assert served(c, queries, nprobe) == found(want)
    routing = CellRouting.open(index_dir, m.template, m.cell_table, m.nprobe)
    assert sum(len(r) for r in routing.rows(queries, 4)) < 4 * len(queries)  # not every shard every query

    # Upsert: a new image lands on its cell's shard, once; found by its own (index) vector.
    def vector_of(seed: int) -> np.ndarray:
        r = c.post("/embed?index=true", content=picture(seed), headers={"content-type": "image/jpeg"})
        return np.asarray(r.json()["vector"], np.float32)

    first = vector_of(1)
    other = next(s for s in range(2, 400) if routing.shard_of_vector(vector_of(s)) != routing.shard_of_vector(first))
    total = c.get("/stats").json()["total"]
    assert c.put("/images/7", content=picture(1), headers=JPEG).status_code == 201
    assert c.get("/images/7").status_code == 200
    assert served(c, first[None], 16)[0][0] == 7
    assert c.get("/stats").json()["total"] == total + 1
    # Replaced by a picture whose cell is on another shard: the id moves; no second copy stays.
    assert c.put("/images/7", content=picture(other), headers=JPEG).status_code == 200
    assert c.get("/stats").json()["total"] == total + 1
    assert served(c, vector_of(other)[None], 16)[0][0] == 7
    assert 7 not in served(c, first[None], 64)[0]
    # Delete and flag reach the shard that holds the id.
    assert c.delete("/images/7", headers=AUTH).status_code == 200
    assert c.get("/images/7").status_code == 404 and c.delete("/images/7", headers=AUTH).status_code == 404
    assert c.get("/stats").json()["total"] == total
    flagged = int(ids[5])
    assert c.patch(f"/images/{flagged}", json={"private": True}, headers=AUTH).status_code == 200
    assert c.get(f"/images/{flagged}").status_code == 404
    assert c.get(f"/images/{flagged}", headers=AUTH).json()["private"]
    assert flagged not in served(c, x[5][None], 64)[0]
    assert c.patch("/images/999999999", json={"private": True}, headers=AUTH).status_code == 404

    # Rebalance 4 -> 3 (whole cells move), writes meanwhile, switch: still the unsharded IVF's answers.
    new = rebalance(index_dir, 3, task_cpus=0.05)
    assert new.placement == "cells" and new.num_shards == 3 and max(new.cell_table) == 2
    # Writes after the rebalance read the old shards: only the catch-up carries them.
    assert c.put("/images/9", content=picture(other), headers=JPEG).status_code == 201
    assert c.put("/images/11", content=picture(1), headers=JPEG).status_code == 201
    assert c.delete("/images/11", headers=AUTH).status_code == 200
    gone = int(ids[6])
    assert c.delete(f"/images/{gone}", headers=AUTH).status_code == 200
    out = switch("cl", timeout_s=180, drain_s=1)
    assert out["switched"] and out["writes_carried"] >= 2  # 9 upserted, `gone` deleted; 11 came and went
    stats = c.get("/stats").json()
    assert stats["version"] == 2 and len(stats["shards"]) == 3 and stats["total"] == total
    assert c.get("/images/9").status_code == 200 and c.get("/images/11").status_code == 404
    assert c.get(f"/images/{gone}").status_code == 404
    keep = ids != gone
    whole = read_index(storage.join(index_dir, m.template))
    add_to_shard(whole, np.append(ids[keep], 9), np.vstack([x[keep], vector_of(other)]))
    for nprobe in (1, 4, 16):
        want = merge_topk([search_shard(whole, queries, 10, nprobe, exclude=np.array([flagged]))], 10)[1]
        assert served(c, queries, nprobe) == found(want)


def test_an_id_moved_between_shards_keeps_its_flags_and_one_copy(cells_service):
    """Flags belong to the id: a private image replaced by pixels whose cell is on another shard
    stays private there. Concurrent PUT/PATCH/DELETE of the same ids, through two Ingress
    replicas, leave each id on one shard at most, and an id made private is never returned."""
    from concurrent.futures import ThreadPoolExecutor

    url, index_dir, _, _ = cells_service
    c = httpx.Client(base_url=url, timeout=60)
    stats = c.get("/stats").json()  # version 1, or 2 after the rebalance test
    m, app = read_manifest(index_dir, stats["version"]), stats["index_app"]
    routing = CellRouting.open(index_dir, m.template, m.cell_table, m.nprobe)

    def vector_of(seed: int) -> np.ndarray:
        r = c.post("/embed?index=true", content=picture(seed), headers={"content-type": "image/jpeg"})
        return np.asarray(r.json()["vector"], np.float32)

    def copies(id_: int) -> list[dict]:
        return [meta for s in range(m.num_shards)
                if (meta := shard_call(f"Shard{s:03d}", "get", id_, app=app)) is not None]

    vectors = {seed: vector_of(seed) for seed in range(500, 530)}
    home = {seed: routing.shard_of_vector(v) for seed, v in vectors.items()}
    a = 500
    b = next(s for s in vectors if home[s] != home[a])
    assert c.put("/images/777", content=picture(a), headers=JPEG).status_code == 201
    assert c.patch("/images/777", json={"private": True}, headers=AUTH).status_code == 200
    assert c.put("/images/777", content=picture(b), headers=JPEG).status_code == 200  # moves to b's shard
    assert c.get("/images/777").status_code == 404 and c.get("/images/777", headers=AUTH).json()["private"]
    assert [meta["private"] for meta in copies(777)] == [True]
    assert 777 not in served(c, vectors[b][None], 64)[0]

    ids, seeds = [881, 882, 883], sorted(vectors)
    rng = np.random.default_rng(5)
    ops = [(int(i), str(op), int(seed)) for i in ids for op, seed in
           zip(rng.choice(["put", "put", "patch"], 12), rng.choice(seeds, 12))]
    rng.shuffle(ops)

    def run(op):
        id_, kind, seed = op
        with httpx.Client(base_url=url, timeout=60) as w:
            if kind == "put":
                return w.put(f"/images/{id_}", content=picture(seed), headers=JPEG).status_code
            return w.patch(f"/images/{id_}", json={"private": True}, headers=AUTH).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(run, ops)) <= {200, 201, 404}
    for id_ in ids:
        assert len(copies(id_)) == 1, id_
    assert c.patch("/images/881", json={"private": True}, headers=AUTH).status_code == 200
    with ThreadPoolExecutor(4) as pool:  # the private id moves around under concurrent replacements
        list(pool.map(run, [(881, "put", int(seed)) for seed in rng.choice(seeds, 8)]))
    assert [meta["private"] for meta in copies(881)] == [True]
    for seed in seeds:
        assert 881 not in served(c, vectors[seed][None], 64)[0]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda i: c.delete(f"/images/{i}", headers=AUTH).status_code, ids + ids + [777]))
    assert sorted(statuses).count(200) == 4 and all(copies(i) == [] for i in ids + [777])

    # Two Ingress replicas: a flag set through one while the other moves the id still holds.
    raced = list(range(2_000_000, 2_000_048))  # not in the corpus
    for id_ in raced:
        assert c.put(f"/images/{id_}", content=picture(a), headers=JPEG).status_code == 201
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, [op for id_ in raced for op in ((id_, "put", b), (id_, "patch", 0))]))
    assert {id_: [meta["private"] for meta in copies(id_)] for id_ in raced} == {id_: [True] for id_ in raced}

