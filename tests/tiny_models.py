"""Tiny random models with weights drawn from numpy (the same on every machine and torch version), and small
asymmetric images (so that a mirror changes the embedding): for the embedding-pipeline and wrapper tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn


def _weights(seed: int, *shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32))


def _transform(size: int) -> T.Compose:
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])


class TinyImageTower(nn.Module):
    """An asymmetric 3x3 convolution, then a 4x4 grid pooled and projected: position-sensitive features."""

    def __init__(self, size: int = 32, seed: int = 0, dim: int = 12) -> None:
        super().__init__()
        self.image_size, self.seed, self.output_dim = size, seed, dim
        self.conv = nn.Parameter(_weights(seed, 4, 3, 3, 3), requires_grad=False)
        self.proj = nn.Parameter(_weights(seed + 1, 4 * 16, dim), requires_grad=False)

    def transform(self) -> T.Compose:
        return _transform(self.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(images.contiguous(), self.conv, padding=1))
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj

    def fingerprint(self) -> str:
        return f"tiny-image-{self.image_size}-{self.seed}"


class TinyTextTower(nn.Module):
    """A caption as the mean of random character vectors (character codes modulo 64)."""

    def __init__(self, seed: int = 10, dim: int = 10) -> None:
        super().__init__()
        self.seed, self.output_dim = seed, dim
        self.table = nn.Parameter(_weights(seed, 64, dim), requires_grad=False)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.table[[ord(c) % 64 for c in t]].mean(0) for t in texts])

    def fingerprint(self) -> str:
        return f"tiny-text-{self.seed}"


class TinyTowerModel(nn.Module):
    """A :class:`~cliplab.models.base.TowerModel`: linear heads over tiny frozen towers."""

    def __init__(self, image_tower: TinyImageTower, text_tower: TinyTextTower, seed: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.image_tower, self.text_tower, self.seed = image_tower, text_tower, seed
        self.image_head = nn.Parameter(_weights(seed, image_tower.output_dim, dim), requires_grad=False)
        self.text_head = nn.Parameter(_weights(seed + 1, text_tower.output_dim, dim), requires_grad=False)

    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = features.float() @ self.image_head
        return F.normalize(z, dim=-1) if normalize else z

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = features.float() @ self.text_head
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_image(self.image_tower(images), normalize)

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        return self.project_text(self.text_tower.encode(list(texts)), normalize)

    def preprocess(self) -> T.Compose:
        return self.image_tower.transform()

    def fingerprint(self) -> str:
        return f"tiny-towers-{self.image_tower.fingerprint()}-{self.text_tower.fingerprint()}-{self.seed}"


class TinyClip(nn.Module):
    """An :class:`~cliplab.models.base.EmbeddingModel` without frozen towers (embedded end to end, like a CLIP)."""

    def __init__(self, size: int = 24, seed: int = 30) -> None:
        super().__init__()
        self.image = TinyImageTower(size, seed, dim=8)
        self.text = TinyTextTower(seed + 5, dim=8)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.image(images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        z = self.text.encode(list(texts))
        return F.normalize(z, dim=-1) if normalize else z

    def preprocess(self) -> T.Compose:
        return self.image.transform()

    def fingerprint(self) -> str:
        return f"tiny-clip-{self.image.fingerprint()}"


def tiny_models() -> dict[str, nn.Module]:
    """``T`` and ``T2`` (heads over the same towers, 32 px), ``C`` (end to end, 24 px)."""
    image, text = TinyImageTower(32, 0), TinyTextTower(10)
    return {"T": TinyTowerModel(image, text, 20).eval(), "T2": TinyTowerModel(image, text, 40).eval(),
            "C": TinyClip(24, 30).eval()}


def tiny_images(folder: Path, n: int = 3) -> list[Path]:
    """``n`` small non-square PNGs of random noise (their mirrors differ) and one unreadable ``broken.png``
    (returned last)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        path = folder / f"noise{i}.png"
        Image.fromarray(rng.integers(0, 256, (30 + 4 * i, 44, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    broken = folder / "broken.png"
    broken.write_bytes(b"not an image")
    return paths + [broken]


def tiny_captions(folder: Path) -> Path:
    """A caption CSV (split test) over :func:`tiny_images`, the unreadable image included."""
    paths = tiny_images(folder / "images")
    out = folder / "captions.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        for i, p in enumerate(paths):
            w.writerow([f"images/{p.name}", f"picture number {i}", "test"])
            w.writerow([f"images/{p.name}", f"noise {'x' * i} again", "test"])
    return out
