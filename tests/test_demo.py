"""The demo corpus `make run` indexes: every variant is a real edit, and an original finds itself first."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from indexing.demo import write_demo_images


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_demo_images(str(out))
    return out


def test_every_demo_file_has_its_own_bytes_and_pixels(demo_dir):
    from PIL import Image

    files = sorted(demo_dir.rglob("*.jpg"))
    shas = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in files}
    assert len(shas) == len(files), "two demo files are byte-identical"
    for folder in {p.parent for p in files}:
        original = np.asarray(Image.open(folder / "original.jpg").convert("RGB"), np.int16)
        for p in folder.glob("*.jpg"):
            if p.name == "original.jpg":
                continue
            edited = np.asarray(Image.open(p).convert("RGB"), np.int16)
            if edited.shape == original.shape:
                assert np.abs(edited - original).mean() > 2.0, f"{p} barely differs from its original"


def test_each_original_is_its_own_nearest_neighbour(demo_dir, embedder):
    """What the printed curl shows: an original's best hit is itself, ahead of its variants."""
    files = sorted(demo_dir.rglob("*.jpg"))
    blobs = [p.read_bytes() for p in files]
    scores = embedder.embed_bytes(blobs) @ embedder.embed_bytes(blobs, for_index=True).T
    for i, p in enumerate(files):
        if p.name == "original.jpg":
            order = np.argsort(-scores[i])
            assert order[0] == i and scores[i, order[0]] - scores[i, order[1]] > 1e-4, p
