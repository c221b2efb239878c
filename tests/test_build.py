"""`python -m indexing build` end to end on real Ray, real FAISS and real images."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexing import ShardedIndex
from indexing.__main__ import main as indexing_main
from indexing.ids import shard_of
from indexing.shards import shard_ids
from evaluation.edits import edited_copy


def test_vectors_flat_three_shards_equal_brute_force(ray_session, tmp_path, rng):
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(2**40, len(x), replace=False).astype(np.int64)
    np.save(tmp_path / "v.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    rc = indexing_main(["build", "--vectors", str(tmp_path / "v.npy"), "--ids", str(tmp_path / "ids.npy"),
                        "--index-dir", str(tmp_path / "ix"), "--factory", "Flat", "--shards", "3"])
    assert rc == 0
    ix = ShardedIndex.open(str(tmp_path / "ix"))
    assert ix.ntotal == 3000 and len(ix.shards) == 3 and all(s.ntotal > 800 for s in ix.shards)
    q = rng.normal(size=(50, 24)).astype(np.float32)
    D, I = ix.search(q, 10)
    want = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    np.testing.assert_array_equal(I, want)
    np.testing.assert_allclose(D, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_vectors_bad_input_is_a_cli_error(ray_session, tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.zeros((10, 4), np.float32))
    np.save(tmp_path / "ids.npy", np.zeros(10, np.int64))
    rc = indexing_main(["build", "--vectors", str(tmp_path / "v.npy"), "--ids", str(tmp_path / "ids.npy"),
                        "--index-dir", str(tmp_path / "ix")])
    assert rc == 2 and "unique" in capsys.readouterr().err
    (tmp_path / "junk.npy").write_text("nope")
    assert indexing_main(["build", "--vectors", str(tmp_path / "junk.npy"), "--index-dir", str(tmp_path / "ix")]) != 0


@pytest.fixture(scope="module")
def image_index(corpus_dir, image_index_dir):
    """The test corpus built into 3 shards: the session's index (tests/conftest.py), read only."""
    root, n_good = corpus_dir
    return root, n_good, image_index_dir


def test_images_build_skips_corrupt_files(image_index):
    root, n_good, index_dir = image_index
    ix = ShardedIndex.open(str(index_dir))
    assert ix.manifest.total == ix.ntotal == n_good
    failed = [json.loads(l) for l in (index_dir / "failed.jsonl").read_text().splitlines()]
    assert sorted(f["uri"].rsplit("/", 1)[1] for f in failed) == ["not-an-image.jpg", "truncated.jpg"]
    assert all(f["error"] for f in failed)
    # Every id lives in exactly one shard, the one its slot names.
    per_shard = [shard_ids(s) for s in ix.shards]
    all_ids = np.concatenate(per_shard)
    assert len(all_ids) == len(np.unique(all_ids)) == n_good
    for s, got in enumerate(per_shard):
        assert (shard_of(got, ix.manifest.slot_table) == s).all()
    cat = pq.read_table(index_dir / "catalog.parquet")
    assert set(cat.column("id").to_pylist()) == set(all_ids.tolist())
    assert all(len(h) == 64 for h in cat.column("sha256").to_pylist())


def test_rebuild_gives_the_same_ids(image_index, tmp_path, capsys):
    """Ids come from paths, whatever the model: the rebuild runs the real backbone at 64 px on
    whole frames (a quarter of a second's work here, where the session index paid for views)."""
    root, n_good, index_dir = image_index
    (tmp_path / "small.yaml").write_text("model:\n  image_size: 64\n  index_views: []\n")
    capsys.readouterr()
    assert indexing_main(["build", "--images", str(root), "--index-dir", str(tmp_path / "b"), "--shards", "2",
                          "--config", str(tmp_path / "small.yaml")]) == 0
    # Output to a file or pipe: plain progress lines (no carriage returns) ending in one summary.
    err, listed = capsys.readouterr().err, n_good + 2
    assert f"embedding: {listed}/{listed} images in " in err and "filling shards: 2/2 shards in " in err
    assert "\r" not in err and "Total Progress" not in err  # nor Ray Data's own progress table
    a = pq.read_table(index_dir / "catalog.parquet").to_pydict()
    b = pq.read_table(tmp_path / "b" / "catalog.parquet").to_pydict()
    assert dict(zip(a["uri"], a["id"])) == dict(zip(b["uri"], b["id"]))


def test_edited_copies_find_their_original(image_index, embedder):
    root, _, index_dir = image_index
    ix = ShardedIndex.open(str(index_dir))
    cat = pq.read_table(index_dir / "catalog.parquet").to_pydict()
    uris, ids = cat["uri"], np.array(cat["id"])
    queries = embedder.embed_bytes([edited_copy(open(u, "rb").read(), scale=0.6, quality=60) for u in uris])
    _, I = ix.search(queries, 1)
    hit = (I[:, 0] == ids).mean()
    assert hit >= 0.95, f"rank-1 self retrieval {hit:.3f}"


def test_missing_folder_is_a_cli_error(ray_session, tmp_path, capsys):
    assert indexing_main(["build", "--images", str(tmp_path / "nope"), "--index-dir", str(tmp_path / "ix")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("folder,message", [("nope", "no such folder"), ("empty", "no images with endings")])
def test_bad_images_folder_fails_before_ray_starts(tmp_path, folder, message):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    r = subprocess.run([sys.executable, "-m", "indexing", "build", "--images", str(tmp_path / folder),
                        "--index-dir", str(tmp_path / "ix")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert "Ray" not in r.stderr  # no local Ray was started to find that out
