"""Turn images and captions into frozen-tower features, through the feature cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cliplab.data.images import ImageFiles, ImageSet
from cliplab.embed.cache import CachedFeatures, FeatureCache
from cliplab.errors import CliplabError
from cliplab.utils import sha256_text


class _Decoded(Dataset):
    """Decoded, preprocessed images; a bad one yields ``ok=False`` and its message instead of raising."""

    def __init__(self, images: ImageSet, start: int, stop: int, transform, size: int) -> None:
        self.images, self.start, self.stop = images, start, stop
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        try:
            return self.transform(self.images.load(self.start + i)), True, ""
        except CliplabError as exc:
            return torch.zeros(3, self.size, self.size), False, str(exc)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@torch.inference_mode()
def embed_images(tower: torch.nn.Module, images: Sequence[Path] | ImageSet, *, cache: FeatureCache | None = None,
                 batch_size: int = 64, num_workers: int | None = None, device: str | torch.device = "cpu",
                 on_error: str = "raise", progress: bool = True, desc: str = "images") -> CachedFeatures:
    """Pooled image-tower features (cached); corrupt/missing images raise or are marked invalid."""
    images = images if isinstance(images, ImageSet) else ImageFiles(images)
    cache = cache or FeatureCache()
    device = torch.device(device)
    tower = tower.eval().to(device)
    if device.type == "cpu":
        tower = tower.to(memory_format=torch.channels_last)
    transform = tower.transform()
    size = tower.image_size
    workers = default_workers() if num_workers is None else num_workers
    key = FeatureCache.key(tower.fingerprint(), images.keys(), extra="image-v1")

    def compute(start: int, stop: int):
        ds = _Decoded(images, start, stop, transform, size)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False)
        feats, valid, errors = [], [], []
        for offset_batch, (batch, ok, messages) in enumerate(loader):
            base = start + offset_batch * batch_size
            for j, (good, msg) in enumerate(zip(ok.tolist(), messages)):
                if not good:
                    if on_error == "raise":
                        raise CliplabError(msg)
                    errors.append(f"{base + j}\t{msg}")
            batch = batch.to(device, non_blocking=True)
            if device.type == "cpu":
                batch = batch.contiguous(memory_format=torch.channels_last)
            feats.append(tower(batch).float().cpu().numpy())
            valid.append(ok.numpy())
        return np.concatenate(feats), np.concatenate(valid), errors

    return cache.get_or_compute("image", key, len(images), compute, desc=desc, progress=progress,
                                meta={"tower": tower.fingerprint(), "n_images": len(images)})


@torch.inference_mode()
def embed_texts(tower: torch.nn.Module, texts: Sequence[str], *, cache: FeatureCache | None = None,
                batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = True,
                desc: str = "captions") -> CachedFeatures:
    """Pooled text-tower features for ``texts`` (cached); batches sorted by length, results in input order."""
    cache = cache or FeatureCache()
    device = torch.device(device)
    tower = tower.eval().to(device)
    key = FeatureCache.key(tower.fingerprint(), [sha256_text(*texts)], extra="text-v1")

    def compute(start: int, stop: int):
        chunk = list(texts[start:stop])
        order = np.argsort([len(t) for t in chunk], kind="stable")
        out = None
        for b in range(0, len(chunk), batch_size):
            idx = order[b:b + batch_size]
            z = tower.encode([chunk[i] for i in idx]).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(chunk), z.shape[1]), dtype=np.float32)
            out[idx] = z
        return out, np.ones(len(chunk), dtype=bool), []

    return cache.get_or_compute("text", key, len(texts), compute, desc=desc, progress=progress,
                                meta={"tower": tower.fingerprint(), "n_texts": len(texts)})
