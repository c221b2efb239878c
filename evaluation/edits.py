"""Upload-like edits of an image, for near-duplicate robustness checks."""
from __future__ import annotations

import io
import math

import numpy as np

from PIL import Image

# Heavy edits: crop to 50% of the area, 15 degree rotation, strong colour change, JPEG quality 20.
HEAVY_EDITS = {"crop": (1 - 0.5 ** 0.5) / 2, "rotate": 15.0, "hue": 0.25, "saturation": 1.8, "scale": 0.6,
               "quality": 20}


def edited_copy(data: bytes, *, scale: float = 0.6, quality: int = 60, crop: float = 0.0, rotate: float = 0.0,
                hue: float = 0.0, saturation: float = 1.0) -> bytes:
    """Optional border crop (fraction per side), rotation (degrees, corners cropped off), hue shift
    (fraction of the colour wheel) and saturation factor, resize by `scale`, JPEG at `quality`."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if crop:
        dx, dy = int(w * crop), int(h * crop)
        img = img.crop((dx, dy, w - dx, h - dy))
        w, h = img.size
    if rotate:
        img = img.rotate(rotate, resample=Image.BILINEAR, expand=False)
        # keep the largest centred box free of the black corners
        a = abs(math.radians(rotate))
        k = 1.0 / (math.cos(a) + math.sin(a) * max(w, h) / min(w, h))
        cw, ch = int(w * k), int(h * k)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))
        w, h = img.size
    if hue or saturation != 1.0:
        hsv = np.asarray(img.convert("HSV")).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(round(hue * 256))) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        img = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    img = img.resize((max(16, int(w * scale)), max(16, int(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_duplicate_recall(embedder, originals: list[bytes], **edit) -> float:
    """Rank-1 rate at which an edited copy's nearest original (exact cosine) is its own."""
    x = embedder.embed_bytes(originals)
    q = embedder.embed_bytes([edited_copy(d, **edit) for d in originals])
    return float((np.argmax(q @ x.T, axis=1) == np.arange(len(originals))).mean())
