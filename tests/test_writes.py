"""Continuous indexing over real HTTP: tokens, upserts, deletes, flags, durability, concurrency, ingest."""
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexing.__main__ import main as indexing_main
from indexing.build import arrow_to_vectors, read_embeddings
from indexing.ids import shard_of
from indexing.manifest import read_manifest
from tests.conftest import WRITE_TOKEN, shard_info
from tests.images import picture

AUTH = {"authorization": f"Bearer {WRITE_TOKEN}"}


def put(client, id_, data, **params):
    return client.put(f"/images/{id_}", content=data, params=params,
                      headers={**AUTH, "content-type": "image/jpeg"})


def top_ids(client, data, k=5):
    r = client.post(f"/search?k={k}&dedupe=false", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


@pytest.mark.parametrize("method", ["put", "delete", "patch"])
def test_write_tokens(client, method):
    call = getattr(client, method)
    kw = {"content": picture(1)} if method != "delete" else {}
    if method == "patch":
        kw = {"json": {"private": True}}
    assert call("/images/77", **kw).status_code == 401
    r = call("/images/77", headers={"authorization": "Bearer wrong"}, **kw)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.post("/search/vector", json={"vector": [0.0] * 1280}).status_code == 200  # reads stay open


def test_upsert_replace_delete(client):
    id_, a, b = 9_000_000_001, picture(11), picture(12)
    r = put(client, id_, a, uri="s3://test/a")
    assert r.status_code == 201 and r.json()["created"] is True
    assert top_ids(client, a)[0] == id_
    assert client.get(f"/images/{id_}").json()["uri"] == "s3://test/a"
    r = put(client, id_, b, uri="s3://test/b")
    assert r.status_code == 200 and r.json()["created"] is False
    assert top_ids(client, b)[0] == id_ and top_ids(client, a).count(id_) <= 1
    assert client.delete(f"/images/{id_}", headers=AUTH).status_code == 200
    assert id_ not in top_ids(client, b, k=50)
    assert client.delete(f"/images/{id_}", headers=AUTH).status_code == 404
    assert client.get(f"/images/{id_}").status_code == 404
    assert client.patch(f"/images/{id_}", json={"private": True}, headers=AUTH).status_code == 404


@pytest.mark.parametrize("uri", ["javascript:alert(1)", "data:text/html,<b>x</b>", "file:///etc/passwd", "/etc/passwd",
                                 "../../etc/passwd", "mem://x", "x" * 3000, "a\nb"])
def test_a_uri_that_points_anywhere_is_refused(client, uri):
    r = client.put("/images/9000000077", params={"uri": uri}, content=picture(3), headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_uri", r.text
    assert client.get("/images/9000000077").status_code == 404  # nothing was written


@pytest.mark.parametrize("body,status", [(b"{", 400), (b'{"private": "yes"}', 422), (b'{"colour": 1}', 422)])
def test_bad_flag_bodies(client, image_index_dir, body, status):
    any_id = read_embeddings(str(image_index_dir / "embeddings"), columns=["id"]).column("id")[0].as_py()
    r = client.patch(f"/images/{any_id}", content=body, headers=AUTH)
    assert r.status_code == status and "error" in r.json()
    assert client.put("/images/-3", content=picture(1), headers=AUTH).status_code == 422


def test_flagged_images_never_appear(client, image_index_dir):
    """Property: over random flag assignments and random queries, no flagged id is ever returned,
    and queries still get k results."""
    t = read_embeddings(str(image_index_dir / "embeddings"))
    ids, x = t.column("id").to_numpy(), arrow_to_vectors(t.column("embedding"))
    rng = np.random.default_rng(7)
    flagged: set[int] = set()
    try:
        for round_ in range(4):
            for i in rng.choice(ids, 12, replace=False).tolist():
                flag = ["private", "unsafe"][round_ % 2]
                on = bool(rng.integers(0, 2)) or i not in flagged
                assert client.patch(f"/images/{i}", json={flag: on}, headers=AUTH).status_code == 200
                flagged.add(i) if on else None
            # Recompute the truth from the service itself (flags of both kinds accumulate).
            hidden = {i for i in flagged
                      if (lambda m: m["private"] or m["unsafe"])(client.get(f"/images/{i}", headers=AUTH).json())}
            for i in hidden:  # a reader is told nothing about a hidden image, not even that it exists
                r = client.get(f"/images/{i}")
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            q = np.concatenate([x[rng.choice(len(x), 6)], rng.normal(size=(4, x.shape[1])).astype(np.float32)])
            k = 20
            res = client.post("/search/vector", json={"vectors": q.tolist(), "k": k, "dedupe": False}).json()
            for row in res["results"]:
                got = {h["id"] for h in row}
                assert not got & hidden
                assert len(row) == min(k, len(ids) - len(hidden))
    finally:
        for i in flagged:
            client.patch(f"/images/{i}", json={"private": False, "unsafe": False}, headers=AUTH)


def test_acknowledged_writes_survive_sigkill(client, image_index_dir):
    m = read_manifest(str(image_index_dir))
    mine = [i for i in range(9_100_000_000, 9_100_000_400) if shard_of([i], m.slot_table)[0] == 2][:8]
    before = client.get("/stats").json()["shards"][2]["count"]
    for n, i in enumerate(mine):
        assert put(client, i, picture(100 + n), uri=f"s3://test/{i}").status_code == 201
    pid = shard_info("Shard002")["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            info = shard_info("Shard002")
            if info["pid"] != pid:
                break
        except Exception:
            pass
        time.sleep(1)
    else:
        pytest.fail("Shard002 was not restarted")
    assert info["count"] == before + len(mine)  # every acknowledged write, nothing else
    for n, i in enumerate(mine):
        assert client.get(f"/images/{i}").json()["uri"] == f"s3://test/{i}"
        assert top_ids(client, picture(100 + n), k=1) == [i]
    for i in mine:
        assert client.delete(f"/images/{i}", headers=AUTH).status_code == 200


def test_concurrent_writes_and_reads(client, service):
    ids = list(range(9_200_000_000, 9_200_000_024))

    def writer(i):
        with httpx.Client(base_url=service, timeout=60) as c:
            return put(c, i, picture(i % 1000), uri=f"s3://test/{i}").status_code

    def reader(n):
        with httpx.Client(base_url=service, timeout=60) as c:
            return c.post("/search?k=5", content=picture(5000 + n), headers={"content-type": "image/jpeg"}).status_code

    with ThreadPoolExecutor(8) as pool:
        w = pool.map(writer, ids)
        r = pool.map(reader, range(16))
        assert set(w) == {201} and set(r) == {200}
    for i in ids:
        assert client.get(f"/images/{i}").status_code == 200
        assert client.delete(f"/images/{i}", headers=AUTH).status_code == 200


def test_ingest_adds_new_images_once(service, tmp_path, capsys):
    from indexing.ids import id_from_bytes

    for n in range(3):
        (tmp_path / f"new{n}.jpg").write_bytes(picture(7000 + n))
    assert indexing_main(["ingest", "--images", str(tmp_path), "--url", service, "--token", WRITE_TOKEN]) == 0
    assert "added 3 images" in capsys.readouterr().out
    assert indexing_main(["ingest", "--images", str(tmp_path), "--url", service, "--token", WRITE_TOKEN]) == 0
    assert "added 0 images, skipped 3" in capsys.readouterr().out
    (tmp_path / "new3.jpg").write_bytes(picture(7003))
    assert indexing_main(["ingest", "--images", str(tmp_path), "--url", service, "--token", "bad"]) == 2
    assert "refused the" in capsys.readouterr().err
    with httpx.Client(base_url=service) as c:
        for n in range(3):
            assert c.delete(f"/images/{id_from_bytes(picture(7000 + n))}", headers=AUTH).status_code == 200


def test_two_folders_with_the_same_file_names_both_go_in(service, tmp_path, capsys):
    """Two cameras name their files alike: outside the index's own folders an id comes from the
    bytes, so the second folder's IMG_0001.jpg is an image of its own, not a collision."""
    from indexing.ids import id_from_bytes

    for cam, seed in (("cam1", 7500), ("cam2", 7600)):
        (tmp_path / cam).mkdir()
        for n in range(2):
            (tmp_path / cam / f"IMG_000{n}.jpg").write_bytes(picture(seed + n))
        assert indexing_main(["ingest", "--images", str(tmp_path / cam), "--url", service, "--token", WRITE_TOKEN]) == 0
        assert "added 2 images" in capsys.readouterr().out
    with httpx.Client(base_url=service) as c:
        for seed in (7500, 7501, 7600, 7601):
            r = c.get(f"/images/{id_from_bytes(picture(seed))}")
            assert r.status_code == 200 and r.json()["uri"].endswith(".jpg")
            assert c.delete(f"/images/{id_from_bytes(picture(seed))}", headers=AUTH).status_code == 200


def test_a_folder_the_operator_allows_gets_thumbnails_and_verification(service, capsys):
    """Outside the index's folders and serve.uri_roots an ingest is refused with the operator's
    command to run; once the operator allows the folder (through Ray, not a write token), its
    photos have thumbnails and verified searches find them."""
    import tempfile

    from deployments.allow import allow
    from indexing.ids import id_from_bytes
    from tests.images import distinct_images, jpeg

    from PIL import Image

    elsewhere = tempfile.mkdtemp(prefix="not-a-root-")
    # A mirror image: the model places it beside the indexed original, but its local features
    # match only itself, so the copy check decides between them.
    mirrored = distinct_images()["astronaut/q0"].convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    photo = jpeg(mirrored)
    w, h = mirrored.size
    edited = jpeg(mirrored.crop((w // 20, h // 20, w - w // 20, h - h // 20)))
    try:
        (Path(elsewhere) / "x.jpg").write_bytes(photo)
        assert indexing_main(["ingest", "--images", elsewhere, "--url", service, "--token", WRITE_TOKEN]) == 2
        assert f"python -m deployments allow {elsewhere}" in capsys.readouterr().err
        assert os.path.realpath(elsewhere) in allow("imsearch", [elsewhere])
        assert indexing_main(["ingest", "--images", elsewhere, "--url", service, "--token", WRITE_TOKEN]) == 0
        id_ = id_from_bytes(photo)
        with httpx.Client(base_url=service, timeout=60) as c:
            assert c.get(f"/images/{id_}/thumbnail").status_code == 200
            r = c.post("/search?k=5&verify=true", content=edited, headers={"content-type": "image/jpeg"}).json()
            assert r["verified"] and r["results"][0]["id"] == id_, r
            assert r["results"][0]["same_photo"] and r["results"][0]["inliers"] >= 8
            assert c.delete(f"/images/{id_}", headers=AUTH).status_code == 200
    finally:
        shutil.rmtree(elsewhere)


def test_ingest_takes_the_token_variable_the_service_reads(service, tmp_path, monkeypatch, capsys):
    from indexing.ids import id_from_bytes

    (tmp_path / "solo.jpg").write_bytes(picture(7100))
    monkeypatch.delenv("IMSEARCH_TOKEN", raising=False)
    monkeypatch.setenv("IMSEARCH_WRITE_TOKENS", f"{WRITE_TOKEN},another")
    assert indexing_main(["ingest", "--images", str(tmp_path), "--url", service]) == 0
    assert "added 1" in capsys.readouterr().out
    with httpx.Client(base_url=service) as c:
        assert c.delete(f"/images/{id_from_bytes(picture(7100))}", headers=AUTH).status_code == 200


def test_post_derives_the_id_from_the_bytes_or_the_indexed_path(client, corpus_dir):
    import hashlib

    from indexing.ids import id_from_bytes, id_from_path

    data = picture(7200)
    headers = {**AUTH, "content-type": "image/jpeg"}
    r = client.post("/images", content=data, headers=headers)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {"id": id_from_bytes(data), "created": True, "id_from": "content"}
    again = client.post("/images", content=data, headers=headers)  # a retry is harmless: same bytes, same id
    assert again.status_code == 200 and again.json()["id"] == body["id"] and again.json()["created"] is False
    assert client.get(f"/images/{body['id']}").json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert client.delete(f"/images/{body['id']}", headers=AUTH).status_code == 200

    # A file under the folder the index was built from gets the id the build gave it: no duplicate.
    root, _ = corpus_dir
    indexed = next(p for p in sorted(root.rglob("*.jpg")) if p.parent.name != "broken")
    r = client.post("/images", params={"uri": str(indexed)}, content=indexed.read_bytes(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": id_from_path(indexed.relative_to(root).as_posix()), "created": False, "id_from": "path"}
    assert client.post("/images", content=data).status_code == 401


def test_search_says_how_many_copies_it_collapsed(client):
    a = picture(7300)
    ids = [9_000_000_300, 9_000_000_301]
    for id_ in ids:  # the same picture twice, under two ids
        assert put(client, id_, a).status_code == 201
    try:
        r = client.post("/search?k=5", content=a, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["collapsed"] >= 1
        assert [h["id"] for h in r.json()["results"]].count(ids[0]) + [h["id"] for h in r.json()["results"]].count(ids[1]) == 1
        r = client.post("/search?k=5&dedupe=false", content=a, headers={"content-type": "image/jpeg"})
        assert r.json()["collapsed"] == 0
        r = client.post("/search/vector", json={"vectors": [[0.0] * 1279 + [1.0]] * 2, "k": 3})
        assert isinstance(r.json()["collapsed"], list) and len(r.json()["collapsed"]) == 2
    finally:
        for id_ in ids:
            client.delete(f"/images/{id_}", headers=AUTH)


def test_ingest_reports_a_different_photo_under_an_indexed_path(service, tmp_path, capsys):
    """Ids by path (--prefix, as under the index's own folders): another photo under a path
    already indexed is a collision, reported and not sent, unless --replace."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, n in ((first, 7400), (second, 7401)):  # another photo under the same relative path
        (folder / "x").mkdir(parents=True)
        (folder / "x" / "same.jpg").write_bytes(picture(n))
    base = ["ingest", "--url", service, "--token", WRITE_TOKEN, "--prefix", "cam"]
    assert indexing_main([*base, "--images", str(first)]) == 0
    assert "added 1 images" in capsys.readouterr().out
    assert indexing_main([*base, "--images", str(second)]) == 1
    out = capsys.readouterr()
    assert "added 0 images, skipped 0 already present, 1 id collisions" in out.out
    assert "x/same.jpg" in out.err and "--replace" in out.err
    assert indexing_main([*base, "--images", str(second), "--replace"]) == 0
    assert "replaced 1" in capsys.readouterr().out
    with httpx.Client(base_url=service) as c:
        import hashlib

        from indexing.ids import id_from_path

        meta = c.get(f"/images/{id_from_path('cam/x/same.jpg')}").json()
        assert meta["sha256"] == hashlib.sha256(picture(7401)).hexdigest()
        assert c.delete(f"/images/{id_from_path('cam/x/same.jpg')}", headers=AUTH).status_code == 200
