"""Pooling of the backbone's feature map: R-MAC regions and the option end to end."""
import numpy as np
import torch

from configs.schema import ModelConfig
from embedding.backbones import Pool, rmac_regions
from tests.images import picture


def test_rmac_regions_cover_the_map_at_three_scales():
    regions = rmac_regions(7, 9)
    assert regions[0] == (0, 7, 0, 9) and len(regions) == 1 + 4 + 9
    assert all(0 <= y0 < y1 <= 7 and 0 <= x0 < x1 <= 9 for y0, y1, x0, x1 in regions)
    assert {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in regions[1:5]} == {(5, 5)}  # 2*7/3 rounded
    assert regions[-1][1] == 7 and regions[-1][3] == 9  # the last square reaches the far corner


def test_rmac_sums_normalised_region_maxima():
    fmap = torch.rand(1, 8, 7, 7)
    want = sum(torch.nn.functional.normalize(fmap[..., y0:y1, x0:x1].amax(dim=(-2, -1)), dim=-1)
               for y0, y1, x0, x1 in rmac_regions(7, 7))
    torch.testing.assert_close(Pool("rmac")(fmap), want)


def test_rmac_embeds_unit_vectors_unlike_mean(embedder):
    from embedding.embedder import Embedder

    rmac = Embedder(ModelConfig(pooling="rmac"))
    blobs = [picture(1), picture(2)]
    a, b = rmac.embed_bytes(blobs), embedder.embed_bytes(blobs)
    assert a.shape == b.shape and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.abs(a - b).max() > 0.01
