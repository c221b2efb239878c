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


def koleo_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo spreading regulariser (Sablayrolles et al. 2019, used for copy detection by SSCD):
    minus the mean log distance from each embedding to its nearest other one in the batch. It
    pushes the embeddings of different images apart over the sphere, so the neighbourhood of a
    copy holds its original rather than a crowd of look-alikes."""
    z = F.normalize(z.float(), dim=-1)
    d = torch.cdist(z, z) + torch.eye(len(z), device=z.device) * 4.0  # no unit vectors are 4 apart: self excluded
    return -torch.log(d.min(dim=1).values + eps).mean()
