"""Jobs over a whole index: `python -m indexing copy-groups` and `python -m indexing search`,
on real Ray, real shards and real images, beside the session's running service."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.edits import HEAVY_EDITS, MILD_EDITS, edited_copy
from indexing.__main__ import main as indexing_main
from indexing.catalog import HASHED, PRIVATE
from indexing.copygroups import Catalog, candidate_pairs, confirm, groups_table, unique_pairs
from indexing.shards import add_to_shard, make_template, shard_vectors
from tests.conftest import WRITE_TOKEN
from tests.images import TEXTURES

AUTH = {"authorization": f"Bearer {WRITE_TOKEN}"}
FLAT = {"color", "horse", "phantom", "retina", "rocket"}


# ---------------------------------------------------------------- plain logic, no Ray


@pytest.mark.parametrize("factory,tolerance", [("Flat", 1e-6), ("IVF8,Flat", 1e-6), ("IVF8,SQ8", 5e-3),
                                               ("IVF8,PQ4,RFlat", 1e-6)])
def test_shard_vectors_give_back_every_vector_under_its_id(rng, factory, tolerance):
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(2**40, len(x), replace=False).astype(np.int64)
    index = make_template(factory, 16, "ip", x)
    add_to_shard(index, ids, x)
    parts = [shard_vectors(index, s, s + 128) for s in range(0, 600, 128)]
    got_ids = np.concatenate([p[0] for p in parts])
    got = np.concatenate([p[1] for p in parts])
    assert sorted(got_ids.tolist()) == sorted(ids.tolist())
    want = x[np.argsort(ids)][np.searchsorted(np.sort(ids), got_ids)]
    assert np.abs((got * want).sum(1) - 1).max() <= tolerance


def _catalog(n: int, *, sha=None, phash=None, pixels=None, flags=None, built=None) -> Catalog:
    ids = np.arange(10, 10 + n, dtype=np.int64)
    return Catalog(ids, [f"/img/{i}.jpg" for i in range(n)],
                   np.asarray(sha if sha is not None else np.arange(1, n + 1), np.int64),
                   np.asarray(phash if phash is not None else np.zeros(n), np.int64),
                   np.asarray(flags if flags is not None else np.full(n, HASHED), np.uint8),
                   np.asarray(pixels if pixels is not None else np.zeros(n), np.int64),
                   np.asarray(built if built is not None else np.ones(n, bool)))


def test_confirmation_lets_verification_speak_where_it_can():
    # ids 10..19; 10 and 11 hold the same bytes; 12..15 hash within 4 bits of 10; 18, 19 have no hash
    cat = _catalog(10, sha=[5, 5, 1, 2, 3, 4, 6, 7, 8, 9], phash=[0, 0, 1, 3, 7, 15, 2**40 - 1, 2**50 - 1, 0, 0],
                   flags=[HASHED] * 8 + [0, 0])
    a = np.array([10, 10, 10, 10, 10, 10, 10, 16, 16, 18, 18], np.int64)
    b = np.array([11, 12, 13, 14, 15, 15, 16, 17, 17, 19, 19], np.int64)
    score = np.array([1.0, 0.9, 0.9, 0.9, 0.8, 0.4, 0.99, 0.5, 0.99, 0.99, 0.9], np.float32)
    inliers = np.array([-1, 40, 40, 3, -1, -1, -1, -1, 50, -1, -1])
    contained = np.array([-1, 0.97, 0.3, 0.9, -1, -1, -1, -1, 0.95, -1, -1])
    how = confirm(cat, a, b, score, inliers, contained, copy_bits=4, min_inliers=8, min_contained=0.8,
                  hash_min_score=0.6, sure_score=0.97)
    # same bytes; verified inside; an overlapping shot; verification said no although the hash is
    # near; unverifiable and near by hash with agreeing vectors, or with vectors far apart (two
    # flat pictures); hashed and far: a score never decides; neither; verified; no hashes
    # (vectors only): sure by score, or not
    assert how.tolist() == ["sha256", "verified", "", "", "hash", "", "", "", "verified", "score", ""]


def test_candidates_leave_out_the_image_itself_and_count_each_pair_once():
    ids = np.array([10, 11], np.int64)
    D = np.array([[1.0, 0.9, 0.2], [1.0, 0.95, 0.1]], np.float32)
    I = np.array([[10, 11, 12], [11, 10, -1]], np.int64)
    a, b, s = unique_pairs(*candidate_pairs(ids, D, I, min_score=0.3))
    assert a.tolist() == [10] and b.tolist() == [11] and s.tolist() == pytest.approx([0.95])


def test_groups_name_the_largest_member_first_by_the_build_and_mark_flags():
    # 10-11-12 one group through two links, 13-14 another, 15 alone; 12 is the largest of the first
    cat = _catalog(6, pixels=[100, 100, 400, 50, 50, 999], flags=[HASHED, HASHED | PRIVATE, HASHED, 0, 0, 0],
                   built=[True, True, True, False, True, True])
    a = np.array([10, 11, 13, 10], np.int64)
    b = np.array([11, 12, 14, 15], np.int64)
    t = groups_table(cat, a, b, np.array(["hash", "verified", "score", ""], dtype=object)).to_pylist()
    assert [(r["group"], r["id"], r["representative"], r["confirmed"], r["private"]) for r in t] == [
        (0, 10, 12, "hash", False), (0, 11, 12, "verified", True), (0, 12, 12, "verified", False),
        (1, 13, 14, "score", False), (1, 14, 14, "score", False)]  # equal pixels: the build's member


def test_no_confirmed_pair_makes_no_group():
    cat = _catalog(3)
    t = groups_table(cat, np.array([10, 11], np.int64), np.array([11, 12], np.int64), np.array(["", ""], dtype=object))
    assert t.num_rows == 0 and "representative" in t.column_names


# ---------------------------------------------------------------- the jobs, beside the service


def _groups(out) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for r in pq.read_table(out / "groups.parquet").to_pylist():
        groups.setdefault(r["group"], []).append(r["uri"])
    return groups


def test_copy_groups_of_the_served_index_hold_each_photo_with_its_crops_and_a_written_copy(
        service, client, image_index_dir, corpus_dir, tmp_path, capsys):
    """The session's corpus holds each photo and its four quadrants (crops of it): copy-groups puts
    them together, never two photos in one group, and a private copy written through the service
    after the build joins its photo's group, marked private."""
    root, _ = corpus_dir
    photo = root / "astronaut" / "full.jpg"
    copy = tmp_path / "written" / "astronaut-copy.jpg"
    copy.parent.mkdir()
    copy.write_bytes(edited_copy(photo.read_bytes(), **MILD_EDITS))
    id_ = 9_100_000_001
    r = client.put(f"/images/{id_}", params={"uri": str(copy)}, content=copy.read_bytes(),
                   headers={**AUTH, "content-type": "image/jpeg"})
    assert r.status_code in (200, 201), r.text
    try:
        assert client.patch(f"/images/{id_}", json={"private": True}, headers=AUTH).status_code == 200
        out = tmp_path / "groups"
        assert indexing_main(["copy-groups", "--index-dir", str(image_index_dir), "--out", str(out),
                              "--allow", str(copy.parent)]) == 0
        line = capsys.readouterr().out
        assert "copy groups" in line and "images in groups" in line
        groups = _groups(out)
        rows = {r["uri"]: r for r in pq.read_table(out / "groups.parquet").to_pylist()}
    finally:
        client.delete(f"/images/{id_}", headers=AUTH)
    for uris in groups.values():  # one photo per group: its full view, its quadrants, the written copy
        assert len({u.split("/")[-2] for u in uris if u != str(copy)}) == 1, uris
    astronaut = next(uris for uris in groups.values() if str(photo) in uris)
    assert str(copy) in astronaut and rows[str(copy)]["private"] and not rows[str(photo)]["private"]
    assert rows[str(copy)]["representative"] == rows[str(photo)]["id"]  # the largest member
    # Quadrants of a colour chart, a silhouette, a blurred phantom, a fundus and a sky hold too few
    # keypoints to verify (and their hashes differ): those stay apart. Every other one is found.
    photos = [p for p in root.iterdir() if p.is_dir() and p.name not in TEXTURES | FLAT | {"broken"}]
    apart = [p.name for p in photos
             if not all(str(p / f"{v}.jpg") in next((u for u in groups.values() if str(p / "full.jpg") in u), [])
                        for v in ("q0", "q1", "q2", "q3"))]
    assert apart == [] and len(photos) >= 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grouped"] == sum(len(u) for u in groups.values()) and summary["confirmed"]["verified"] > 0
    assert (out / "failed.jsonl").read_text() == ""


def test_bulk_search_answers_each_image_as_post_search_does(service, client, image_index_dir, corpus_dir, tmp_path,
                                                              capsys):
    """Edited copies, exact files and a broken file searched as one job: every query's top-k is the
    service's answer to the same bytes, the broken one is listed in failed.jsonl, and a private
    image is left out unless --include-private."""
    originals, queries = _edited_queries(corpus_dir, tmp_path, 6, {"mild": MILD_EDITS, "heavy": HEAVY_EDITS})
    shutil.copy(originals[0], queries / "exact.jpg")
    (queries / "broken.jpg").write_bytes(b"not a jpeg at all")
    top = client.post("/search?k=1&verify=false", content=(queries / "exact.jpg").read_bytes(),
                      headers={"content-type": "image/jpeg"}).json()["results"][0]["id"]
    assert client.patch(f"/images/{top}", json={"private": True}, headers=AUTH).status_code == 200
    try:
        out, out_all = tmp_path / "out", tmp_path / "out-all"
        assert indexing_main(["search", "--index-dir", str(image_index_dir), "--images", str(queries),
                              "--out", str(out), "--k", "5"]) == 0
        assert "searched 13 images, 1 unreadable" in capsys.readouterr().out
        assert indexing_main(["search", "--index-dir", str(image_index_dir), "--images", str(queries),
                              "--out", str(out_all), "--k", "5", "--include-private"]) == 0
        answers = {}
        for q in sorted(queries.glob("*.jpg")):
            if q.name != "broken.jpg":
                r = client.post("/search?k=5&verify=false", content=q.read_bytes(), headers={"content-type": "image/jpeg"})
                answers[str(q)] = r.json()["results"]
    finally:
        client.patch(f"/images/{top}", json={"private": False}, headers=AUTH)
    got: dict[str, list] = {}
    for r in pq.read_table(out / "results.parquet").to_pylist():
        got.setdefault(r["query_uri"], []).append(r)
    assert sorted(got) == sorted(answers)
    for q, hits in answers.items():
        assert [r["rank"] for r in got[q]] == list(range(1, len(hits) + 1))
        assert [r["id"] for r in got[q]] == [h["id"] for h in hits], q
        assert [r["score"] for r in got[q]] == pytest.approx([h["score"] for h in hits], abs=1e-4)
        assert top not in [r["id"] for r in got[q]]
    exact = [r for r in pq.read_table(out_all / "results.parquet").to_pylist() if r["query_uri"].endswith("exact.jpg")]
    assert exact[0]["id"] == top and exact[0]["rank"] == 1
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["uri"] for f in failed] == [str(queries / "broken.jpg")] and failed[0]["error"]


def test_bulk_search_with_verification_puts_the_verified_original_first(service, image_index_dir, corpus_dir, tmp_path):
    originals, queries = _edited_queries(corpus_dir, tmp_path, 4, {"heavy": HEAVY_EDITS})
    out = tmp_path / "out"
    assert indexing_main(["search", "--index-dir", str(image_index_dir), "--images", str(queries), "--out", str(out),
                          "--k", "3", "--verify"]) == 0
    first = {r["query_uri"]: r for r in pq.read_table(out / "results.parquet").to_pylist() if r["rank"] == 1}
    hits = sum(first[str(queries / f"{p.parent.name}-heavy.jpg")]["uri"] == str(p) and
               first[str(queries / f"{p.parent.name}-heavy.jpg")]["verified"] for p in originals)
    assert hits >= len(originals) - 1, first


def _edited_queries(corpus_dir, tmp_path, n: int, edits: dict):
    """The first n textured photos of the corpus and a folder of their edited copies (NAME-EDIT.jpg)."""
    root, _ = corpus_dir
    queries = tmp_path / "queries"
    queries.mkdir()
    originals = sorted(p for p in root.glob("*/full.jpg") if p.parent.name not in TEXTURES)[:n]
    for p in originals:
        for name, edit in edits.items():
            (queries / f"{p.parent.name}-{name}.jpg").write_bytes(edited_copy(p.read_bytes(), **edit))
    return originals, queries


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("verb", ["copy-groups", "search"])
def test_a_missing_index_is_a_message_before_ray_starts(tmp_path, capsys, verb):
    (tmp_path / "q").mkdir()
    extra = ["--images", str(tmp_path / "q")] if verb == "search" else []
    assert indexing_main([verb, "--index-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert "no index at" in err and "Traceback" not in err


def test_an_empty_or_missing_query_folder_is_a_message(image_index_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for folder, message in ((tmp_path / "empty", "no images with endings"), (tmp_path / "absent", "no such folder")):
        assert indexing_main(["search", "--index-dir", str(image_index_dir), "--images", str(folder),
                              "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def test_copy_groups_list_images_it_cannot_read_any_more(ray_session, corpus_dir, tmp_path, capsys):
    """Indexed images deleted or changed since the build cannot be verified: failed.jsonl names
    them, their pairs fall back to the hash rule, and the job still answers."""
    root, _ = corpus_dir
    folder = tmp_path / "images"
    for stem in ("astronaut", "coffee", "rocket"):
        (folder / stem).mkdir(parents=True)
        data = (root / stem / "full.jpg").read_bytes()
        (folder / stem / "full.jpg").write_bytes(data)
        (folder / stem / "copy.jpg").write_bytes(edited_copy(data, **MILD_EDITS))
    assert indexing_main(["build", "--images", str(folder), "--index-dir", str(tmp_path / "index")]) == 0
    (folder / "coffee" / "copy.jpg").unlink()
    (folder / "rocket" / "copy.jpg").write_bytes((folder / "astronaut" / "copy.jpg").read_bytes())
    capsys.readouterr()
    assert indexing_main(["copy-groups", "--index-dir", str(tmp_path / "index"), "--out", str(tmp_path / "g")]) == 0
    assert "2 images unreadable (failed.jsonl)" in capsys.readouterr().out
    failed = [json.loads(line) for line in (tmp_path / "g" / "failed.jsonl").read_text().splitlines()]
    assert sorted(f["uri"] for f in failed) == [str(folder / "coffee" / "copy.jpg"), str(folder / "rocket" / "copy.jpg")]
    groups = _groups(tmp_path / "g")
    assert sorted(str(folder / "astronaut" / n) for n in ("copy.jpg", "full.jpg")) in [sorted(g) for g in groups.values()]
