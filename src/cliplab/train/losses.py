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


class TripletLoss(nn.Module):
    """Bidirectional margin ranking loss (VSE++): ``relu(margin - s(pos) + s(neg))`` per anchor, both directions.

    ``mining``: ``hardest`` (the most similar in-batch negative), ``semihard`` (the most similar negative
    that still scores below the positive; if none does, the least similar negative, as in FaceNet/TF
    Addons) or ``all`` (mean over every negative). Similarities are dot products of the normalised
    embeddings; the temperature is not used.
    """

    def __init__(self, margin: float = 0.2, mining: str = "hardest") -> None:
        super().__init__()
        if mining not in ("hardest", "semihard", "all"):
            raise ValueError(f"mining must be hardest, semihard or all, not {mining!r}")
        self.margin, self.mining = margin, mining

    def _direction(self, sim: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        pos = sim.diagonal()[:, None]
        if self.mining == "all":
            hinge = (self.margin - pos + sim).clamp(min=0) * negative
            return hinge.sum(1) / negative.sum(1).clamp(min=1)
        if self.mining == "hardest":
            neg = sim.masked_fill(~negative, float("-inf")).amax(1, keepdim=True)
        else:
            below = negative & (sim < pos)
            semi = sim.masked_fill(~below, float("-inf")).amax(1, keepdim=True)
            easiest = sim.masked_fill(~negative, float("inf")).amin(1, keepdim=True)
            neg = torch.where(below.any(1, keepdim=True), semi, easiest)
        has_neg = negative.any(1)
        return ((self.margin - pos + neg).clamp(min=0).squeeze(1)) * has_neg

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | None = None,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        sim = image_emb @ text_emb.T
        batch = sim.shape[0]
        negative = ~torch.eye(batch, dtype=torch.bool, device=sim.device)
        mask = same_image_mask(image_ids, batch, sim.device)
        if mask is not None:
            negative &= ~mask
        return (self._direction(sim, negative).mean() + self._direction(sim.T, negative.T).mean()) / 2


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) over the 2B embeddings of a batch: each item's positive is its pair in the other
    modality; every other item of either modality is a negative, except ones of the same image."""

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = image_emb.shape[0]
        z = torch.cat([image_emb, text_emb])
        logits = logit_scale * z @ z.T
        ids = torch.arange(batch, device=z.device) if image_ids is None else image_ids
        ids2 = torch.cat([ids, ids])
        idx = torch.arange(2 * batch, device=z.device)
        partner = torch.cat([idx[batch:], idx[:batch]])
        excluded = ids2[:, None] == ids2[None, :]  # itself and same-image items ...
        excluded[idx, partner] = False  # ... except the positive
        logits = logits.masked_fill(excluded, float("-inf"))
        return F.cross_entropy(logits, partner)


class SigmoidLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): every image-text pair is a binary match/non-match decision.

    Pairs of the same image are matches. Has its own learnable bias (init -10, as in the paper); the
    scale is the model's ``logit_scale``. Normalised by the batch size, as in SigLIP.
    """

    def __init__(self, init_bias: float = -10.0) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = image_emb.shape[0]
        logits = logit_scale * image_emb @ text_emb.T + self.bias
        if image_ids is None:
            match = torch.eye(batch, dtype=torch.bool, device=logits.device)
        else:
            match = image_ids[:, None] == image_ids[None, :]
        signs = match.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum() / batch


LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCELoss, "triplet": TripletLoss, "ntxent": NTXentLoss,
                                      "sigmoid": SigmoidLoss}


def create_loss(name: str, **kwargs) -> nn.Module:
    from cliplab.errors import ConfigError

    key = name.lower().replace("-", "").replace("_", "")
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    try:
        return LOSSES[key](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss {name!r}: {exc}") from None
