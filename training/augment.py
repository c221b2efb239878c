"""Random views of an image for contrastive training: two views of one image are a positive pair.

The view recipe follows SimCLR (random resized crop, flip, colour jitter, grey, blur) plus the
edits a re-upload goes through in practice: small rotations and JPEG recompression."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2


def source_size(size: int) -> int:
    """Side of the square images views are cut from: 8/7 of the model input, as ImageNet's
    256 -> 224 crops, so a full-area crop still downsamples."""
    return round(size * 8 / 7)


def view_transform(size: int, crop_scale_min: float = 0.25, hue: float = 0.1) -> v2.Compose:
    """uint8 (3, H, W) tensor -> a random uint8 (3, size, size) view."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, hue)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.RandomRotation(20)], p=0.3),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomApply([v2.JPEG((20, 95))], p=0.5),
    ])


def views(pixels, indices, transform) -> torch.Tensor:
    """One random view per index of a (N, H, W, 3) uint8 array, as a (B, size, size, 3) uint8 tensor."""
    out = [transform(torch.from_numpy(np.array(pixels[i])).permute(2, 0, 1)) for i in indices]  # Ray hands out read-only arrays
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()
