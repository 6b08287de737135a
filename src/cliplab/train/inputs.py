"""Training inputs for each side of a split: activations at the first trainable stage boundary.

Frozen prefixes never run per epoch: their output is computed once and cached on disk (float16,
memory-mapped), keyed by the tower fingerprint, the boundary, the items and the preprocessing. When a
side trains from its first stage the inputs are raw pixels (decoded per batch by the image feed's worker
processes, optionally augmented) or token batches.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn

from cliplab.data.captions import CaptionDataset
from cliplab.data.images import ImageSet, MirroredImages, preprocess_geometry
from cliplab.embed.backends import OnnxTensorFunction, resolve_backend
from cliplab.embed.cache import FeatureCache
from cliplab.embed.feed import ImageFeed
from cliplab.embed.pipeline import DatasetFeatures
from cliplab.errors import CliplabError, ConfigError
from cliplab.models.stages import Stages
from cliplab.utils import sha256_text

log = logging.getLogger(__name__)


class Acts:
    """Per-item activations of one side; ``batch`` returns the model input for a list of items."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, idx: np.ndarray, device, rng: np.random.Generator | None = None) -> Any:
        raise NotImplementedError


class ArrayActs(Acts):
    """Fixed-shape activations ``[N, ...]``; with ``mirrored`` (those of the flipped images) a training
    batch takes each item's original or mirror at random (flip augmentation on cached prefixes)."""

    def __init__(self, array: np.ndarray, mirrored: np.ndarray | None = None) -> None:
        self.array, self.mirrored = array, mirrored

    def __len__(self) -> int:
        return len(self.array)

    def batch(self, idx, device, rng=None):
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")  # sorted reads are faster on memory maps
        rows = np.empty((len(idx),) + self.array.shape[1:], dtype=np.float32)
        rows[order] = self.array[idx[order]]
        if self.mirrored is not None and rng is not None:
            flip = rng.random(len(idx)) < 0.5
            if flip.any():
                rows[flip] = self.mirrored[idx[flip]]
        return torch.from_numpy(rows).to(device)


class TokenActs(Acts):
    """Ragged token activations (hidden states of each caption without padding), re-padded per batch."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, np.asarray(offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, idx, device, rng=None):
        lengths = self.offsets[np.asarray(idx) + 1] - self.offsets[np.asarray(idx)]
        hidden = np.zeros((len(idx), int(lengths.max()), self.data.shape[1]), dtype=np.float32)
        mask = np.zeros((len(idx), int(lengths.max())), dtype=np.int64)
        for row, (i, n) in enumerate(zip(idx, lengths)):
            hidden[row, :n] = self.data[self.offsets[i]:self.offsets[i] + n]
            mask[row, :n] = 1
        return torch.from_numpy(hidden).to(device), torch.from_numpy(mask).to(device)


class PixelActs(Acts):
    """Raw images decoded per batch by the image feed (worker processes, normalised on the device), with the
    training augmentation when one is given: item k of a batch seeded from torch's RNG, so a run (and its
    resume) gets the same crops whatever the number of workers."""

    def __init__(self, images: ImageSet, transform: Callable, train_transform: Callable | None = None,
                 workers: int | None = None) -> None:
        self.images, self.transform, self.train_transform = images, transform, train_transform
        self.workers = workers
        self._feed: ImageFeed | None = None

    def __len__(self) -> int:
        return len(self.images)

    def feed(self, device) -> ImageFeed:
        """The feed (its workers start on the first batch and stay for the run)."""
        if self._feed is None or self._feed.device != torch.device(device):
            if self._feed is not None:
                self._feed.close()
            self._feed = ImageFeed(self.images, self.transform, device=device, num_workers=self.workers,
                                   train_transform=self.train_transform,
                                   channels_last=torch.device(device).type == "cuda")
        return self._feed

    def batch(self, idx, device, rng=None):
        train = rng is not None and self.train_transform is not None
        seed = int(torch.randint(0, 1 << 62, ())) if train else None
        out = self.feed(device).batch(idx, seed=seed, train=train)
        if not all(out.ok):
            raise CliplabError(next(e for e, good in zip(out.errors, out.ok) if not good))
        return out.pixels

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_feed": None}  # a copy (e.g. a pickled split) starts its own workers


class TextActs(Acts):
    """Captions tokenised per batch."""

    def __init__(self, texts: Sequence[str], tokenize: Callable[[list[str]], Any]) -> None:
        self.texts, self.tokenize = list(texts), tokenize

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, idx, device, rng=None):
        tokens = self.tokenize([self.texts[int(i)] for i in idx])
        if isinstance(tokens, dict):
            return {k: v.to(device) for k, v in tokens.items()}
        return tokens.to(device)


@dataclass
class SplitInputs:
    """A split ready for training or evaluation: per-side activations at the given stage boundaries."""

    dataset: CaptionDataset
    image: Acts
    text: Acts
    image_boundary: int
    text_boundary: int
    features: DatasetFeatures | None = None  # frozen pooled tower features (hard negatives, baselines)
    info: dict = field(default_factory=dict)

    @property
    def caption_image(self) -> np.ndarray:
        return self.dataset.caption_image


def inputs_from_features(feats: DatasetFeatures, model) -> SplitInputs:
    """Head training on cached pooled tower features (both boundaries at the projection head)."""
    return SplitInputs(feats.dataset, ArrayActs(feats.image), ArrayActs(feats.text),
                       len(model.image_stages()) - 1, len(model.text_stages()) - 1, features=feats)


def train_augmentation(size: int, mean, std) -> T.Compose:
    """Image augmentation for towers trained from pixels: random resized crop, flip, colour jitter."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


class StagePrefix(nn.Module):
    """Stages ``[0, boundary)`` of one side as a module (what the ONNX export of a frozen prefix traces)."""

    def __init__(self, stages: Stages, boundary: int) -> None:
        super().__init__()
        self.stages, self.boundary = stages, boundary
        self.parts = nn.ModuleList(m for st in stages.stages[:boundary] for m in st.modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages.run(x, 0, self.boundary)


def _prefix_runner(stages: Stages, boundary: int, key: str, example: torch.Tensor, device, backend: str,
                   cache: FeatureCache) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime on CPU when the backend allows it (the export is cached next to the prefix), else torch
    (also when the prefix does not export, e.g. fused attention kernels of some CLIP vision towers)."""
    eager = lambda x: stages.run(x, 0, boundary)  # noqa: E731
    chosen = resolve_backend(backend, torch.device(device))
    if not (chosen.startswith("onnx") and torch.device(device).type == "cpu"):  # prefixes are never quantised
        return eager
    try:
        run = OnnxTensorFunction(StagePrefix(stages, boundary), example, cache.root / "onnx" / f"prefix-{key}.onnx",
                                 copy_module=False)
    except Exception as e:  # noqa: BLE001 - any export failure: the eager prefix gives the same activations
        log.info("frozen prefix not exported to ONNX (%s: %s); running it in torch", type(e).__name__,
                 str(e).splitlines()[0] if str(e) else "")
        return eager
    return lambda x: torch.from_numpy(run(x.numpy()))


@torch.inference_mode()
def _image_prefix(run: Callable[[torch.Tensor], torch.Tensor], feed: ImageFeed, start: int, stop: int) -> np.ndarray:
    """``run`` (the frozen prefix) over images ``[start, stop)`` of the feed."""
    out = []
    for b in feed.batches(start, stop):
        if not all(b.ok):
            raise CliplabError(next(e for e, good in zip(b.errors, b.ok) if not good))
        y = run(b.pixels)
        if not isinstance(y, torch.Tensor):
            raise ConfigError("image stage outputs must be tensors")
        out.append(y.float().cpu().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def _text_prefix(stages: Stages, boundary: int, texts: Sequence[str], tokenize, device,
                 batch_size: int) -> np.ndarray | list[np.ndarray]:
    """Pooled outputs ``[N, H]``, or each caption's token activations ``[L_i, H]`` (no padding)."""
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch
    pieces: dict[int, np.ndarray] = {}
    pooled = None
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        tokens = tokenize([texts[i] for i in idx])
        tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
        y = stages.run(tokens, 0, boundary)
        if isinstance(y, torch.Tensor):
            if pooled is None:
                pooled = np.empty((len(texts),) + tuple(y.shape[1:]), dtype=np.float32)
            pooled[idx] = y.float().cpu().numpy()
        else:
            hidden, mask = y
            lengths = mask.sum(1).tolist()
            h = hidden.float().cpu().numpy()
            for row, (i, n) in enumerate(zip(idx, lengths)):
                pieces[int(i)] = h[row, :n]
    return pooled if pooled is not None else [pieces[i] for i in range(len(texts))]


def _prefix_key(key: str) -> str:
    return sha256_text("prefix-v2", key)[:32]


def _prefix_store(cache: FeatureCache, key: str, n: int, compute, desc: str, progress: bool, ragged: bool,
                  chunk_size: int):
    """Frozen-prefix activations in the feature store (float16, chunked, locked, resumable, atomic)."""
    def chunk(start: int, stop: int):
        return compute(start, stop), np.ones(stop - start, dtype=bool), []

    return cache.get_or_compute("prefix", _prefix_key(key), n, chunk, desc=desc, progress=progress,
                                dtype="float16", ragged=ragged, chunk_size=chunk_size, meta={"prefix": key})


def image_acts(model, stages: Stages, boundary: int, images: ImageSet, *, cache: FeatureCache, device,
               fingerprint: str, augment: str = "none", batch_size: int | None = None, progress: bool = True,
               desc: str = "images", backend: str = "auto") -> Acts:
    """Image-side inputs at ``boundary`` (cached prefix output, or pixels when ``boundary`` is 0). The prefix
    runs once, under ONNX Runtime on CPU unless ``backend`` is ``torch``."""
    transform = model.preprocess()
    if boundary == 0:
        train_tf = None
        if augment == "full":
            size, mean, std = preprocess_geometry(transform)
            train_tf = train_augmentation(size, mean, std)
        elif augment == "flip":
            train_tf = T.Compose([T.RandomHorizontalFlip(), *transform.transforms])
        return PixelActs(images, transform, train_tf)
    if augment == "full":
        raise ConfigError("train.augment=full needs the image side trained from its first stage; "
                          "with a cached frozen prefix use augment=flip")

    prefix_id = (fingerprint, "image-prefix", str(boundary), stages[boundary - 1].name)

    @functools.cache
    def runner() -> Callable[[torch.Tensor], torch.Tensor]:  # built on the first cache miss, shared by both sets
        size = preprocess_geometry(transform)[0]
        return _prefix_runner(stages, boundary, sha256_text(*prefix_id)[:24], torch.zeros(2, 3, size, size), device,
                              backend, cache)

    def compute(imgs: ImageSet, what: str):
        key = sha256_text(*prefix_id, *imgs.keys())
        old = imgs.stat_keys()  # cached before content digests: the same files, unchanged since
        if old is not None:
            cache.adopt("prefix", _prefix_key(sha256_text(*prefix_id, *old)), _prefix_key(key), len(imgs))
        with ImageFeed(imgs, transform, device=device, batch_size=batch_size) as feed:
            return _prefix_store(cache, key, len(imgs), lambda a, b: _image_prefix(runner(), feed, a, b),
                                 f"{what}", progress, ragged=False, chunk_size=512).features

    array = compute(images, f"{desc} (frozen prefix)")
    mirrored = compute(MirroredImages(images), f"{desc} (mirrored prefix)") if augment == "flip" else None
    return ArrayActs(array, mirrored)


def text_acts(stages: Stages, boundary: int, texts: Sequence[str], tokenize, *, cache: FeatureCache, device,
              fingerprint: str, batch_size: int = 128, progress: bool = True, desc: str = "captions") -> Acts:
    if boundary == 0:
        return TextActs(texts, tokenize)
    key = sha256_text(fingerprint, "text-prefix", str(boundary), stages[boundary - 1].name, *texts)
    ragged = bool(texts) and not isinstance(_text_prefix(stages, boundary, texts[:1], tokenize, device, 1), np.ndarray)
    stored = _prefix_store(cache, key, len(texts), lambda a, b: _text_prefix(stages, boundary, texts[a:b], tokenize,
                                                                             device, batch_size),
                           f"{desc} (frozen prefix)", progress, ragged=ragged, chunk_size=4096)
    return TokenActs(stored.features, stored.offsets) if ragged else ArrayActs(stored.features)


@torch.inference_mode()
def embed_side(stages: Stages, boundary: int, acts: Acts, device, batch_size: int = 256) -> torch.Tensor:
    """Normalised embeddings of every item of a side (runs the stages after ``boundary``)."""
    out = []
    for s in range(0, len(acts), batch_size):
        idx = np.arange(s, min(s + batch_size, len(acts)))
        out.append(F.normalize(stages.run(acts.batch(idx, device), boundary).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)

