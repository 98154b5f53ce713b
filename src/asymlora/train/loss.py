"""The training loss: per-token next-token cross entropy over supervised positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token cross entropy (B, T-1), 0 where the label is -100, and the mask of the
    supervised positions. The training loss is its sum over supervised tokens divided by their count."""
    logits = logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="none").view(targets.shape)
    return token_loss, targets != -100
