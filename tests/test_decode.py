"""Decoding real-world uploads: modes, orientation, animation, limits, corrupt files."""
import io

import numpy as np
import pytest
from PIL import Image

from embedding.decode import ImageDecodeError, ImageTooLargeError, decode_image

LIMITS = dict(max_bytes=5_000_000, max_pixels=4_000_000)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP"), ("1", "BMP")],
)
def test_every_mode_becomes_rgb(mode, fmt):
    img = Image.new("RGB", (40, 30), (200, 30, 60)).convert(mode)
    out = decode_image(encode(img, fmt), **LIMITS)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_16bit_grayscale_keeps_contrast():
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(a), "PNG"), **LIMITS))
    assert out.min() == 0 and out.max() == 255


def test_transparent_pixels_flatten_to_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(img, "PNG"), **LIMITS)).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), **LIMITS)
    assert out.size == out.info["full_size"] == (20, 60)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(decode_image(data, **LIMITS))[0, 0]
    assert px[0] > 200 and px[1] < 50


def test_pixel_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (3000, 3000)), "PNG")  # compresses to a few KB
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(data, max_bytes=10**7, max_pixels=1_000_000)


def test_byte_limit():
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(b"x" * 101, max_bytes=100, max_pixels=10)


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, **LIMITS)


def test_truncated_jpeg_is_a_decode_error():
    data = encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_a_container_format_is_refused_before_its_inner_image_decodes():
    """An ICNS whose header says 128x128 around an 8000x8000 PNG: 62 KB that Pillow would inflate
    to 64 MB before noticing. Only plain image formats are opened."""
    import struct

    inner = encode(Image.new("L", (8000, 8000)), "PNG")
    entry = b"ic07" + struct.pack(">I", 8 + len(inner)) + inner
    data = b"icns" + struct.pack(">I", 8 + len(entry)) + entry
    with pytest.raises(ImageDecodeError, match="format ICNS is not accepted"):
        decode_image(data, **LIMITS)
    with pytest.raises(ImageDecodeError, match="format ICO is not accepted"):
        decode_image(encode(Image.new("RGB", (32, 32)), "ICO"), **LIMITS)


def test_a_large_jpeg_decodes_at_the_scale_the_model_needs():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    photo = encode(Image.fromarray(small).resize((4000, 3000), Image.BILINEAR), "JPEG", quality=90)
    full = decode_image(photo, **{**LIMITS, "max_pixels": 20_000_000})
    fast = decode_image(photo, **{**LIMITS, "max_pixels": 20_000_000}, draft=224)
    assert full.size == (4000, 3000) and fast.size == (500, 375)  # 1/8: the smallest that covers 224
    assert fast.info["full_size"] == full.info["full_size"] == (4000, 3000)
    a = np.asarray(full.resize((224, 224), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    b = np.asarray(fast.resize((224, 224), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    assert np.abs(a - b).mean() < 3  # the same picture for the model


# ------------------------------------------------------------ malformed files of every accepted format

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def _sample(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)), fmt)


def _tiff_with_strip_offsets_of_type(typ: int) -> bytes:
    """A TIFF whose StripOffsets tag (273) is re-typed (5: RATIONAL, 2: ASCII, ...): PIL's decoder
    once raised TypeError on it ('IFDRational' object cannot be interpreted as an integer)."""
    import struct

    b = bytearray(_sample("TIFF"))
    ifd = struct.unpack_from("<I", b, 4)[0]
    for e in range(struct.unpack_from("<H", b, ifd)[0]):
        pos = ifd + 2 + 12 * e
        if struct.unpack_from("<H", b, pos)[0] == 273:
            struct.pack_into("<HII", b, pos + 2, typ, 1, 8)
    return bytes(b)


def _malformed():
    for fmt in FORMATS:
        data = _sample(fmt)
        yield f"{fmt}-truncated", data[: len(data) // 2]
        yield f"{fmt}-header-only", data[:16]
        yield f"{fmt}-bad-header", data[:4] + bytes(8) + data[12:]
        yield f"{fmt}-garbage-body", data[:32] + bytes(range(256)) * 4
    for typ in (5, 10, 11, 12, 2, 7):
        yield f"TIFF-strip-offsets-type-{typ}", _tiff_with_strip_offsets_of_type(typ)


@pytest.mark.parametrize("name,data", list(_malformed()), ids=[n for n, _ in _malformed()])
def test_a_malformed_file_is_a_decode_error_or_an_image(name, data):
    """Whatever the decoder meets inside, the upload is refused as a bad image (400) or decoded:
    never another exception (a 500, or an aborted verification)."""
    try:
        assert decode_image(data, **LIMITS).mode == "RGB"
    except ImageDecodeError as e:
        assert str(e)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_bytes_are_a_decode_error_or_an_image(fmt):
    """A bounded, seeded fuzz: 1,500 copies of one file per format with 1-5 bytes changed."""
    rng, base = np.random.default_rng(FORMATS.index(fmt)), _sample(fmt)
    for _ in range(1500):
        b = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        try:
            decode_image(bytes(b), **LIMITS)
        except ImageDecodeError:
            pass


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_a_deep_image_decodes_within_a_few_bytes_per_pixel(mode):
    """A 2000x2000 16-bit (or 32-bit, or float) image: converted in its own width, a band of rows
    at a time, not through float64 copies of the whole frame (16 B/pixel, 640 MB at the 40 Mpx
    limit, from an all-zero PNG of ~80 KB)."""
    import tracemalloc

    w = h = 2000
    ramp = np.tile(np.linspace(0, 60000, w, dtype=np.float32), (h, 1))
    img = Image.fromarray(ramp.astype(np.uint16)) if mode == "I;16" else Image.fromarray(ramp).convert(mode)
    assert img.mode == mode
    data = encode(img, "PNG" if mode == "I;16" else "TIFF")
    limits = dict(max_bytes=100_000_000, max_pixels=40_000_000)
    tracemalloc.start()
    try:
        out = decode_image(data, **limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * w * h, f"{peak / (w * h):.1f} bytes per pixel"
    a = np.asarray(out)
    assert a.shape == (h, w, 3) and a[:, 0].max() == 0 and a[:, -1].min() == 255  # the range still spans 0..255
