"""Shared fixtures: one local Ray per test session, one embedder, small generated image sets."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests import images as test_images


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedder():
    from embedding.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder of distinct photos (bundled samples and their quadrants) plus two corrupt files."""
    root = tmp_path_factory.mktemp("corpus")
    n = test_images.write_corpus(str(root))
    (root / "broken" ).mkdir()
    (root / "broken" / "not-an-image.jpg").write_bytes(b"this is not a jpeg")
    good = next(p for p in sorted(root.rglob("*.jpg")) if p.parent.name != "broken")
    (root / "broken" / "truncated.jpg").write_bytes(good.read_bytes()[:1500])
    (root / "labels.csv").write_text("not,an,image\n")
    return root, n


@pytest.fixture
def rng():
    return np.random.default_rng(int(os.environ.get("TEST_SEED", "0")))
