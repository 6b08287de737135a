"""Turn images and captions into frozen-tower features, through the feature cache.

Decoding and preprocessing run in background threads while the model computes; captions are
encoded in length-sorted batches (less padding) and returned in input order. The encoder is chosen by
``backend`` (see :mod:`cliplab.embed.backends`) and only built when something must be computed.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cliplab.data.images import ImageFiles, ImageSet
from cliplab.embed.backends import OnnxImageTower, OnnxTextTower, resolve_backend
from cliplab.embed.cache import CachedFeatures, FeatureCache
from cliplab.errors import CliplabError, ConfigError
from cliplab.models.base import BatchStreamEncoder, OnnxExportable, TokenCounting
from cliplab.utils import autocast, autocast_dtype, sha256_text


class _Decoder:
    """Decodes and preprocesses images; a bad one yields ``ok=False`` and its message instead of raising."""

    def __init__(self, images: ImageSet, transform, size: int) -> None:
        self.images, self.transform, self.size = images, transform, size

    def batch(self, indices: range) -> tuple[torch.Tensor, list[bool], list[str]]:
        tensors, ok, messages = [], [], []
        for i in indices:
            try:
                tensors.append(self.transform(self.images.load(i)))
                ok.append(True)
                messages.append("")
            except CliplabError as exc:
                tensors.append(torch.zeros(3, self.size, self.size))
                ok.append(False)
                messages.append(str(exc))
        return torch.stack(tensors), ok, messages


def prefetched_batches(decoder: _Decoder, start: int, stop: int, batch_size: int, workers: int):
    """Yield decoded batches in order while the next ones decode in background threads (PIL and the
    transforms release the GIL), keeping at most ``workers + 1`` batches in memory."""
    ranges = [range(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    if workers <= 0:
        for r in ranges:
            yield r, decoder.batch(r)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque((r, pool.submit(decoder.batch, r)) for r in ranges[: workers + 1])
        next_index = len(pending)
        while pending:
            r, fut = pending.popleft()
            if next_index < len(ranges):
                pending.append((ranges[next_index], pool.submit(decoder.batch, ranges[next_index])))
                next_index += 1
            yield r, fut.result()


def default_workers() -> int:
    """Decode threads: one per spare core, at least one (decoding overlaps the model either way)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _exportable(tower) -> bool:
    """Whether the ONNX backends may export ``tower`` (it declares :class:`~cliplab.models.base.OnnxExportable`)."""
    return isinstance(tower, OnnxExportable) and bool(tower.onnx_exportable)


def _cache_fingerprint(tower, backend: str, device: torch.device) -> str:
    """The tower's fingerprint, plus what changes its numbers: int8 quantisation, or the half-precision
    dtype of the autocast policy on CUDA (bf16/fp16 features never share entries with fp32 ones)."""
    fp = tower.fingerprint()
    if backend == "onnx-int8" and _exportable(tower):
        fp = sha256_text(fp, "int8")
    dtype = autocast_dtype(device)
    return sha256_text(fp, f"autocast-{dtype}") if dtype is not None else fp


class _LazyEncoder:
    """Builds the backend's encoder on first use, so a fully cached run never exports or loads anything."""

    def __init__(self, tower, backend: str, device: torch.device, cache: FeatureCache, onnx_cls,
                 channels_last: bool = False) -> None:
        self.tower, self.device, self.cache, self.onnx_cls = tower, device, cache, onnx_cls
        self.channels_last = channels_last  # image towers on CPU: NHWC convolutions
        chosen = resolve_backend(backend, device)
        self.use_onnx = chosen.startswith("onnx") and device.type == "cpu" and _exportable(tower)
        self.quantize = chosen == "onnx-int8"
        self._encoder = None

    def get(self):
        if self._encoder is None:
            if self.use_onnx:
                self._encoder = self.onnx_cls(self.tower, self.cache.root, quantize=self.quantize)
            else:
                # outside inference mode: converted weights must stay ordinary tensors, or the caller's tower
                # could never be trained afterwards (inference tensors refuse requires_grad)
                with torch.inference_mode(False):
                    self._encoder = self.tower.eval().to(self.device)
                    if self.device.type == "cpu" and self.channels_last:
                        self._encoder = self._encoder.to(memory_format=torch.channels_last)
        return self._encoder


class ImageChunkEncoder:
    """Features of images ``[start, stop)`` of a set (decode in threads, encode with the chosen backend): the
    unit of work of the feature store, run in this process or by a distributed engine's workers."""

    def __init__(self, tower, images: ImageSet, *, cache: FeatureCache, batch_size: int = 64,
                 num_workers: int | None = None, device: str | torch.device = "cpu", on_error: str = "raise",
                 backend: str = "auto") -> None:
        self.device = torch.device(device)
        self.encoder = _LazyEncoder(tower, backend, self.device, cache, OnnxImageTower, channels_last=True)
        self.transform, self.size = tower.transform(), tower.image_size
        if isinstance(images, ImageFiles) and images.draft_size is None:
            images = images.with_draft(self.size)  # decode big JPEGs at reduced scale; same cache key
        self.images, self.batch_size, self.on_error = images, batch_size, on_error
        self.workers = default_workers() if num_workers is None else num_workers

    @torch.inference_mode()
    def __call__(self, start: int, stop: int):
        model = self.encoder.get()
        decoder = _Decoder(self.images, self.transform, self.size)
        feats, valid, errors = [], [], []
        for indices, (batch, ok, messages) in prefetched_batches(decoder, start, stop, self.batch_size, self.workers):
            for i, good, msg in zip(indices, ok, messages):
                if not good:
                    if self.on_error == "raise":
                        raise CliplabError(msg)
                    errors.append(f"{i}\t{msg}")
            batch = batch.to(self.device, non_blocking=True)
            if self.device.type == "cpu" and not self.encoder.use_onnx:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(self.device):
                feats.append(model(batch).float().cpu().numpy())
            valid.append(np.asarray(ok, dtype=bool))
        return np.concatenate(feats), np.concatenate(valid), errors


def image_cache_key(tower, images: ImageSet, cache: FeatureCache, backend: str, device) -> tuple[str, str]:
    """``(fingerprint, key)`` of a tower's features of an image set in the store (the same for every engine)."""
    device = torch.device(device)
    fingerprint = _cache_fingerprint(tower, resolve_backend(backend, device), device)
    return fingerprint, cache.key(fingerprint, images.keys(), extra="image-v1")


@torch.inference_mode()
def embed_images(tower: torch.nn.Module, images: Sequence[Path] | ImageSet, *, cache: FeatureCache | None = None,
                 batch_size: int = 64, num_workers: int | None = None, device: str | torch.device = "cpu",
                 on_error: str = "raise", progress: bool = True, desc: str = "images",
                 backend: str = "auto", engine: str = "local", ray_address: str | None = None,
                 ray_actors: int = 2, content_chunks: bool = False) -> CachedFeatures:
    """Pooled image-tower features (cached); corrupt/missing images raise or are marked invalid.
    ``engine="ray"`` computes the missing chunks on a Ray cluster (see :mod:`cliplab.embed.ray_engine`);
    the store entry is the same either way. ``content_chunks`` keys the resumable chunks by their images
    (an interrupted run whose image list then changes reuses the finished chunks)."""
    images = images if isinstance(images, ImageSet) else ImageFiles(images)
    cache = cache or FeatureCache()
    run_chunks = None
    if engine == "ray":
        from cliplab.embed.ray_engine import ray_chunk_runner

        if not isinstance(images, ImageFiles):
            raise ConfigError("--engine ray reads image files (not in-memory arrays)")
        run_chunks = ray_chunk_runner(tower, images.paths, cache_root=cache.root, batch_size=batch_size,
                                      on_error=on_error, backend=backend, actors=ray_actors, address=ray_address,
                                      max_pixels=images.max_pixels, formats=images.formats)
    elif engine != "local":
        raise ConfigError(f"engine must be local or ray, not {engine!r}")
    fingerprint, key = image_cache_key(tower, images, cache, backend, device)
    compute = ImageChunkEncoder(tower, images, cache=cache, batch_size=batch_size, num_workers=num_workers,
                                device=device, on_error=on_error, backend=backend)
    return cache.get_or_compute("image", key, len(images), compute, desc=desc, progress=progress,
                                meta={"tower": fingerprint, "n_images": len(images)}, run_chunks=run_chunks,
                                item_keys=images.content_keys() if content_chunks else None)


def text_lengths(tower, texts: Sequence[str]) -> list[int]:
    """Token counts when the tower counts tokens (:class:`~cliplab.models.base.TokenCounting`: exact padding),
    else character counts."""
    return tower.token_lengths(list(texts)) if isinstance(tower, TokenCounting) else [len(t) for t in texts]


def encode_texts_sorted(encode, texts: Sequence[str], batch_size: int, lengths: Sequence[int] | None = None,
                        encode_batches=None) -> np.ndarray:
    """``encode`` over length-sorted batches (least padding); rows returned in input order.
    ``encode_batches`` (iterable of text lists -> features in order) replaces ``encode`` when given."""
    order = np.argsort(lengths if lengths is not None else [len(t) for t in texts], kind="stable")
    index_batches = [order[b:b + batch_size] for b in range(0, len(texts), batch_size)]
    text_batches = ([texts[i] for i in idx] for idx in index_batches)
    out = None
    for idx, z in zip(index_batches, (encode_batches or (lambda bs: map(encode, bs)))(text_batches)):
        z = z.float().cpu().numpy()
        if out is None:
            out = np.zeros((len(texts), z.shape[1]), dtype=np.float32)
        out[idx] = z
    return out if out is not None else np.zeros((0, 0), np.float32)


@torch.inference_mode()
def embed_texts(tower: torch.nn.Module, texts: Sequence[str], *, cache: FeatureCache | None = None,
                batch_size: int | None = None, device: str | torch.device = "cpu", progress: bool = True,
                desc: str = "captions", backend: str = "auto", chunk_size: int = 4096) -> CachedFeatures:
    """Pooled text-tower features for ``texts`` (cached); batches sorted by length, results in input order.

    Default batch: 32 on CPU (short sorted batches use 2 cores best), 256 on CUDA.
    """
    cache = cache or FeatureCache()
    device = torch.device(device)
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    encoder = _LazyEncoder(tower, backend, device, cache, OnnxTextTower)
    fingerprint = _cache_fingerprint(tower, resolve_backend(backend, device), device)
    key = cache.key(fingerprint, [sha256_text(*texts)], extra="text-v1")

    def compute(start: int, stop: int):
        model = encoder.get()
        with autocast(device):
            chunk = list(texts[start:stop])
            out = encode_texts_sorted(model.encode, chunk, batch_size, text_lengths(tower, chunk),
                                      model.encode_batches if isinstance(model, BatchStreamEncoder) else None)
        return out, np.ones(stop - start, dtype=bool), []

    return cache.get_or_compute("text", key, len(texts), compute, desc=desc, progress=progress,
                                meta={"tower": fingerprint, "n_texts": len(texts)}, chunk_size=chunk_size)
