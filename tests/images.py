"""Test images made from the photos scikit-image ships: no download, no shared data."""
from __future__ import annotations

import io
import os

import numpy as np

from PIL import Image

from indexing.demo import sample_images


# Stochastic textures and repeated patterns: their quadrants are the same picture, not distinct ones.
TEXTURES = {"brick", "grass", "gravel", "chessboard_RGB", "microaneurysms", "cell", "moon", "clock_motion"}


def distinct_images() -> dict[str, Image.Image]:
    """Each bundled photo, and the four quadrants of those that are not textures, as separate images."""
    out = {}
    for stem, img in sample_images().items():
        out[f"{stem}/full"] = img
        if stem in TEXTURES:
            continue
        w, h = img.size
        for qi, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            out[f"{stem}/q{qi}"] = img.crop((x, y, x + w // 2, y + h // 2))
    return out


def jpeg(img: Image.Image) -> bytes:
    """A JPEG of img at the quality write_corpus uses."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def write_corpus(root: str) -> int:
    """Write distinct_images() as JPEGs under root; returns how many."""
    imgs = distinct_images()
    for name, img in imgs.items():
        path = os.path.join(root, f"{name}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path, "JPEG", quality=92)
    return len(imgs)


def picture(seed: int) -> bytes:
    """A distinct synthetic JPEG: a smooth random colour field."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((192, 192), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()
