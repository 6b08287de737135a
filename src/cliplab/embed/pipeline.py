"""Embed datasets and image sets with any cliplab model, reusing cached tower features.

One dispatch (:func:`image_outputs`, :func:`text_outputs`): a composed model (a wrapper of
:mod:`cliplab.models.wrappers`, a score ensemble) is embedded part by part and combined by the model; any other model
runs its frozen towers (TwoTower, ConSE: then its heads) or its whole self (a CLIP: its final embeddings) through
the feature cache. The public calls below ask it for one level: unit embeddings (datasets, the photo index), raw
embeddings (experiments) or tower features (linear probes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from cliplab.data.captions import CaptionDataset
from cliplab.data.images import ImageFiles, ImageSet, preprocess_geometry
from cliplab.embed.cache import FeatureCache
from cliplab.embed.extract import embed_images, embed_texts
from cliplab.errors import CliplabError, ConfigError
from cliplab.models.base import LEVELS, ComposedModel, EmbeddingModel, ImageFeatureTower, Level, TowerModel
from cliplab.models.wrappers import with_flip_tta
from cliplab.utils import sha256_text


@dataclass
class DatasetFeatures:
    """Frozen-tower features aligned with ``dataset`` (bad images already dropped from it)."""

    dataset: CaptionDataset
    image: np.ndarray  # [Ni, Di]
    text: np.ndarray  # [Nc, Dt]
    reused: bool = False

    @property
    def caption_image(self) -> np.ndarray:
        return self.dataset.caption_image


def _drop_invalid(dataset: CaptionDataset, valid: np.ndarray, errors: dict[int, str]) -> CaptionDataset:
    """``dataset`` less its unreadable images, each reported with the caption-file line that named it."""
    if valid.all():
        return dataset
    bad = np.flatnonzero(~valid)
    messages = []
    for i in bad:
        where = dataset.image_sources[i]
        msg = errors.get(int(i), f"unreadable image: {dataset.image_paths()[i]}")
        messages.append(f"{where}: {msg}" if where else msg)
    return dataset.drop_images(bad, "corrupt image", messages)


@contextmanager
def _caption_lines(dataset: CaptionDataset) -> Iterator[None]:
    """An image error raised inside names the caption-file line that introduced the image."""
    try:
        yield
    except CliplabError as exc:
        msg = str(exc)
        for path, where in zip(dataset.image_paths(), dataset.image_sources):
            if str(path) in msg and where:
                raise CliplabError(f"{where}: {msg}") from None
        raise


def tower_features(image_tower: nn.Module, text_tower: nn.Module, dataset: CaptionDataset, *,
                   cache: FeatureCache | None = None, on_error: str = "raise", device: str | torch.device = "cpu",
                   image_batch_size: int = 64, text_batch_size: int | None = None, num_workers: int | None = None,
                   progress: bool = True, backend: str = "auto", engine: str = "local",
                   ray_address: str | None = None, ray_actors: int = 2) -> DatasetFeatures:
    """Cached image- and text-tower features for a dataset; corrupt images raise or are skipped and counted."""
    cache = cache or FeatureCache()
    with _caption_lines(dataset):
        img = embed_images(image_tower, dataset.image_paths(), cache=cache, batch_size=image_batch_size,
                           num_workers=num_workers, device=device, on_error=on_error, progress=progress,
                           desc=f"{dataset.name} images", backend=backend, engine=engine, ray_address=ray_address,
                           ray_actors=ray_actors)
    ds = _drop_invalid(dataset, img.valid, img.errors)
    image = np.asarray(img.features if img.valid.all() else img.features[img.valid])
    txt = embed_texts(text_tower, ds.captions, cache=cache, batch_size=text_batch_size, device=device,
                      progress=progress, desc=f"{dataset.name} captions", backend=backend)
    return DatasetFeatures(ds, image, np.asarray(txt.features), reused=img.reused and txt.reused)


def _model_fingerprint(model) -> str:
    """A model's cache identity; a model that cannot name its weights is never cached (a cache key
    from anything weaker, such as ``id(model)``, could hand one model's features to another)."""
    fp = model.fingerprint() if isinstance(model, EmbeddingModel) else None
    if not isinstance(fp, str) or not fp:
        raise ConfigError(f"{type(model).__name__} has no fingerprint(): its features cannot be cached; "
                          "implement cliplab.models.EmbeddingModel")
    return fp


class EncodeImageAdapter(nn.Module):
    """A model's final image embeddings as a "tower" for ``embed_images`` (models without frozen towers,
    e.g. a CLIP): cached under the model's fingerprint."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self._fingerprint = sha256_text("encode_image", _model_fingerprint(model))
        self._transform = model.preprocess()
        self.image_size = preprocess_geometry(self._transform)[0]

    def transform(self):
        return self._transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(images.contiguous(), normalize=False)

    def fingerprint(self) -> str:
        return self._fingerprint


class EncodeTextAdapter(nn.Module):
    """A model's final caption embeddings as a "tower" for ``embed_texts``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self._fingerprint = sha256_text("encode_text", _model_fingerprint(model))

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.inner.encode_text(list(texts), normalize=False)

    def fingerprint(self) -> str:
        return self._fingerprint


def feature_towers(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """What ``tower_features`` caches for a model: its frozen towers (TwoTower, ConSE), or its final
    embeddings through adapters (any other :class:`EmbeddingModel`)."""
    if isinstance(model, TowerModel):
        return model.image_tower, model.text_tower
    return EncodeImageAdapter(model), EncodeTextAdapter(model)


@torch.inference_mode()
def project_features(fn, feats: np.ndarray, device, batch_size: int = 4096) -> torch.Tensor:
    """Apply ``fn`` (a projection head) to cached features in batches; returns a CPU tensor."""
    out = []
    for s in range(0, len(feats), batch_size):
        out.append(fn(torch.from_numpy(np.array(feats[s:s + batch_size], dtype=np.float32)).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.inference_mode()
def evaluate_retrieval(model: nn.Module, feats: DatasetFeatures, device: str | torch.device = "cpu") -> dict:
    """Retrieval metrics of a model with projection heads (TwoTower, ConSE) on cached tower features."""
    from cliplab.eval.retrieval import retrieval_metrics

    model.eval()
    img = project_features(model.project_image, feats.image, device)
    txt = project_features(model.project_text, feats.text, device)
    return retrieval_metrics(img, txt, feats.caption_image, device=device).metrics


# -- the one dispatch: any model (or bare image tower) -> embeddings at a level, through the feature cache

@dataclass
class ImageOutputs:
    """A model's image outputs ``[N, d]`` at one level, with ``valid [N]`` and the unreadable images' errors."""

    values: torch.Tensor
    valid: np.ndarray
    errors: dict[int, str]
    reused: bool = False


def image_feature_tower(model: nn.Module) -> nn.Module:
    """What the feature cache runs for a model's images: a TowerModel's frozen image tower, a bare image tower
    itself (probe features), else the model's final embeddings through :class:`EncodeImageAdapter`."""
    if isinstance(model, TowerModel):
        return model.image_tower
    if isinstance(model, ImageFeatureTower) and not isinstance(model, EmbeddingModel):
        return model
    return EncodeImageAdapter(model)  # refuses a model without a fingerprint


def _head(feats: np.ndarray, level: Level, device, project: Callable | None = None) -> torch.Tensor:
    """Cached features at ``level``: as they are (``features``), through a TowerModel's ``project`` head, or
    (without one: a model's cached final embeddings) raw / normalised."""
    if level not in LEVELS:
        raise ConfigError(f"embedding level must be one of {', '.join(LEVELS)}, not {level!r}")
    if level != "features" and project is not None:
        return project_features(lambda x: project(x, normalize=level == "unit"), feats, device)
    z = torch.from_numpy(np.array(feats, dtype=np.float32))
    return torch.nn.functional.normalize(z, dim=-1) if level == "unit" else z


def _composed(model: nn.Module) -> bool:
    """Whether the pipeline embeds ``model`` through its parts: a composed model, unless it is a TowerModel
    (a tower-sharing ensemble: its heads run on one set of cached tower features)."""
    return isinstance(model, ComposedModel) and not isinstance(model, TowerModel)


def image_outputs(model: nn.Module, images: ImageSet, *, level: Level = "unit", cache: FeatureCache | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, desc: str = "images",
                  on_error: str = "raise", **kwargs) -> ImageOutputs:
    """Image outputs of any model at ``level`` (:data:`~cliplab.models.base.LEVELS`: tower features, raw or
    unit embeddings). A :class:`~cliplab.models.base.ComposedModel` has each part embedded through its own
    view and combines them; anything else runs its image tower through the
    feature cache (``kwargs``: :func:`~cliplab.embed.extract.embed_images` settings), then its head."""
    if _composed(model):
        parts = [image_outputs(m, view.images(images), level=level, cache=cache, device=device, progress=progress,
                               desc=desc + view.tag, on_error=on_error, **kwargs) for m, view in model.image_parts()]
        return ImageOutputs(model.combine_images([p.values for p in parts], level),
                            np.logical_and.reduce([p.valid for p in parts]),
                            {k: v for p in parts for k, v in p.errors.items()}, all(p.reused for p in parts))
    feats = embed_images(image_feature_tower(model), images, cache=cache, device=device, progress=progress,
                         desc=desc, on_error=on_error, **kwargs)
    project = model.project_image if isinstance(model, TowerModel) else None
    return ImageOutputs(_head(feats.features, level, device, project),
                        np.asarray(feats.valid, dtype=bool), dict(feats.errors), feats.reused)


def text_outputs(model: nn.Module, texts: list[str], *, level: Level = "unit", cache: FeatureCache | None = None,
                 device: str | torch.device = "cpu", progress: bool = True, desc: str = "captions",
                 **kwargs) -> tuple[torch.Tensor, bool]:
    """Caption outputs of any model at ``level`` and whether every part came from the cache: the counterpart of
    :func:`image_outputs` (``kwargs``: :func:`~cliplab.embed.extract.embed_texts` settings)."""
    if _composed(model):
        parts = [text_outputs(m, texts, level=level, cache=cache, device=device, progress=progress, desc=desc,
                              **kwargs) for m in model.text_parts()]
        return model.combine_texts([p[0] for p in parts], level), all(p[1] for p in parts)
    tower, project = (model.text_tower, model.project_text) if isinstance(model, TowerModel) else \
        (EncodeTextAdapter(model), None)
    feats = embed_texts(tower, texts, cache=cache, device=device, progress=progress, desc=desc, **kwargs)
    return _head(feats.features, level, device, project), feats.reused


def _image_set(images) -> ImageSet:
    return images if isinstance(images, ImageSet) else ImageFiles(images)


def _settings(image_batch_size: int = 64, text_batch_size: int | None = None, backend: str = "auto",
              **image: object) -> tuple[dict, dict]:
    """``tower_features``' keywords as the image and the text settings of the feature cache."""
    return {"batch_size": image_batch_size, "backend": backend, **image}, {"batch_size": text_batch_size,
                                                                          "backend": backend}


def encode_dataset(model: nn.Module, dataset: CaptionDataset, *, cache: FeatureCache | None = None,
                   on_error: str = "raise", device: str | torch.device = "cpu", progress: bool = True,
                   features: DatasetFeatures | None = None, flip_tta: bool | None = None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor, CaptionDataset]:
    """Unit image and caption embeddings of a dataset under any model, and the dataset less the images that
    could not be read (``on_error="skip"``).

    Two-tower models and ConSE reuse cached frozen-tower features and only run their heads (``features``: those
    features, computed already); other models (a CLIP from ``load_clip``) are run end to end with their final
    embeddings cached; composed models (wrappers, ensembles) combine their parts'. ``flip_tta``: see
    :func:`cliplab.models.wrappers.with_flip_tta`. ``kwargs``: :func:`tower_features`' settings.
    """
    model = with_flip_tta(model, flip_tta).eval().to(device)
    if features is not None:
        if _composed(model):
            raise ConfigError("precomputed features are one model's tower features; embed a composed model "
                              "(a wrapper, an ensemble) from the dataset")
        towers = isinstance(model, TowerModel)
        return (_head(features.image, "unit", device, model.project_image if towers else None),
                _head(features.text, "unit", device, model.project_text if towers else None), features.dataset)
    image_kw, text_kw = _settings(**kwargs)
    with _caption_lines(dataset):
        img = image_outputs(model, ImageFiles(dataset.image_paths()), cache=cache, device=device, progress=progress,
                            desc=f"{dataset.name} images", on_error=on_error, **image_kw)
    ds = _drop_invalid(dataset, img.valid, img.errors)
    rows = img.values if img.valid.all() else img.values[torch.from_numpy(img.valid)]
    txt, _ = text_outputs(model, ds.captions, cache=cache, device=device, progress=progress,
                          desc=f"{dataset.name} captions", **text_kw)
    return rows, txt, ds


def encode_images(model: nn.Module, images, *, cache: FeatureCache | None = None, device: str | torch.device = "cpu",
                  normalize: bool = False, progress: bool = True, desc: str = "images", flip_tta: bool | None = None,
                  **kwargs) -> torch.Tensor:
    """Image embeddings ``[N, d]`` of an :class:`~cliplab.data.images.ImageSet` (or paths) under any model.

    Raw (unnormalised) by default, for experiments that compare cosine with dot product; ``normalize``
    normalises the raw embeddings afterwards. ``flip_tta``: see :func:`cliplab.models.wrappers.with_flip_tta`.
    """
    model = with_flip_tta(model, flip_tta).eval().to(device)
    z = image_outputs(model, _image_set(images), level="raw", cache=cache, device=device, progress=progress,
                      desc=desc, **kwargs).values
    return torch.nn.functional.normalize(z, dim=-1) if normalize else z


def image_tower_features(model: nn.Module, images, *, cache: FeatureCache | None = None,
                         device: str | torch.device = "cpu", progress: bool = True, desc: str = "images",
                         flip_tta: bool | None = None, **kwargs) -> np.ndarray:
    """Frozen image features for linear probes: the image tower's pooled output, or a CLIP's image embedding;
    for an ensemble of models with their own towers, or a :class:`~cliplab.models.wrappers.FeatureStack`, the
    parts' features side by side. ``flip_tta``: see :func:`cliplab.models.wrappers.with_flip_tta`."""
    model = with_flip_tta(model, flip_tta).eval().to(device)
    return image_outputs(model, _image_set(images), level="features", cache=cache, device=device, progress=progress,
                         desc=desc, **kwargs).values.numpy()


def image_embeddings(model: nn.Module, images, *, cache: FeatureCache | None = None,
                     device: str | torch.device = "cpu", progress: bool = True, desc: str = "images",
                     **kwargs) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Unit-norm image embeddings ``[N, d]`` under any model, with ``valid [N]`` and error messages of images
    that could not be read (their rows are zeros); computed through the feature cache (chunked, resumable)."""
    model = model.eval().to(device)
    out = image_outputs(model, _image_set(images), cache=cache, device=device, progress=progress, desc=desc,
                        on_error="skip", **kwargs)
    z = out.values.numpy().astype(np.float32)
    z[~out.valid] = 0.0
    return z, out.valid, out.errors


@torch.inference_mode()
def text_embeddings(model: nn.Module, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-norm caption/query embeddings ``[N, d]`` (no cache: queries are short and new)."""
    out = [model.encode_text(list(texts[i:i + batch_size]), normalize=True).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
