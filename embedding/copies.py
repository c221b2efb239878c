"""What makes one image a copy of another: a 64-bit perceptual hash (DCT pHash) per image.

The ranking policy collapses a result into a better one when their hashes differ in few bits. The
hash sees only the picture's coarse luminance layout, so it survives resizing, recompression and
light crops but tells apart two photos of one category, however close a retrieval model puts them.
It is computed from the pixels the model takes (`Embedder.prepare`), so every path that embeds an
image (the build, PUT, a query) hashes exactly the same array.
"""
from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

HASH_BITS = 64


def perceptual_hash(pixels: np.ndarray) -> int:
    """pHash (imagehash.phash: 32x32 grayscale, DCT, 8x8 lowest frequencies above their median) of
    an (H, W, 3) uint8 image, as a signed 64-bit integer (the int64 column and WAL field hold it)."""
    bits = imagehash.phash(Image.fromarray(pixels)).hash.reshape(-1)
    return int(np.packbits(bits).view(">i8")[0])


def hash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits between int64 hashes, broadcast elementwise."""
    # bitwise_count counts the bits of the absolute value of a signed integer: count them unsigned.
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64))


def hash_hex(h: int) -> str:
    """The hash as 16 hex digits, the way the API shows it."""
    return f"{h & (2**64 - 1):016x}"
