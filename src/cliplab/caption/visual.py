"""Visual tokens for captioning: the image tower's spatial grid (pooled to g x g) and its pooled feature,
computed once per image through the feature store (like every frozen-tower feature).

For EfficientNet-Lite0 the grid is the last block's 7x7x320 map (before the 1x1 head conv, which the
mapping network subsumes), average-pooled to g x g; the global token is the tower's 1280-d pooled feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cliplab.embed.cache import FeatureCache
from cliplab.embed.extract import embed_images
from cliplab.errors import ConfigError
from cliplab.models.image_tower import ImageTower, ImageTowerConfig
from cliplab.models.stages import Stages
from cliplab.utils import sha256_text


class GridTower(nn.Module):
    """An image tower's spatial feature map before its head, pooled to ``grid x grid`` and flattened to
    ``[N, grid * grid * C]`` (what ``embed_images`` caches; ONNX-exportable)."""

    onnx_exportable = True

    def __init__(self, tower: ImageTower, grid: int) -> None:
        super().__init__()
        stages = Stages(tower.stages())
        if len(stages) < 2 or stages[len(stages) - 1].name != "head":
            raise ConfigError(f"image tower {tower.config.arch}: no spatial feature map before its head "
                              "(captioning needs an EfficientNet/MobileNet-style tower)")
        for param in tower.parameters():  # frozen: visual tokens are computed once and cached
            param.requires_grad_(False)
        self.tower, self.grid = tower, int(grid)
        self.parts = nn.ModuleList(m for st in stages.stages[:-1] for m in st.modules)
        self._stages = stages
        self.image_size = tower.image_size
        with torch.inference_mode():
            self.channels = int(self._stages.run(torch.zeros(1, 3, 64, 64), 0, len(stages) - 1).shape[1])

    @property
    def output_dim(self) -> int:
        return self.grid * self.grid * self.channels

    def transform(self):
        return self.tower.transform()

    def fingerprint(self) -> str:
        return sha256_text("grid", self.tower.fingerprint(), str(self.grid))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self._stages.run(images, 0, len(self._stages) - 1)  # [N, C, h, w]
        return adaptive_pool_cells(fmap, self.grid).flatten(1)  # [N, g*g*C], cell-major


class VisualTokenTower(GridTower):
    """Grid and pooled features in one pass: ``[N, grid * grid * C + D]`` (the grid cells, then the tower's
    pooled feature, computed from the same feature map by the head; equal to running the tower)."""

    @property
    def output_dim(self) -> int:
        return self.grid * self.grid * self.channels + self.tower.output_dim

    def fingerprint(self) -> str:
        return sha256_text("visual-tokens", self.tower.fingerprint(), str(self.grid))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        last = len(self._stages) - 1
        fmap = self._stages.run(images, 0, last)
        pooled = self._stages.run(fmap, last, last + 1)
        return torch.cat([adaptive_pool_cells(fmap, self.grid).flatten(1), pooled.flatten(1)], dim=1)


def adaptive_pool_cells(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` written with static slices (``[N, g*g, C]``), so that ONNX exports it also when
    ``grid`` does not divide the map size (7 -> 4)."""
    h, w = int(fmap.shape[2]), int(fmap.shape[3])
    cells = []
    for i in range(grid):
        for j in range(grid):
            r0, r1 = (i * h) // grid, -(-((i + 1) * h) // grid)
            c0, c1 = (j * w) // grid, -(-((j + 1) * w) // grid)
            cells.append(fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3)))
    return torch.stack(cells, dim=1)


def caption_image_tower(image: dict, image_model: str | None = None) -> ImageTower:
    """The image tower that gives a captioner its visual tokens: the pretrained tower ``image`` describes, or
    the image tower of the cliplab model ``image_model`` (e.g. a run whose last blocks were tuned on captions)."""
    from cliplab.models.factory import load_model, pretrained_tower

    if not image_model:
        return pretrained_tower(ImageTowerConfig.from_dict(image))
    model = load_model(image_model)
    tower = getattr(model, "image_tower", None)
    if not isinstance(tower, ImageTower):
        raise ConfigError(f"model.image_model: {image_model} has no cliplab image tower ({type(model).__name__}); "
                          "give a two-tower run or model folder")
    for param in tower.parameters():
        param.requires_grad_(False)
    return tower.eval()


def tower_weights_id(tower: ImageTower) -> str:
    """Digest of an image tower's weights: its base weights, plus the tuned tensors loaded on top of them."""
    return f"{tower.weights_id}+{tower.weights_delta}" if tower.weights_delta else tower.weights_id


@dataclass
class VisualFeatures:
    grid: np.ndarray  # [N, g*g, C]
    pooled: np.ndarray  # [N, D]
    valid: np.ndarray  # [N]
    errors: dict[int, str]


def visual_features(tower: ImageTower, images, grid: int, *, cache: FeatureCache, device="cpu", progress: bool = True,
                    on_error: str = "raise", desc: str = "images", backend: str = "auto") -> VisualFeatures:
    """Grid and pooled features of every image, from one pass of the tower (cached; bad images raise or are
    marked invalid)."""
    vt = VisualTokenTower(tower, grid)
    out = embed_images(vt, images, cache=cache, device=device, progress=progress, on_error=on_error,
                       desc=f"{desc} (grid {grid}x{grid} + pooled)", backend=backend)
    features = np.asarray(out.features)
    cells = grid * grid * vt.channels
    return VisualFeatures(features[:, :cells].reshape(len(features), grid * grid, vt.channels),
                          np.ascontiguousarray(features[:, cells:]), np.asarray(out.valid), dict(out.errors))
