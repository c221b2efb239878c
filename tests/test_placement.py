"""Ids, slots and the exact top-k merge."""
import numpy as np
import pytest

from indexing.ids import id_from_path, initial_slot_table, shard_of, slot_of
from indexing.merge import merge_topk


def test_ids_are_stable_positive_and_path_sensitive():
    a = id_from_path("cats/001.jpg")
    assert a == id_from_path("cats/001.jpg") == id_from_path("cats\\001.jpg")
    assert a != id_from_path("cats/002.jpg") and a >= 0


def test_sequential_ids_spread_evenly_over_slots_and_shards():
    ids = np.arange(200_000)
    counts = np.bincount(slot_of(ids, 1024), minlength=1024)
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    per_shard = np.bincount(shard_of(ids, initial_slot_table(1024, 3)))
    assert per_shard.max() / per_shard.min() < 1.02


def test_more_shards_than_slots_is_refused():
    with pytest.raises(ValueError, match="slots"):
        initial_slot_table(4, 5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_equals_global_sort(rng, metric):
    n, k = 7, 5
    D = rng.normal(size=(n, 60)).astype(np.float32)
    I = rng.permutation(10_000)[: n * 60].reshape(n, 60).astype(np.int64)
    parts = []
    for s in range(3):
        d, i = D[:, s * 20 : (s + 1) * 20], I[:, s * 20 : (s + 1) * 20]
        o = np.argsort(-d if metric == "ip" else d, axis=1)[:, :k]
        parts.append((np.take_along_axis(d, o, 1), np.take_along_axis(i, o, 1)))
    Dm, Im = merge_topk(parts, k, metric)
    o = np.argsort(-D if metric == "ip" else D, axis=1)[:, :k]
    np.testing.assert_array_equal(Im, np.take_along_axis(I, o, 1))


def test_merge_breaks_ties_by_id_and_pads_missing():
    a = (np.array([[0.5, 0.1]], np.float32), np.array([[9, 4]]))
    b = (np.array([[0.5, -3.4e38]], np.float32), np.array([[2, -1]]))
    D, I = merge_topk([a, b], 4)
    assert I.tolist() == [[2, 9, 4, -1]]
    assert D[0, 3] == -np.inf
