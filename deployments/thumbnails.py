"""Thumbnails of indexed images for the web page: read from the folders the index was built from
(indexing.storage.read_source), never from anywhere a writer's `uri` points, scaled down and
re-encoded as JPEG. Plain PIL, importable and testable without Ray."""
from __future__ import annotations

import hashlib
import io

from embedding.decode import ImageDecodeError, decode_image
from indexing import storage

MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 32, 1024, 256
JPEG_QUALITY = 85


class NoThumbnail(Exception):
    """The image is held but no thumbnail can be made of it (its file is outside the index's
    source folders, gone, changed, or not an image any more)."""


def make_thumbnail(uri: str, roots: list[str], size: int, *, sha256: str = "", max_bytes: int, max_pixels: int) -> bytes:
    """JPEG bytes of the image at `uri`, its longer side scaled down to `size` (never up).
    Raises NoThumbnail when the uri is outside `roots`, its file cannot be read or decoded, or
    (given the indexed `sha256`) the file no longer holds the bytes that were indexed."""
    matches = (lambda data: hashlib.sha256(data).hexdigest() == sha256) if sha256 else None
    try:
        data = storage.read_source(uri, roots, matches)
        # The same limits as an upload: a file swapped for a decompression bomb costs nothing.
        img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=size)
    except storage.SourceUnavailable as e:
        raise NoThumbnail(str(e)) from None
    except ImageDecodeError as e:
        raise NoThumbnail(f"the image file cannot be decoded: {e}") from None
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()

