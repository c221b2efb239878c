"""Geometric verification: local features + RANSAC tell a heavily edited copy from a similar
picture, and verified copies move to the top of an image search (in-process and over HTTP)."""
import io

import httpx
import pytest
from PIL import Image

from embedding.local_features import features_of, inliers
from evaluation.edits import HEAVY_EDITS, edited_copy
from indexing.policy import verified_first
from tests.images import TEXTURES, distinct_images

LIMITS = dict(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    """The bundled photographs (not the textures: repetitive patterns match themselves anywhere)."""
    return {name: jpeg(img) for name, img in distinct_images().items()
            if name.endswith("/full") and name.split("/")[0] not in TEXTURES}


def test_a_heavy_edit_has_many_inliers_and_another_photo_few(photos):
    names = sorted(photos)
    original = features_of(photos[names[0]], **LIMITS)
    copy = features_of(edited_copy(photos[names[0]], **HEAVY_EDITS), **LIMITS)
    same = inliers(copy, original)
    others = [inliers(copy, features_of(photos[n], **LIMITS)) for n in names[1:6]]
    assert same >= 30, same
    assert max(others) < 12, others  # serve.verify_min_inliers


def test_no_features_no_inliers():
    flat = features_of(jpeg(Image.new("RGB", (200, 200), (120, 120, 120))), **LIMITS)
    assert len(flat.descriptors) == 0 and inliers(flat, flat) == 0


def test_verified_results_move_to_the_top_in_merge_order():
    results = [{"id": i, "score": 1.0 - i / 10} for i in range(5)]
    out = verified_first(results, {4: 40, 3: 15, 0: 5}, min_inliers=12)
    assert [r["id"] for r in out] == [3, 4, 0, 1, 2]
    assert out[0]["inliers"] == 15 and "inliers" not in out[2]
    assert verified_first(results, {}, 12) == results


def test_http_search_verification_puts_more_originals_first(service, corpus_dir):
    """Heavily edited copies of the corpus photos, searched over HTTP with and without
    verification: verified copies come first with their inliers, and more originals lead."""
    root, _ = corpus_dir
    originals = [p for p in sorted(root.glob("*/full.jpg")) if p.parent.name not in TEXTURES]
    first_on = first_off = 0
    with httpx.Client(base_url=service, timeout=60) as client:
        copies = [edited_copy(path.read_bytes(), **HEAVY_EDITS) for path in originals]
        # A first pass fills the Verifier's feature cache: a cold replica may spend its 1 s budget
        # on extracting the candidates' features, and then answers with part of them verified.
        for copy in copies:
            client.post("/search?k=5&verify=true", content=copy, headers={"content-type": "image/jpeg"})
        for path, copy in zip(originals, copies):
            on = client.post("/search?k=5&verify=true", content=copy, headers={"content-type": "image/jpeg"}).json()
            off = client.post("/search?k=5", content=copy, headers={"content-type": "image/jpeg"}).json()
            assert on["verified"] is True and off["verified"] is False
            assert all("inliers" not in h for h in off["results"])
            assert all(h["inliers"] >= 12 for h in on["results"] if "inliers" in h)
            first_on += on["results"][0]["uri"] == str(path)
            first_off += off["results"][0]["uri"] == str(path)
    assert first_on > first_off, (first_on, first_off, len(originals))
