"""What a cliplab model offers, as ``typing.Protocol`` classes (checked with ``isinstance``).

- :class:`EmbeddingModel`: every model (TwoTower, ConSE, a CLIP from ``load_clip``): ``encode_image`` /
  ``encode_text`` -> ``[N, d]``, its eval ``preprocess`` and a ``fingerprint`` naming weights + settings
  (the feature-cache key part; a model without one is never cached).
- :class:`TowerModel`: models whose embeddings are heads over frozen pretrained towers (TwoTower, ConSE):
  datasets are embedded from cached tower features, only the heads run per evaluation.
- :class:`TrainableModel`: models the trainer fits (TwoTower, CLIP): stages per side, what trains, and
  strict save / reload of the trained tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from cliplab.models.stages import Stages


@runtime_checkable
class EmbeddingModel(Protocol):
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor: ...

    def encode_text(self, texts: Any, normalize: bool = True) -> torch.Tensor: ...

    def preprocess(self) -> Callable: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class TowerModel(EmbeddingModel, Protocol):
    image_tower: torch.nn.Module
    text_tower: torch.nn.Module

    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor: ...

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor: ...


@runtime_checkable
class TrainableModel(EmbeddingModel, Protocol):
    logit_scale: torch.Tensor

    def image_stages(self) -> Stages: ...

    def text_stages(self) -> Stages: ...

    def set_trainable(self, mode: str) -> Any: ...

    def tune_towers(self, image: Any, text: Any) -> dict: ...

    def side_fingerprints(self) -> tuple[str, str]: ...

    def save(self, directory: str | Path) -> Path: ...

    def load_trained(self, directory: str | Path) -> None: ...


def logit_scale_value(model: object, default: float = 100.0) -> float:
    """A model's softmax scale ``exp(logit_scale)`` as a float; ``default`` (CLIP's usual 100) without one."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else default
