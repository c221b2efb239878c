"""A demo corpus with no download: scikit-image's bundled photos plus generated variants of them."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from embedding.decode import to_rgb

# Files inside skimage/data that ship with the wheel (others would need a download).
SAMPLES = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_RGB.png",
    "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
    "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg", "text.png",
]


def sample_images() -> dict[str, Image.Image]:
    """The bundled scikit-image photos as RGB images, by stem name."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    out = {}
    for name in SAMPLES:
        path = root / name
        if path.exists():
            with Image.open(path) as im:
                im.load()
                out[Path(name).stem] = to_rgb(im).copy()
    return out


def warm(img: Image.Image) -> Image.Image:
    """A warm colour cast: red up, blue down. Unlike a saturation boost it also changes grey photos,
    whose warm copy would otherwise be byte-identical to the original and tie with it in search."""
    r, g, b = img.split()
    return Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.15) + 12)), g, b.point(lambda v: int(v * 0.8))))


def variants(img: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    """Edited copies a user might upload: crop, mirror, colour change, rotation, re-encode."""
    w, h = img.size
    cw, ch = int(w * 0.7), int(h * 0.7)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    small = img.resize((max(32, w // 3), max(32, h // 3)))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=40)
    return {
        "crop": img.crop((x, y, x + cw, y + ch)),
        "mirror": ImageOps.mirror(img),
        "warm": warm(img),
        "rot10": img.rotate(10, expand=False, fillcolor=(255, 255, 255)),
        "jpeg40": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
    }


def write_demo_images(out_dir: str, with_variants: bool = True, seed: int = 0) -> int:
    """Write the demo corpus as JPEGs under out_dir/<sample>/; returns the number of files."""
    rng = np.random.default_rng(seed)
    count = 0
    for stem, img in sample_images().items():
        d = os.path.join(out_dir, stem)
        os.makedirs(d, exist_ok=True)
        items = {"original": img, **(variants(img, rng) if with_variants else {})}
        for kind, im in items.items():
            im.save(os.path.join(d, f"{kind}.jpg"), "JPEG", quality=90)
            count += 1
    return count
