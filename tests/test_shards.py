"""The shard format against brute force: ids, filtering inside the search, per-call nprobe."""
import numpy as np
import pytest

from indexing.shards import add_to_shard, deserialize, make_template, search_shard, serialize, shard_ids


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8x4fs,Refine(Flat)", "PCA16,IVF8,Flat"])
def test_shard_search_filters_and_keeps_ids(rng, factory):
    x = unit(rng, 2000, 32)
    ids = rng.choice(10**12, 2000, replace=False).astype(np.int64)
    index = deserialize(serialize(make_template(factory, 32, "ip", x)))
    add_to_shard(index, ids, x, batch=500)
    assert sorted(shard_ids(index)) == sorted(ids)
    q = x[:5]
    D, I = search_shard(index, q, 10, nprobe=16)
    assert (I[:, 0] == ids[:5]).all()
    # Excluding each query's best answer still yields 10 results, none of them excluded.
    D2, I2 = search_shard(index, q, 10, nprobe=16, exclude=ids[:5])
    assert (I2 >= 0).all() and not np.isin(I2, ids[:5]).any()


def test_exact_flat_shard_matches_numpy(rng):
    x = unit(rng, 500, 16)
    index = make_template("Flat", 16, "ip", x)
    add_to_shard(index, np.arange(500) + 10, x)
    q = unit(rng, 8, 16)
    D, I = search_shard(index, q, 7, nprobe=1)
    want = np.argsort(-(q @ x.T), axis=1)[:, :7] + 10
    np.testing.assert_array_equal(I, want)


def test_wrong_dimension_is_refused(rng):
    index = make_template("Flat", 8, "ip", unit(rng, 10, 8))
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        search_shard(index, np.zeros((1, 9), np.float32), 3, nprobe=1)


def test_auto_factory_grows_compact_with_the_corpus():
    from configs.schema import IndexConfig
    from indexing.template import choose_factory

    cfg = IndexConfig()
    assert choose_factory(cfg, 500, 1280, 500) == "Flat"
    assert choose_factory(cfg, 200_000, 1280, 200_000).endswith(",SQ8")
    big = choose_factory(cfg, cfg.compact_above, 1280, 200_000)
    assert big == cfg.compact_factory.format(nlist=4096)
    import faiss

    from evaluation.codecs import code_bytes

    assert code_bytes(faiss.index_factory(1280, big)) <= 64 + 8  # at most 64 code bytes per vector, plus its id
