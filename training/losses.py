"""Contrastive losses with in-batch negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over a batch of embeddings.

    Views with the same label are positives, every other view is a negative. With exactly two
    views per label (two augmentations of one image, or a query and its click) this is SimCLR's
    NT-Xent: for anchor i, -log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) ), averaged over the
    positives p of i and then over anchors that have at least one positive.
    """
    z = F.normalize(z.float(), dim=-1)
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    has_pos = pos.any(dim=1)
    if not has_pos.any():
        raise ValueError("no positive pair in the batch: every label occurs once")
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(dim=1) / pos.sum(dim=1).clamp(min=1)
    return per_anchor[has_pos].mean()
