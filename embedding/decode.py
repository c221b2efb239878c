"""Decoding of untrusted image bytes into RGB pixels.

Uploads come in every mode PIL knows; the model wants 8-bit RGB. Limits are checked on the
header before pixel data is decoded, so a decompression bomb costs nothing.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own bomb guard is a process-wide global; we check sizes explicitly instead.
Image.MAX_IMAGE_PIXELS = None
# Formats an upload may be in. Containers such as ICNS or ICO can hold an inner image far larger
# than their header says, so they are refused before any pixel is decoded. (JPEG includes MPO, the
# multi-picture JPEG of cameras.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image. `code` is a stable machine-readable reason."""

    code = "invalid_image"


class ImageTooLargeError(ImageDecodeError):
    """An image over the byte or pixel limit."""

    code = "image_too_large"


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, draft: Optional[int] = None) -> Image.Image:
    """Decode bytes into an upright 8-bit RGB PIL image.

    Applies EXIF orientation, takes the first frame of animations, flattens alpha onto white and
    maps grayscale, palette, CMYK and 16-bit modes to RGB. Raises ImageTooLargeError over the
    limits and ImageDecodeError for anything that is not a complete image. With `draft`, a JPEG
    decodes at the smallest of 1/2, 1/4 or 1/8 scale that still covers draft x draft (scaling in
    the DCT: a fraction of the time and memory of a full decode for a large photo). The upright
    size of the full image is in `info["full_size"]` either way.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty body: expected image bytes")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                img = Image.open(io.BytesIO(data), formats=FORMATS)
            except UnidentifiedImageError:
                raise ImageDecodeError(_refusal(data)) from None
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            if draft and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (draft, draft))
            img.seek(0)
            img.load()
            if img.width * img.height > max_pixels:  # a decoder that grew past its header
                raise ImageTooLargeError(f"image decoded to {img.width}x{img.height} pixels, over the limit of {max_pixels}")
            before = img.size
            img = ImageOps.exif_transpose(img) or img
            turned = img.size != before  # a 90 or 270 degree orientation swaps the sides
            out = to_rgb(img)
            out.info["full_size"] = (h, w) if turned else (w, h)
            return out
    except (ImageDecodeError, MemoryError):  # MemoryError is the server's, not the upload's
        raise
    except Exception as e:  # Pillow's decoders raise more than OSError: a retyped TIFF tag gives TypeError
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e


def _refusal(data: bytes) -> str:
    """Why bytes were refused: a known format that is not accepted, or no image at all."""
    try:
        fmt = Image.open(io.BytesIO(data)).format  # reads the header only
    except Exception:
        return "not a recognised image format"
    return f"format {fmt} is not accepted: send {', '.join(FORMATS)}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, flattening transparency onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: rescale the real range to 0..255 rather than clipping, in the
        # mode's own width and a band of rows at a time (float64 copies of the whole frame cost
        # 16 bytes a pixel: 640 MB at a 40 Mpx limit).
        w, h = img.size
        lo, hi = (float(v) for v in img.getextrema())
        out = np.zeros((h, w), np.uint8)
        if hi > lo:
            scale, band = np.float32(255.0 / (hi - lo)), max(1, (1 << 20) // max(1, w))
            for r in range(0, h, band):
                part = np.array(img.crop((0, r, w, min(h, r + band))), dtype=np.float32)
                part -= np.float32(lo)
                part *= scale
                out[r : r + band] = np.clip(part, 0, 255, out=part)
        return Image.fromarray(out, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def resize_rgb(img: Image.Image, size: int) -> np.ndarray:
    """Resize to size x size (whole frame, no crop, so crops of an image stay near it) as uint8 HxWx3."""
    return np.asarray(img.resize((size, size), Image.BILINEAR, reducing_gap=3.0), dtype=np.uint8)


def centre_crops(pixels: np.ndarray, fraction: float) -> np.ndarray:
    """The centre `fraction` of each side of (N, S, S, 3) uint8 pixels, enlarged back to S x S."""
    size = pixels.shape[1]
    side = max(1, round(size * fraction))
    lo = (size - side) // 2
    return np.stack([np.asarray(Image.fromarray(p[lo : lo + side, lo : lo + side]).resize((size, size), Image.BILINEAR))
                     for p in pixels])
