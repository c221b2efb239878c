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


def test_each_original_is_near_its_own_indexed_vector(demo_dir, embedder):
    """What the printed curl shows: an original's indexed vector is among its three nearest (the
    others are its recompressed and recoloured copies). The indexed vector adds centre crops
    (model.index_views), so a copy can score a hair above it; the service puts the query's own
    bytes first (tests/test_verify.py)."""
    files = sorted(demo_dir.rglob("*.jpg"))
    originals = [i for i, p in enumerate(files) if p.name == "original.jpg"]
    indexed = embedder.embed_bytes([p.read_bytes() for p in files], for_index=True)
    scores = embedder.embed_bytes([files[i].read_bytes() for i in originals]) @ indexed.T  # queries: originals only
    for row, i in enumerate(originals):
        assert i in np.argsort(-scores[row])[:3], files[i]
