"""Turn images and captions into frozen-tower features, through the feature cache.

Images come through the one image feed (:mod:`cliplab.embed.feed`: decoding in worker processes while the model
computes, normalisation on the device) and are keyed by the SHA-256 of their bytes; captions are encoded in
length-sorted batches (less padding; on CUDA the next batch is tokenised while the GPU runs this one) and returned
in input order. The encoder is chosen by ``backend`` (see :mod:`cliplab.embed.backends`) and only built when
something must be computed. On CUDA image towers run channels-last under the bf16 autocast policy, whose dtype
is part of the cache key.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from cliplab.data.images import ImageFiles, ImageSet
from cliplab.embed.backends import OnnxImageTower, OnnxTextTower, resolve_backend
from cliplab.embed.cache import CachedFeatures, FeatureCache
from cliplab.embed.feed import ImageFeed, default_workers
from cliplab.errors import CliplabError, ConfigError
from cliplab.models.base import BatchStreamEncoder, OnnxExportable, TokenCounting
from cliplab.utils import autocast, autocast_dtype, sha256_files, sha256_text

__all__ = ["ImageChunkEncoder", "default_workers", "embed_images", "embed_texts", "image_cache_key"]


def _exportable(tower) -> bool:
    """Whether the ONNX backends may export ``tower`` (it declares :class:`~cliplab.models.base.OnnxExportable`)."""
    return isinstance(tower, OnnxExportable) and bool(tower.onnx_exportable)


def _cache_fingerprint(tower, backend: str, device: torch.device, gpu_decode: bool = False) -> str:
    """The tower's fingerprint, plus what changes its numbers: int8 quantisation, the half-precision dtype of
    the autocast policy on CUDA (bf16/fp16 features never share entries with fp32 ones), JPEGs decoded and
    resized on the GPU."""
    fp = tower.fingerprint()
    if backend == "onnx-int8" and _exportable(tower):
        fp = sha256_text(fp, "int8")
    dtype = autocast_dtype(device)
    fp = sha256_text(fp, f"autocast-{dtype}") if dtype is not None else fp
    return sha256_text(fp, "gpu-decode") if gpu_decode and torch.device(device).type == "cuda" else fp


class _LazyEncoder:
    """Builds the backend's encoder on first use, so a fully cached run never exports or loads anything."""

    def __init__(self, tower, backend: str, device: torch.device, cache: FeatureCache, onnx_cls,
                 channels_last: bool = False) -> None:
        self.tower, self.device, self.cache, self.onnx_cls = tower, device, cache, onnx_cls
        self.channels_last = channels_last  # image towers (eager, CPU or CUDA): NHWC convolutions
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
                    if self.channels_last:
                        self._encoder = self._encoder.to(memory_format=torch.channels_last)
        return self._encoder


class ImageChunkEncoder:
    """Features of images ``[start, stop)`` of a set (decoded by the image feed, encoded with the chosen backend):
    the unit of work of the feature store, run in this process or by a distributed engine's workers. An image
    whose bytes no longer match the digest its features are stored under fails like an unreadable one."""

    def __init__(self, tower, images: ImageSet, *, cache: FeatureCache, batch_size: int | None = None,
                 num_workers: int | None = None, device: str | torch.device = "cpu", on_error: str = "raise",
                 backend: str = "auto", gpu_decode: bool = False) -> None:
        self.device = torch.device(device)
        self.encoder = _LazyEncoder(tower, backend, self.device, cache, OnnxImageTower, channels_last=True)
        if isinstance(images, ImageFiles) and images.draft_size is None:
            images = images.with_draft(tower.image_size)  # decode big JPEGs at reduced scale; same cache key
        self.images, self.on_error = images, on_error
        workers = default_workers() if num_workers is None else num_workers
        self.feed = ImageFeed(images, tower.transform(), device=self.device, batch_size=batch_size,
                              num_workers=workers, digests=isinstance(images, ImageFiles), gpu_decode=gpu_decode)
        self._keys: list[str] | None = None

    def prime_digests(self) -> None:
        """Hash the files the digest table does not know yet, in the feed's workers (the cache key needs them)."""
        if isinstance(self.images, ImageFiles):
            sha256_files(self.images.paths, compute=self.feed.map)

    def expect(self, keys: list[str]) -> None:
        """The content keys the computed features will be stored under (default: read on first use)."""
        self._keys = keys

    def _check(self, i: int, ok: bool, message: str, digest) -> tuple[bool, str]:
        """``(ok, message)`` of item ``i``, failed when the bytes decoded are not those it is keyed by."""
        if ok and digest is not None:
            if self._keys is None:
                self._keys = self.images.keys()
            if self._keys[i] != f"sha256:{digest[1]}":
                return False, f"image changed while it was embedded: {self.images.source_file(i)}"
        return ok, message

    @torch.inference_mode()
    def __call__(self, start: int, stop: int):
        model = self.encoder.get()
        channels_last = not self.encoder.use_onnx
        feats, valid, errors = [], [], []
        for b in self.feed.batches(start, stop):
            checked = [self._check(i, *row) for i, *row in zip(b.indices, b.ok, b.errors,
                                                               b.digests or [None] * len(b.indices))]
            for i, (good, msg) in zip(b.indices, checked):
                if not good:
                    if self.on_error == "raise":
                        raise CliplabError(msg)
                    errors.append(f"{i}\t{msg}")
            x = b.pixels.contiguous(memory_format=torch.channels_last) if channels_last else b.pixels
            with autocast(self.device):
                feats.append(model(x).float().cpu().numpy())
            valid.append(np.asarray([good for good, _ in checked], dtype=bool))
        return np.concatenate(feats), np.concatenate(valid), errors


def image_cache_key(tower, images: ImageSet, cache: FeatureCache, backend: str, device,
                    gpu_decode: bool = False) -> tuple[str, str]:
    """``(fingerprint, key)`` of a tower's features of an image set in the store (the same for every engine)."""
    device = torch.device(device)
    fingerprint = _cache_fingerprint(tower, resolve_backend(backend, device), device, gpu_decode)
    return fingerprint, cache.key(fingerprint, images.keys(), extra="image-v1")


def _adopt_stat_keyed(cache: FeatureCache, images: ImageSet, fingerprint: str, key: str) -> None:
    """Reuse an entry cached under the former path + size + mtime key of the same files (unchanged since)."""
    if (cache.entry_dir("image", key) / "valid.npy").is_file():
        return
    old = images.stat_keys()
    if old is not None:
        cache.adopt("image", cache.key(fingerprint, old, extra="image-v1"), key, len(images))


@torch.inference_mode()
def embed_images(tower: torch.nn.Module, images: Sequence[Path] | ImageSet, *, cache: FeatureCache | None = None,
                 batch_size: int | None = None, num_workers: int | None = None, device: str | torch.device = "cpu",
                 on_error: str = "raise", progress: bool = True, desc: str = "images",
                 backend: str = "auto", engine: str = "local", ray_address: str | None = None,
                 ray_actors: int = 2, content_chunks: bool = False, gpu_decode: bool = False) -> CachedFeatures:
    """Pooled image-tower features (cached under the SHA-256 of each image's bytes); corrupt/missing images raise
    or are marked invalid. ``engine="ray"`` computes the missing chunks on a Ray cluster (see
    :mod:`cliplab.embed.ray_engine`); the store entry is the same either way. ``content_chunks`` keys the
    resumable chunks by their images (an interrupted run whose image list then changes reuses the finished
    chunks). ``batch_size`` defaults per device (64 CPU, 256 CUDA); ``gpu_decode`` decodes JPEGs on CUDA."""
    images = images if isinstance(images, ImageSet) else ImageFiles(images)
    cache = cache or FeatureCache()
    run_chunks = None
    if engine == "ray":
        from cliplab.embed.ray_engine import ray_chunk_runner

        if not isinstance(images, ImageFiles):
            raise ConfigError("--engine ray reads image files (not in-memory arrays)")
        run_chunks = ray_chunk_runner(tower, images.paths, cache_root=cache.root, batch_size=batch_size or 64,
                                      on_error=on_error, backend=backend, actors=ray_actors, address=ray_address,
                                      max_pixels=images.max_pixels, formats=images.formats)
    elif engine != "local":
        raise ConfigError(f"engine must be local or ray, not {engine!r}")
    compute = ImageChunkEncoder(tower, images, cache=cache, batch_size=batch_size, num_workers=num_workers,
                                device=device, on_error=on_error, backend=backend, gpu_decode=gpu_decode)
    compute.prime_digests()
    compute.expect(images.keys())  # what the features are stored under: a file changed after this fails
    fingerprint, key = image_cache_key(tower, images, cache, backend, device, compute.feed.gpu_decode)
    _adopt_stat_keyed(cache, images, fingerprint, key)
    try:
        return cache.get_or_compute("image", key, len(images), compute, desc=desc, progress=progress,
                                    meta={"tower": fingerprint, "n_images": len(images)}, run_chunks=run_chunks,
                                    item_keys=images.content_keys() if content_chunks else None)
    finally:
        compute.feed.close()


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


def _tokenised_ahead(tower, device: torch.device):
    """``encode_batches`` for a torch text tower on CUDA: the next batch is tokenised (and pinned) in a thread
    while the GPU runs this one, so tokenisation is off the critical path."""
    def tokens(texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.pin_memory() for k, v in tower.tokenize(texts, "cpu").items()}

    def run(batches: Iterable[list[str]]) -> Iterator[torch.Tensor]:
        with ThreadPoolExecutor(1) as pool:
            it = iter(batches)
            first = next(it, None)
            ahead = pool.submit(tokens, first) if first is not None else None
            while ahead is not None:
                batch = ahead.result()
                nxt = next(it, None)
                ahead = pool.submit(tokens, nxt) if nxt is not None else None
                yield tower(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})

    return run


def _text_stream(model, device: torch.device):
    """How a chunk's sorted batches are encoded: the backend's own stream, tokenising ahead on CUDA, or None."""
    from cliplab.models.text_tower import TextTower

    if isinstance(model, BatchStreamEncoder):
        return model.encode_batches
    if device.type == "cuda" and isinstance(model, TextTower):
        return _tokenised_ahead(model, device)
    return None


@torch.inference_mode()
def embed_texts(tower: torch.nn.Module, texts: Sequence[str], *, cache: FeatureCache | None = None,
                batch_size: int | None = None, device: str | torch.device = "cpu", progress: bool = True,
                desc: str = "captions", backend: str = "auto", chunk_size: int = 4096) -> CachedFeatures:
    """Pooled text-tower features for ``texts`` (cached); batches sorted by length, results in input order.

    Default batch: 32 on CPU (short sorted batches use 2 cores best), 256 on CUDA (bf16 autocast, the next
    batch tokenised while this one runs).
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
                                      _text_stream(model, device))
        return out, np.ones(stop - start, dtype=bool), []

    return cache.get_or_compute("text", key, len(texts), compute, desc=desc, progress=progress,
                                meta={"tower": fingerprint, "n_texts": len(texts)}, chunk_size=chunk_size)
