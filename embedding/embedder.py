"""Batch inference: images or uint8 pixel arrays in, float32 L2-normalised vectors out."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from configs.schema import DecodeConfig, ModelConfig
from embedding.decode import centre_crops, decode_image, resize_rgb
from embedding.runtime import open_runner

LOG = logging.getLogger(__name__)


class Embedder:
    """Owns one model in one runtime (`model.runtime`). `embed_pixels` is the hot path used by
    Ray Data and Serve."""

    def __init__(self, cfg: ModelConfig = ModelConfig(), decode: DecodeConfig = DecodeConfig(),
                 threads: Optional[int] = None):
        self.cfg, self.decode_cfg = cfg, decode
        self.runner = open_runner(cfg, threads)
        self.dim = int(self._forward(np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8)).shape[1])
        LOG.info("embedder %s in %s, dim %d", cfg.name, self.runner.name, self.dim)

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode untrusted bytes into the (S, S, 3) uint8 array the model takes."""
        img = decode_image(data, max_bytes=self.decode_cfg.max_bytes, max_pixels=self.decode_cfg.max_pixels,
                           draft=self.cfg.image_size)
        return resize_rgb(img, self.cfg.image_size)

    def embed_pixels(self, pixels: np.ndarray, for_index: bool | np.ndarray = False) -> np.ndarray:
        """Embed (N, S, S, 3) uint8 pixels; returns (N, D) float32, L2-normalised. Rows marked by
        `for_index` (True: all; or a boolean mask) are images being indexed: their vector adds the
        centre crops of `model.index_views`, so that a query showing only the middle of the
        picture, as a heavily cropped copy does, still lands near it. The frames and their crops
        go through the network as one batch."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be (N, H, W, 3) uint8, got shape {pixels.shape}")
        rows = np.broadcast_to(np.asarray(for_index, bool), (len(pixels),))
        if not (self.cfg.index_views and rows.any()):
            return self._forward(pixels)
        chosen = pixels[rows]
        views = self._forward(np.concatenate([pixels] + [centre_crops(chosen, f) for f, _ in self.cfg.index_views]))
        vectors, n, k = views[: len(pixels)], len(pixels), len(chosen)
        total = vectors[rows]
        for i, (_, weight) in enumerate(self.cfg.index_views):
            total = total + weight * views[n + i * k : n + (i + 1) * k]
        vectors[rows] = total / np.linalg.norm(total, axis=1, keepdims=True)
        return vectors

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        """The model's vectors of whole frames, in batches of `model.batch_size`."""
        out = [self.runner(pixels[start : start + self.cfg.batch_size])
               for start in range(0, len(pixels), self.cfg.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, 0), np.float32)

    def embed_images(self, images: Sequence[Image.Image], for_index: bool = False) -> np.ndarray:
        """Embed RGB PIL images (as queries, or `for_index`)."""
        return self.embed_pixels(np.stack([resize_rgb(im.convert("RGB"), self.cfg.image_size) for im in images]),
                                 for_index)

    def embed_bytes(self, blobs: Sequence[bytes], for_index: bool = False) -> np.ndarray:
        """Decode and embed encoded images (as queries, or `for_index`); raises ImageDecodeError on
        the first bad one."""
        return self.embed_pixels(np.stack([self.prepare(b) for b in blobs]), for_index)
