"""Image-text retrieval metrics, computed in blocks so 5k images x 25k captions fits in bounded memory.

Conventions (as in the CLIP paper and CLIP_benchmark):
- text->image: each caption has one correct image;
- image->text: a hit at K when *any* of the image's captions is in the top K; the rank is that of
  its best-placed caption.
Ties are broken against the model: an item scoring equal to the correct one counts as ranked above
it, so a model that gives every pair the same score gets the worst ranks, not the best.
Non-finite embeddings (NaN, inf) are refused with :class:`~cliplab.errors.NumericError`: with them
every comparison is false and a NaN row would otherwise rank first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cliplab.errors import NumericError

DEFAULT_KS = (1, 5, 10)


def check_finite(x: torch.Tensor | np.ndarray, what: str) -> None:
    """Raise :class:`NumericError` naming ``what`` and the first bad rows when ``x`` has NaN or inf."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(1)).flatten()
        rows = ", ".join(str(int(i)) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise NumericError(f"{what} contain NaN or infinite values ({len(bad)} of {len(t)} rows: {rows}); "
                           "refusing to score them")


def first_correct_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores [Q, N]``: the rank (1 = best) of its best-scored correct item (``correct [Q, N]``,
    at least one per row). Ties count against the model: every other item scoring at least as high ranks
    above. The one rank rule of cliplab (metrics, galleries, reports)."""
    best = scores.masked_fill(~correct, float("-inf")).amax(1, keepdim=True)
    return ((scores >= best) & ~correct).sum(1) + 1


@dataclass
class RetrievalResult:
    """Per-query ranks (1 = best) and the summary metrics (recalls in %)."""

    t2i_ranks: np.ndarray
    i2t_ranks: np.ndarray
    ks: tuple[int, ...] = DEFAULT_KS
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = summarize_ranks(self.t2i_ranks, self.i2t_ranks, self.ks)


def _stats(ranks: np.ndarray, prefix: str, ks) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"{prefix}_r{k}": float((ranks <= k).mean() * 100.0) for k in ks}
    out[f"{prefix}_mrr"] = float((1.0 / ranks).mean())
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out[f"{prefix}_mean_rank"] = float(ranks.mean())
    return out


def summarize_ranks(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    metrics = {**_stats(t2i_ranks, "t2i", ks), **_stats(i2t_ranks, "i2t", ks)}
    metrics["rsum"] = float(sum(metrics[f"t2i_r{k}"] + metrics[f"i2t_r{k}"] for k in ks))
    metrics["n_images"] = int(len(i2t_ranks))
    metrics["n_captions"] = int(len(t2i_ranks))
    return metrics


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


@torch.inference_mode()
def retrieval_ranks(image_emb, text_emb, caption_image, *, block_size: int = 512,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the correct item for every caption (text->image) and every image (image->text).

    ``image_emb [Ni, d]`` and ``text_emb [Nc, d]`` are compared by dot product (normalise them first
    for cosine); ``caption_image [Nc]`` gives each caption's image index.
    """
    img = _as_tensor(image_emb).float().to(device)
    txt = _as_tensor(text_emb).float().to(device)
    check_finite(img, "image embeddings")
    check_finite(txt, "caption embeddings")
    owner = _as_tensor(np.asarray(caption_image, dtype=np.int64)).to(device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding sizes differ: images {tuple(img.shape)}, captions {tuple(txt.shape)}")
    if owner.shape[0] != n_txt:
        raise ValueError(f"caption_image has {owner.shape[0]} entries for {n_txt} captions")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError("caption_image refers to an image index out of range")
    counts = torch.bincount(owner, minlength=n_img)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} images have no caption")

    t2i = torch.empty(n_txt, dtype=torch.long, device=device)
    images = torch.arange(n_img, device=device)
    for s in range(0, n_txt, block_size):
        scores = txt[s:s + block_size] @ img.T  # [b, Ni]
        t2i[s:s + block_size] = first_correct_rank(scores, images[None, :] == owner[s:s + block_size, None])

    i2t = torch.empty(n_img, dtype=torch.long, device=device)
    for s in range(0, n_img, block_size):
        scores = img[s:s + block_size] @ txt.T  # [b, Nc]
        rows = torch.arange(s, min(s + block_size, n_img), device=device)
        i2t[s:s + block_size] = first_correct_rank(scores, owner[None, :] == rows[:, None])
    return t2i.cpu().numpy(), i2t.cpu().numpy()


def retrieval_metrics(image_emb, text_emb, caption_image, *, ks=DEFAULT_KS, block_size: int = 512,
                      device: str | torch.device = "cpu") -> RetrievalResult:
    """Recall@K both ways, MRR, median and mean rank; see the module docstring for conventions."""
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image, block_size=block_size, device=device)
    return RetrievalResult(t2i, i2t, tuple(ks))
