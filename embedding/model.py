"""The embedding network (backbone -> pool -> optional projection head -> L2 norm) and its files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import ModelConfig
from embedding.backbones import Pool, load_backbone

EXPORT_FORMAT = "imsearch-embedder/1"


class EmbeddingNet(nn.Module):
    """Maps a normalised (B, 3, H, W) batch to L2-normalised (B, D) embeddings."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean", head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone, self.pool, self.head = backbone, Pool(pooling), head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, before the head."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        if self.head is not None:
            z = self.head(z)
        return F.normalize(z.float(), dim=-1)


def to_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 pixels -> the normalised (B, 3, H, W) float batch the network takes."""
    m = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) * 255.0
    return (pixels.permute(0, 3, 1, 2).float() - m) / s


def projection_head(in_dim: int, out_dim: int, hidden_dim: Optional[int] = None) -> nn.Module:
    """Two-layer MLP head as in SimCLR (hidden defaults to in_dim), or one linear layer when
    hidden_dim is 0."""
    if hidden_dim == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def is_export(path: Optional[str]) -> bool:
    """True when `path` is a model file written by `export_model`."""
    if not path or not Path(path).is_file():
        return False
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(blob, dict) and blob.get("format") == EXPORT_FORMAT


def build_model(cfg: ModelConfig) -> EmbeddingNet:
    """Build the network `cfg` describes; an exported trained model restores its head too."""
    if is_export(cfg.weights):
        blob = torch.load(cfg.weights, map_location="cpu", weights_only=True)
        net = EmbeddingNet(load_backbone(blob["backbone"]), blob["pooling"])
        if blob.get("head_dims"):
            net.head = projection_head(*blob["head_dims"])
        net.load_state_dict(blob["state_dict"])
        return net
    return EmbeddingNet(load_backbone(cfg.name, cfg.weights), cfg.pooling)


def export_model(net: EmbeddingNet, backbone_name: str, pooling: str, head_dims: Optional[tuple], path: str) -> None:
    """Save a trained network as one file that `build_model` loads via `model.weights: PATH`."""
    blob = {
        "format": EXPORT_FORMAT,
        "backbone": backbone_name,
        "pooling": pooling,
        "head_dims": list(head_dims) if head_dims else None,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    tmp = f"{path}.tmp"
    torch.save(blob, tmp)
    Path(tmp).replace(path)
