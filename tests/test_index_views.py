"""Index views: an indexed image's vector adds its centre crops (model.index_views), so a heavily
cropped copy, embedded whole as a query, lands nearer its original; the build and the service's
writes give an image that vector, queries do not."""
import httpx
import numpy as np
import pytest
from PIL import ImageOps

from configs.schema import ConfigError, ModelConfig, load_config
from embedding.embedder import Embedder
from evaluation.edits import HEAVY_EDITS, edited_copy
from tests.conftest import WRITE_TOKEN
from tests.images import distinct_images, jpeg


@pytest.fixture(scope="module")
def gallery():
    return [jpeg(img) for _, img in sorted(distinct_images().items())]


@pytest.fixture(scope="module")
def plain():
    """The same model without index views: an indexed image is its whole frame alone."""
    return Embedder(ModelConfig(index_views=[]))


def ranks_of_originals(x, queries):
    s = queries @ x.T
    return (s > s[np.arange(len(x)), np.arange(len(x))][:, None]).sum(1)


def test_heavily_cropped_copies_rank_their_original_higher(embedder, plain, gallery):
    # Queries are embedded whole by either (test_queries_are_embedded_whole): embedded once.
    queries = embedder.embed_bytes([edited_copy(d, **HEAVY_EDITS) for d in gallery])
    whole = ranks_of_originals(plain.embed_bytes(gallery, for_index=True), queries)
    views = ranks_of_originals(embedder.embed_bytes(gallery, for_index=True), queries)
    # 88 images, photos and their quadrants: rank-1 0.42 -> 0.53, mean rank 7.4 -> 4.5 when written
    assert (views == 0).mean() > (whole == 0).mean() + 0.05, ((views == 0).mean(), (whole == 0).mean())
    assert views.mean() < 0.8 * whole.mean(), (views.mean(), whole.mean())


def test_queries_are_embedded_whole(embedder, plain, gallery):
    np.testing.assert_allclose(embedder.embed_bytes(gallery[:3]), plain.embed_bytes(gallery[:3]), atol=1e-5)
    indexed = embedder.embed_bytes(gallery[:3], for_index=True)
    assert np.allclose(np.linalg.norm(indexed, axis=1), 1, atol=1e-5)
    assert (np.sum(indexed * plain.embed_bytes(gallery[:3]), axis=1) < 0.999).all()


@pytest.mark.parametrize("views", [[[1.5, 0.5]], [[0.5, 0]], [[0.5]]])
def test_bad_views_fail_at_load_naming_the_key(tmp_path, views):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model:\n  index_views: {views}\n")
    with pytest.raises(ConfigError, match="model.index_views"):
        load_config(str(path))


def test_a_written_image_gets_its_index_vector(service, embedder, gallery):
    """PUT embeds the image as the build does: searching with its index vector finds it at
    cosine 1, where a query's vector of the same bytes does not reach it."""
    data = jpeg(ImageOps.mirror(distinct_images()["astronaut/full"]))  # not in the session's corpus
    auth = {"authorization": f"Bearer {WRITE_TOKEN}", "content-type": "image/jpeg"}
    with httpx.Client(base_url=service, timeout=60) as client:
        assert client.put("/images/424242", content=data, headers=auth).status_code == 201
        vector = embedder.embed_bytes([data], for_index=True)[0]
        hit = client.post("/search/vector", json={"vector": vector.tolist(), "k": 1, "dedupe": False}).json()
        assert hit["results"][0]["id"] == 424242 and hit["results"][0]["score"] > 0.9999, hit
        query = embedder.embed_bytes([data])[0]
        hit = client.post("/search/vector", json={"vector": query.tolist(), "k": 1, "dedupe": False}).json()
        assert hit["results"][0]["score"] < 0.999, hit
        assert client.delete("/images/424242", headers=auth).status_code == 200
