"""Embed a whole caption dataset with any cliplab model, reusing cached tower features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cliplab.data.captions import CaptionDataset
from cliplab.data.images import ImageFiles, ImageSet, MirroredImages, preprocess_geometry
from cliplab.embed.cache import FeatureCache
from cliplab.embed.extract import embed_images, embed_texts
from cliplab.errors import CliplabError, ConfigError
from cliplab.models.base import EmbeddingModel, FlipTTAModel, TowerModel
from cliplab.models.ensemble import ScoreEnsemble, TowerScoreEnsemble
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


def _drop_invalid(dataset: CaptionDataset, image: np.ndarray, valid: np.ndarray, errors: dict[int, str]):
    if valid.all():
        return dataset, np.asarray(image)
    bad = np.flatnonzero(~valid)
    messages = []
    for i in bad:
        where = dataset.image_sources[i]
        msg = errors.get(int(i), f"unreadable image: {dataset.image_paths()[i]}")
        messages.append(f"{where}: {msg}" if where else msg)
    return dataset.drop_images(bad, "corrupt image", messages), np.asarray(image[valid])


def tower_features(image_tower: nn.Module, text_tower: nn.Module, dataset: CaptionDataset, *,
                   cache: FeatureCache | None = None, on_error: str = "raise", device: str | torch.device = "cpu",
                   image_batch_size: int = 64, text_batch_size: int | None = None, num_workers: int | None = None,
                   progress: bool = True, backend: str = "auto", engine: str = "local",
                   ray_address: str | None = None, ray_actors: int = 2) -> DatasetFeatures:
    """Cached image- and text-tower features for a dataset; corrupt images raise or are skipped and counted."""
    cache = cache or FeatureCache()
    try:
        img = embed_images(image_tower, dataset.image_paths(), cache=cache, batch_size=image_batch_size,
                           num_workers=num_workers, device=device, on_error=on_error, progress=progress,
                           desc=f"{dataset.name} images", backend=backend, engine=engine, ray_address=ray_address,
                           ray_actors=ray_actors)
    except CliplabError as exc:
        # name the caption-file line that introduced the image
        msg = str(exc)
        for path, where in zip(dataset.image_paths(), dataset.image_sources):
            if str(path) in msg and where:
                raise CliplabError(f"{where}: {msg}") from None
        raise
    ds, image = _drop_invalid(dataset, img.features, img.valid, img.errors)
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


def per_member(model: nn.Module) -> bool:
    """Whether ``model`` is embedded member by member: a score ensemble whose members do not share frozen towers
    (each member's features are then cached under its own towers, so changing weights reruns nothing heavy)."""
    return isinstance(model, ScoreEnsemble) and not isinstance(model, TowerScoreEnsemble)


def _same_rows(datasets: list[CaptionDataset]) -> CaptionDataset:
    first = datasets[0]
    for ds in datasets[1:]:
        if list(map(str, ds.image_paths())) != list(map(str, first.image_paths())) or ds.captions != first.captions:
            raise CliplabError(f"{first.name}: ensemble members skipped different images; fix or remove the "
                               "unreadable images and run again")
    return first


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


def encode_dataset(model: nn.Module, dataset: CaptionDataset, *, cache: FeatureCache | None = None,
                   on_error: str = "raise", device: str | torch.device = "cpu", progress: bool = True,
                   features: DatasetFeatures | None = None, flip_tta: bool | None = None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor, CaptionDataset]:
    """Normalised image and caption embeddings of a dataset under ``model``.

    Two-tower models and ConSE reuse cached frozen-tower features and only run their heads; other
    models (a CLIP from ``load_clip``) are run end to end with their final embeddings cached. ``flip_tta``
    (default: the model's own ``flip_tta`` setting, off for single models) averages each image's embedding with
    its mirror's (test-time augmentation).
    """
    model = model.eval().to(device)
    tta = flip_tta_of(model, flip_tta)
    if per_member(model) and features is None:
        parts = [encode_dataset(m, dataset, cache=cache, on_error=on_error, device=device, progress=progress,
                                flip_tta=tta, **kwargs) for m in model.members]
        used = _same_rows([p[2] for p in parts])
        return model.join([p[0] for p in parts]), model.join([p[1] for p in parts]), used
    feats = features or tower_features(*feature_towers(model), dataset, cache=cache, on_error=on_error,
                                       device=device, progress=progress, **kwargs)
    if isinstance(model, TowerModel):
        img = project_features(model.project_image, feats.image, device)
        txt = project_features(model.project_text, feats.text, device)
    else:
        img, txt = normalized_features(feats)
    if tta:
        mirrored = _mirrored_embeddings(model, ImageFiles(feats.dataset.image_paths()), cache=cache, device=device,
                                        progress=progress, desc=f"{dataset.name} images (mirrored)", on_error=on_error)
        img = torch.nn.functional.normalize(img + mirrored, dim=-1)
    return img, txt, feats.dataset


def flip_tta_of(model: nn.Module, flip_tta: bool | None) -> bool:
    """The flip test-time augmentation setting in force: the caller's, else the model's own (ensembles record one)."""
    if flip_tta is not None:
        return bool(flip_tta)
    return isinstance(model, FlipTTAModel) and bool(model.flip_tta)


def _mirrored_embeddings(model: nn.Module, images: ImageSet, *, cache, device, progress: bool, desc: str,
                         normalize: bool = True, **kwargs) -> torch.Tensor:
    """Embeddings of the horizontal mirrors of ``images``, through the same feature cache."""
    feats = embed_images(feature_towers(model)[0], MirroredImages(images), cache=cache, device=device,
                         progress=progress, desc=desc, **kwargs).features
    if isinstance(model, TowerModel):
        return project_features(lambda x: model.project_image(x, normalize=normalize), feats, device)
    z = torch.from_numpy(np.array(feats, dtype=np.float32))
    return torch.nn.functional.normalize(z, dim=-1) if normalize else z


def normalized_features(feats: DatasetFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached final embeddings (of a CLIP-style model) as unit-norm float32 tensors."""
    img = torch.nn.functional.normalize(torch.from_numpy(np.array(feats.image, dtype=np.float32)), dim=-1)
    txt = torch.nn.functional.normalize(torch.from_numpy(np.array(feats.text, dtype=np.float32)), dim=-1)
    return img, txt


def encode_images(model: nn.Module, images, *, cache: FeatureCache | None = None, device: str | torch.device = "cpu",
                  normalize: bool = False, progress: bool = True, desc: str = "images", flip_tta: bool | None = None,
                  **kwargs) -> torch.Tensor:
    """Image embeddings ``[N, d]`` of an :class:`~cliplab.data.images.ImageSet` (or paths) under any model.

    Raw (unnormalised) by default, for experiments that compare cosine with dot product; ``flip_tta`` (default:
    the model's setting) averages each image's embedding with its mirror's.
    """
    model = model.eval().to(device)
    tta = flip_tta_of(model, flip_tta)
    images = images if isinstance(images, ImageSet) else ImageFiles(images)
    if per_member(model):
        return model.join([encode_images(m, images, cache=cache, device=device, progress=progress, desc=desc,
                                         flip_tta=tta, **kwargs) for m in model.members])
    feats = embed_images(feature_towers(model)[0], images, cache=cache, device=device, progress=progress, desc=desc,
                         **kwargs)
    if isinstance(model, TowerModel):
        z = project_features(lambda x: model.project_image(x, normalize=False), feats.features, device)
    else:
        z = torch.as_tensor(np.array(feats.features, dtype=np.float32))
    if tta:
        z = (z + _mirrored_embeddings(model, images, cache=cache, device=device, progress=progress,
                                      desc=f"{desc} (mirrored)", normalize=False, **kwargs)) / 2
    return torch.nn.functional.normalize(z, dim=-1) if normalize else z


def image_tower_features(model: nn.Module, images, *, cache: FeatureCache | None = None,
                         device: str | torch.device = "cpu", progress: bool = True, desc: str = "images",
                         flip_tta: bool = False, **kwargs) -> np.ndarray:
    """Frozen image features for linear probes: the image tower's pooled output, or a CLIP's image embedding;
    for an ensemble of models with their own towers, the members' features side by side.

    ``flip_tta`` averages the features of each image and its horizontal mirror.
    """
    images = images if isinstance(images, ImageSet) else ImageFiles(images)
    if per_member(model):
        return np.concatenate([image_tower_features(m, images, cache=cache, device=device, progress=progress,
                                                    desc=desc, flip_tta=flip_tta, **kwargs) for m in model.members], 1)
    tower = feature_towers(model.eval().to(device))[0]
    feats = np.array(embed_images(tower, images, cache=cache, device=device, progress=progress, desc=desc,
                                  **kwargs).features, dtype=np.float32)
    if flip_tta:
        mirrored = embed_images(tower, MirroredImages(images), cache=cache, device=device, progress=progress,
                                desc=f"{desc} (mirrored)", **kwargs).features
        feats = (feats + np.asarray(mirrored, dtype=np.float32)) / 2
    return feats


def image_embeddings(model: nn.Module, images, *, cache: FeatureCache | None = None,
                     device: str | torch.device = "cpu", progress: bool = True, desc: str = "images",
                     flip_tta: bool | None = None, **kwargs) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Unit-norm image embeddings ``[N, d]`` under any model, with ``valid [N]`` and error messages of images
    that could not be read (their rows are zeros); computed through the feature cache (chunked, resumable).
    ``flip_tta`` as in :func:`encode_dataset`."""
    model = model.eval().to(device)
    tta = flip_tta_of(model, flip_tta)
    images = images if isinstance(images, ImageSet) else ImageFiles(images)
    if per_member(model):
        parts = [image_embeddings(m, images, cache=cache, device=device, progress=progress, desc=desc, flip_tta=tta,
                                  **kwargs) for m in model.members]
        valid = np.logical_and.reduce([p[1] for p in parts])
        z = model.join([torch.from_numpy(p[0]) for p in parts]).numpy().astype(np.float32)
        z[~valid] = 0.0
        return z, valid, {k: v for p in parts for k, v in p[2].items()}
    feats = embed_images(feature_towers(model)[0], images, cache=cache, device=device, progress=progress, desc=desc,
                         on_error="skip", **kwargs)
    valid = np.asarray(feats.valid, dtype=bool)
    if isinstance(model, TowerModel):
        z = project_features(model.project_image, np.asarray(feats.features), device)
    else:
        z = torch.nn.functional.normalize(torch.as_tensor(np.array(feats.features, dtype=np.float32)), dim=-1)
    if tta:
        zm = _mirrored_embeddings(model, images, cache=cache, device=device, progress=progress,
                                  desc=f"{desc} (mirrored)", on_error="skip", **kwargs)
        z = torch.nn.functional.normalize(z + zm, dim=-1)
    z = z.numpy().astype(np.float32)
    z[~valid] = 0.0
    return z, valid, feats.errors


@torch.inference_mode()
def text_embeddings(model: nn.Module, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-norm caption/query embeddings ``[N, d]`` (no cache: queries are short and new)."""
    out = [model.encode_text(list(texts[i:i + batch_size]), normalize=True).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
