"""Model wrappers for experiment features: flip test-time augmentation and stacked probe features.

Each is a :class:`~cliplab.models.base.ComposedModel`: the embedding pipeline (:mod:`cliplab.embed.pipeline`)
embeds its parts like any model, through the feature cache, and the wrapper combines them. So a feature is
switched on by wrapping the model once, and nothing below needs to know about it.

**Flip TTA, the one definition.** ``FlipTTA(model)`` embeds each image and its left-right mirror and takes the
mean of the two embeddings *at the level the caller asks for*, renormalised when unit embeddings were asked:
``normalise(u(x) + u(mirror x))`` for unit embeddings (retrieval, the photo index, query images), ``(z(x) +
z(mirror x)) / 2`` for raw embeddings and for tower features (linear probes). These are the numbers cliplab
gave before the wrapper, path by path (``tests/test_wrappers.py`` checks them against a recording).
A raw embedding asked for and normalised afterwards (``encode_images(normalize=True)``) is the normalised mean
of the raw embeddings, as before. The mirrored view is its own cache entry (the mirrored image set's keys); the
plain view is the unwrapped model's entry, reused.

Flip TTA of a score ensemble whose members have their own towers flips each member (each member's mean, then
joined): ``with_flip_tta`` builds that ensemble; an ensemble over shared towers is wrapped whole (its heads
still rerun on one set of cached features per view).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cliplab.errors import ConfigError
from cliplab.models.base import (AS_GIVEN, MIRRORED, ComposedModel, EmbeddingModel, Level, TowerModel, View,
                                 logit_scale_value)
from cliplab.models.ensemble import ScoreEnsemble, TowerScoreEnsemble, score_ensemble
from cliplab.utils import sha256_text


class FlipTTA(nn.Module):
    """``model`` with flip test-time augmentation (see the module docstring); the same model interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_value(model))), requires_grad=False)

    def image_parts(self) -> list[tuple[nn.Module, View]]:
        return [(self.inner, AS_GIVEN), (self.inner, MIRRORED)]

    def combine_images(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor:
        z = (parts[0].float() + parts[1].float()) / 2
        return F.normalize(z, dim=-1) if level == "unit" else z

    def text_parts(self) -> list[nn.Module]:
        return [self.inner]

    def combine_texts(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor:
        return parts[0]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """A preprocessed batch and its flip along the width (the pipeline mirrors image files before
        preprocessing instead: equal up to the centre crop's rounding)."""
        parts = [self.inner.encode_image(view.tensor(images), normalize=normalize) for _, view in self.image_parts()]
        return self.combine_images(parts, "unit" if normalize else "raw")

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        return self.inner.encode_text(texts, normalize=normalize)

    def preprocess(self) -> Callable:
        return self.inner.preprocess()

    def fingerprint(self) -> str:
        return sha256_text("flip-tta", self.inner.fingerprint())


class FeatureStack(nn.Module):
    """Several image towers' features side by side, each tower at its own input size: a linear probe's input
    (``cliplab eval probe --features lite0,lite2@224``; built by :func:`cliplab.models.factory.feature_stack`)."""

    def __init__(self, towers: Sequence[nn.Module], names: Sequence[str]) -> None:
        super().__init__()
        if not towers:
            raise ConfigError("probe features: name at least one image tower")
        self.towers, self.names = nn.ModuleList(towers), list(names)

    def image_parts(self) -> list[tuple[nn.Module, View]]:
        return [(t, AS_GIVEN) for t in self.towers]

    def combine_images(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor:
        if level != "features":
            raise ConfigError(f"{'+'.join(self.names)}: a stack of image-tower features has no embeddings")
        return torch.cat([p.float() for p in parts], -1)

    def text_parts(self) -> list[nn.Module]:
        raise ConfigError(f"{'+'.join(self.names)}: a stack of image-tower features has no text side")

    def combine_texts(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor:
        raise ConfigError(f"{'+'.join(self.names)}: a stack of image-tower features has no text side")

    def fingerprint(self) -> str:
        return sha256_text("features", *(t.fingerprint() for t in self.towers))


def has_flip_tta(model: nn.Module) -> bool:
    """Whether ``model`` embeds images with flip TTA (wrapped whole, or every member of an ensemble)."""
    if isinstance(model, FlipTTA):
        return True
    return isinstance(model, ScoreEnsemble) and all(isinstance(m, FlipTTA) for m in model.members)


def without_flip_tta(model: nn.Module) -> nn.Module:
    """``model`` with every flip TTA wrapper taken off (an ensemble rebuilt from its plain members)."""
    if isinstance(model, FlipTTA):
        return without_flip_tta(model.inner)
    if isinstance(model, ScoreEnsemble) and any(isinstance(m, FlipTTA) for m in model.members):
        return score_ensemble([without_flip_tta(m) for m in model.members], model.weights)
    return model


def with_flip_tta(model: nn.Module, flip_tta: bool | None) -> nn.Module:
    """``model`` with flip TTA on (``True``), off (``False``) or as it is (``None``); see the module docstring for
    ensembles. The public ``flip_tta=`` keywords of cliplab's library calls wrap the model here, once."""
    if flip_tta is None:
        return model
    if not flip_tta:
        return without_flip_tta(model)
    if has_flip_tta(model):
        return model
    if isinstance(model, ScoreEnsemble) and not isinstance(model, TowerScoreEnsemble):
        return ScoreEnsemble([FlipTTA(m) for m in model.members], model.weights)
    return FlipTTA(model)


def cosine_only(model: nn.Module) -> bool:
    """Whether ``model`` defines cosine scores only (a score ensemble, wrapped or not: see
    :mod:`cliplab.models.ensemble`)."""
    while isinstance(model, FlipTTA):
        model = model.inner
    return isinstance(model, ScoreEnsemble)


def text_side(model: nn.Module) -> nn.Module:
    """The model that embeds ``model``'s texts: the wrapped model under flip TTA (which changes images only), so
    a text fast path (the server's ONNX text tower) sees the TowerModel beneath."""
    while isinstance(model, FlipTTA):
        model = model.inner
    return model


def encode_pil_images(model: Any, images: Sequence[Image.Image], normalize: bool = True) -> torch.Tensor:
    """Embeddings of PIL images made as the pipeline makes them from image files: a composed model combines its
    parts' embeddings (a mirrored view gets the mirrored image, then that part's preprocessing), any other model
    preprocesses and encodes (a TowerModel on its whole: its heads over its own towers)."""
    if isinstance(model, ComposedModel) and not isinstance(model, TowerModel):
        parts = [encode_pil_images(m, [view.pil(im) for im in images], normalize) for m, view in model.image_parts()]
        return model.combine_images(parts, "unit" if normalize else "raw")
    if not isinstance(model, EmbeddingModel):
        raise ConfigError(f"{type(model).__name__} does not embed images (no encode_image)")
    transform = model.preprocess()
    return model.encode_image(torch.stack([transform(im) for im in images]), normalize=normalize)
