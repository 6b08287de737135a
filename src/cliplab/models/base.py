"""What a cliplab model offers, as ``typing.Protocol`` classes (checked with ``isinstance``).

- :class:`EmbeddingModel`: every model (TwoTower, ConSE, a CLIP from ``load_clip``): ``encode_image`` /
  ``encode_text`` -> ``[N, d]``, its eval ``preprocess`` and a ``fingerprint`` naming weights + settings
  (the feature-cache key part; a model without one is never cached).
- :class:`TowerModel`: models whose embeddings are heads over frozen pretrained towers (TwoTower, ConSE):
  datasets are embedded from cached tower features, only the heads run per evaluation.
- :class:`TrainableModel`: models the trainer fits (TwoTower, CLIP): stages per side, what trains, and
  strict save / reload of the trained tensors.
- :class:`InterpolableModel`: models whose weights WiSE-FT mixes (TwoTower, CLIP).
- :class:`ComposedModel`: models made of other models' embeddings (flip test-time augmentation, score
  ensembles; :mod:`cliplab.models.wrappers`): the embedding pipeline embeds each part under its own towers
  (cached) and the model combines them, at a :data:`LEVELS` level. Each part sees the images through a
  :class:`View` (as given, or mirrored).

What the embedding pipeline (:mod:`cliplab.embed`) runs and caches is a tower:

- :class:`Tower`: ``fingerprint()`` (the feature-cache key part);
- :class:`ImageFeatureTower`: preprocessed images ``[N, 3, S, S]`` -> features ``[N, D]`` (called), its eval
  ``transform()`` and input size ``image_size`` (``ImageTower``, a caption grid, a model's final embeddings);
- :class:`TextFeatureTower`: ``encode(texts)`` -> features ``[N, D]`` (``TextTower``, a model's final
  embeddings);
- optional capabilities: :class:`OnnxExportable` (``onnx_exportable = True``: the ONNX backends may export
  it), :class:`TokenCounting` (``token_lengths(texts)``, for length-sorted batches with least padding),
  :class:`BatchStreamEncoder` (``encode_batches(batches)``, an encoder that pipelines batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from cliplab.data.images import ImageSet, MirroredImages
from cliplab.models.stages import Stages

Level = Literal["features", "raw", "unit"]
LEVELS: tuple[Level, ...] = ("features", "raw", "unit")  # tower features (probes), raw or unit-norm embeddings


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


@runtime_checkable
class InterpolableModel(EmbeddingModel, Protocol):
    def interpolation_state(self) -> dict[str, torch.Tensor]: ...  # the state the keys name

    def interpolation_keys(self) -> list[str]: ...  # what WiSE-FT mixes (of the fine-tuned model)

    def load_interpolated(self, state: dict[str, torch.Tensor], alpha: float) -> None: ...


@dataclass(frozen=True)
class View:
    """How a part of a :class:`ComposedModel` sees the images: as given, or mirrored left-right (image files and
    PIL images are mirrored before preprocessing, a preprocessed batch is flipped along its width)."""

    mirrored: bool = False

    @property
    def tag(self) -> str:
        return " (mirrored)" if self.mirrored else ""

    def images(self, images: ImageSet) -> ImageSet:
        return MirroredImages(images) if self.mirrored else images

    def pil(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.mirrored else image

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flip(images, dims=[-1]) if self.mirrored else images


AS_GIVEN, MIRRORED = View(False), View(True)


@runtime_checkable
class ComposedModel(Protocol):
    """Embeddings made from other models' embeddings: the parts (a model and the view it sees) are embedded
    like any model, then combined; ``level`` is one of :data:`LEVELS` (the parts were embedded at it)."""

    def image_parts(self) -> list[tuple[Any, View]]: ...

    def combine_images(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor: ...

    def text_parts(self) -> list[Any]: ...

    def combine_texts(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor: ...


@runtime_checkable
class Tower(Protocol):
    def fingerprint(self) -> str: ...


@runtime_checkable
class ImageFeatureTower(Tower, Protocol):
    image_size: int

    def transform(self) -> Callable: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextFeatureTower(Tower, Protocol):
    def encode(self, texts: list[str]) -> torch.Tensor: ...


@runtime_checkable
class OnnxExportable(Protocol):
    onnx_exportable: bool


@runtime_checkable
class TokenCounting(Protocol):
    def token_lengths(self, texts: list[str]) -> list[int]: ...


@runtime_checkable
class BatchStreamEncoder(Protocol):
    def encode_batches(self, batches: Iterable[list[str]]) -> Iterator[torch.Tensor]: ...


def logit_scale_value(model: object, default: float = 100.0) -> float:
    """A model's softmax scale ``exp(logit_scale)`` as a float; ``default`` (CLIP's usual 100) without one."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else default
