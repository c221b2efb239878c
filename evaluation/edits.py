"""Upload-like edits of an image, for near-duplicate robustness checks."""
from __future__ import annotations

import io

from PIL import Image


def edited_copy(data: bytes, *, scale: float = 0.6, quality: int = 60, crop: float = 0.0) -> bytes:
    """Optional border crop (fraction per side), resize by `scale`, JPEG recompression at `quality`."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if crop:
        dx, dy = int(w * crop), int(h * crop)
        img = img.crop((dx, dy, w - dx, h - dy))
        w, h = img.size
    img = img.resize((max(16, int(w * scale)), max(16, int(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_duplicate_recall(embedder, originals: list[bytes], **edit) -> float:
    """Rank-1 rate at which an edited copy's nearest original (exact cosine) is its own."""
    import numpy as np

    x = embedder.embed_bytes(originals)
    q = embedder.embed_bytes([edited_copy(d, **edit) for d in originals])
    return float((np.argmax(q @ x.T, axis=1) == np.arange(len(originals))).mean())
