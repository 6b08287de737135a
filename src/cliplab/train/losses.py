"""Contrastive losses, one class each (written here, tested against brute-force references).

Every loss takes L2-normalised ``image_emb [B, d]``, ``text_emb [B, d]`` where row i of each is a
positive pair, and optional ``image_ids [B]``: two rows with the same image id are never treated as
each other's negatives (the same image twice in a batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_image_mask(image_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """``[B, B]`` True where row and column share an image but are different rows (not negatives)."""
    if image_ids is None:
        return None
    same = image_ids[:, None] == image_ids[None, :]
    same &= ~torch.eye(batch, dtype=torch.bool, device=device)
    return same if same.any() else None


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (the CLIP loss): cross-entropy image->text and text->image, averaged."""

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = logit_scale * image_emb @ text_emb.T
        batch = logits.shape[0]
        mask = same_image_mask(image_ids, batch, logits.device)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        labels = torch.arange(batch, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCELoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    from cliplab.errors import ConfigError

    key = name.lower().replace("-", "").replace("_", "")
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[key](**kwargs)
