"""The one image feed: images decoded and resized in worker processes, normalised on the model's device.

Embedding (:mod:`cliplab.embed.extract`), the photo index (through it) and tower training
(:mod:`cliplab.train.inputs`) read pixels through :class:`ImageFeed`. A torchvision ``Compose`` is split at its
``ToTensor`` (:func:`split_transform`): the PIL steps before it run in the workers; for a GPU their uint8 CHW
pixels cross the process boundary (a quarter of float32's bytes; pinned, copied ``non_blocking``) and
``ToTensor``'s scaling and the ``Normalize`` after it run on the GPU. When the model runs on the CPU the workers
are on its device: they scale and normalise too, image by image with the same float32 operations (the same
numbers bit for bit), so that work is spread over the cores instead of serialising in the model's process.
Batches cross in shared memory (only a handle goes through the pool's pipe). Any other transform runs whole in
the workers. JPEGs may be decoded on the GPU in batches (``gpu_decode``; other formats and failures fall back to
the workers' PIL path).

Workers are a process pool (``fork`` where the platform has it, else ``spawn``: the image set and the transform
are picklable) started on first use and kept until the feed is closed or collected; ``num_workers=0`` decodes in
this process, as does a job of fewer than ``INLINE_BELOW`` images before the pool has started (``batches``,
``map``, and the first ``INLINE_FIRST_BATCHES`` calls of ``batch``: a longer run's later batches start the pool).
Batches come back in order; an item that cannot be read fails alone (``FeedBatch.ok`` / ``errors``, as the old
threaded decoder reported), and the workers hash each file they decode (:func:`cliplab.utils.hash_file`) so
callers can check it against the content key the features are stored under.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import weakref
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from cliplab.data.images import ImageFiles, ImageSet, preprocess_geometry
from cliplab.errors import CliplabError, ConfigError
from cliplab.utils import hash_file, remember_sha256

StatDigest = tuple[tuple[str, int, int, int], str]  # (path, size, mtime_ns, inode), SHA-256 of the bytes


def _in_ray_actor() -> bool:
    """Whether this process is a Ray actor (its actors are the parallelism there: no pool of our own)."""
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:  # noqa: BLE001 - any Ray API difference: not an actor as far as we can tell
        return False


def default_workers() -> int:
    """Decode processes: one per core this process may run on, shared among the processes torchrun started on
    this machine (none inside a Ray actor)."""
    if _in_ray_actor():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


# fewer images than this are decoded in the calling process: forking the workers (~80 ms on 2 cores) costs more
# than decoding them (a query image, a handful of files, a small training batch)
INLINE_BELOW = 32
INLINE_FIRST_BATCHES = 8  # ... and so are a run's first 8 small training batches (a short run never forks)


def default_batch_size(device: str | torch.device) -> int:
    """Images per batch: 64 on the CPU, 256 on a GPU (kernels need wide batches to fill it)."""
    return 256 if torch.device(device).type == "cuda" else 64


@dataclass(frozen=True)
class Preprocess:
    """A transform split at the process boundary: ``cpu`` runs in the workers; with ``uint8`` it ends in PIL
    pixels sent as uint8 and ``/ 255`` then ``normalize(mean, std)`` (when given) run on the device.
    ``resize`` = ``(short side, interpolation, crop)`` when ``cpu`` is exactly a resize and a centre crop
    (what a GPU-decoded JPEG can be given on the GPU)."""

    cpu: Callable
    uint8: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    size: int
    resize: tuple[int, Any, int] | None = None


def _gpu_geometry(steps: list) -> tuple[int, Any, int] | None:
    """``(short side, interpolation, crop)`` when ``steps`` are a plain Resize then CenterCrop (RGB converters
    aside), else None."""
    steps = [s for s in steps if not (callable(s) and getattr(s, "__name__", "") == "_convert_to_rgb")]
    if len(steps) != 2 or type(steps[0]) is not T.Resize or type(steps[1]) is not T.CenterCrop:
        return None
    resize, crop = steps
    if not isinstance(resize.size, int) or resize.max_size is not None:
        side = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else None
        if side is None or resize.max_size is not None:
            return None
    else:
        side = resize.size
    c = crop.size if isinstance(crop.size, int) else crop.size[0]
    if not isinstance(crop.size, int) and (len(crop.size) != 2 or crop.size[0] != crop.size[1]):
        return None
    return int(side), resize.interpolation, int(c)


def split_transform(transform: Callable) -> Preprocess:
    """Split an eval or training transform at ``ToTensor`` (see the module docstring)."""
    steps = list(getattr(transform, "transforms", None) or [])
    size = preprocess_geometry(transform)[0]
    at = [i for i, s in enumerate(steps) if type(s) is T.ToTensor]
    if len(at) == 1:
        before, after = steps[:at[0]], steps[at[0] + 1:]
        if not after:
            return Preprocess(T.Compose(before), True, None, None, size, _gpu_geometry(before))
        if len(after) == 1 and type(after[0]) is T.Normalize:
            mean, std = (tuple(float(v) for v in after[0].mean), tuple(float(v) for v in after[0].std))
            return Preprocess(T.Compose(before), True, mean, std, size, _gpu_geometry(before))
    return Preprocess(transform, False, None, None, size)


@dataclass
class FeedBatch:
    """Decoded images ``indices`` of a set: ``pixels [N, C, H, W]`` float on the device (ready for the model;
    zeros where an item failed), ``ok[k]`` False where item k failed and ``errors[k]`` says why, ``digests[k]``
    the (stat, SHA-256) of its file when the feed hashes files."""

    indices: list[int]
    pixels: torch.Tensor
    ok: list[bool]
    errors: list[str]
    digests: list[StatDigest | None] = field(default_factory=list)


@dataclass
class _Decoded:
    """What crosses the process boundary for a list of items (raw: position -> JPEG bytes for the GPU)."""

    pixels: np.ndarray | torch.Tensor  # a shared-memory tensor from a worker
    ok: list[bool]
    errors: list[str]
    digests: list[StatDigest | None]
    raw: dict[int, np.ndarray]


def _concat(parts: list[_Decoded]) -> _Decoded:
    raw, offset = {}, 0
    for p in parts:
        raw.update({offset + k: v for k, v in p.raw.items()})
        offset += len(p.ok)
    return _Decoded(np.concatenate([np.asarray(p.pixels) for p in parts]), [o for p in parts for o in p.ok],
                    [e for p in parts for e in p.errors], [d for p in parts for d in p.digests], raw)


class _Seeded:
    """Seed the RNGs torchvision's random transforms draw from, restoring this process's state after."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        if self.seed is not None:
            self.fork = torch.random.fork_rng(devices=[])
            self.fork.__enter__()
            self.py_state = random.getstate()
            torch.default_generator.manual_seed(self.seed)  # the CPU generator only: CUDA's stays the run's
            random.seed(self.seed)

    def __exit__(self, *exc) -> None:
        if self.seed is not None:
            random.setstate(self.py_state)
            self.fork.__exit__(*exc)


class _Work:
    """What a worker does for a list of items (picklable: the image set and the CPU steps of each transform)."""

    def __init__(self, images: ImageSet, preps: dict[str, Preprocess], digests: bool, raw_jpeg: bool,
                 scale: bool = False) -> None:
        self.images, self.preps, self.digests, self.raw_jpeg = images, preps, digests, raw_jpeg
        self.scale = scale  # uint8 pixels scaled and normalised here (the model runs on this CPU)
        self.shared = False  # set in the workers

    def __call__(self, indices: Sequence[int], seeds: Sequence[int] | None = None, which: str = "eval") -> _Decoded:
        prep = self.preps[which]
        pixels: list[np.ndarray | None] = []
        ok, errors, digests, raw = [], [], [], {}
        for pos, i in enumerate(indices):
            digest = self._digest(i) if self.digests else None
            try:
                data = self._jpeg(i) if self.raw_jpeg and which == "eval" else None
                if data is not None:
                    raw[pos], arr = data, None
                else:
                    with _Seeded(None if seeds is None else seeds[pos]):
                        arr = self._pixels(prep, prep.cpu(self.images.load(i)))
                pixels.append(arr)
                ok.append(True)
                errors.append("")
            except CliplabError as exc:
                pixels.append(None)
                ok.append(False)
                errors.append(str(exc))
            digests.append(digest)
        return _Decoded(self._stack(prep, pixels), ok, errors, digests, raw)

    @staticmethod
    def _pixels(prep: Preprocess, out) -> np.ndarray:
        if not prep.uint8:
            return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
        arr = np.asarray(out)
        if arr.dtype != np.uint8:
            raise ConfigError(f"the image transform's PIL steps gave {arr.dtype} pixels; the feed sends uint8")
        return (arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)

    def _stack(self, prep: Preprocess, pixels: list[np.ndarray | None]) -> np.ndarray | torch.Tensor:
        """The batch: uint8, or float32 scaled and normalised here when ``self.scale``; in a worker a tensor in
        shared memory (only its handle crosses the process boundary: pickling megabytes of pixels through the
        pool's pipe would cap the feed at one worker's speed)."""
        good = next((p for p in pixels if p is not None), None)
        shape = (len(pixels), *(good.shape if good is not None else (3, prep.size, prep.size)))
        as_uint8 = prep.uint8 and not self.scale
        if self.shared:
            batch = torch.zeros(shape, dtype=torch.uint8 if as_uint8 else torch.float32).share_memory_()
            out = batch.numpy()
        else:
            out = batch = np.zeros(shape, dtype=np.uint8 if as_uint8 else np.float32)
        mean, std = ((np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (prep.mean, prep.std))
                     if prep.mean is not None else (None, None))
        for k, p in enumerate(pixels):
            if p is None:
                continue
            if prep.uint8 and self.scale:
                _scale(p, out[k], mean, std)
            else:
                out[k] = p  # a different shape raises, as stacking always did
        return batch

    def _digest(self, i: int) -> StatDigest | None:
        path = self.images.source_file(i)
        try:
            return hash_file(path) if path is not None else None
        except OSError:
            return None  # decoding it reports the error

    def _jpeg(self, i: int) -> np.ndarray | None:
        """The file's bytes when it is a JPEG the GPU may decode (allowed format, within the pixel limit)."""
        from io import BytesIO

        from PIL import Image

        imgs = self.images
        try:
            data = imgs.source_file(i).read_bytes()
            if data[:3] != b"\xff\xd8\xff" or (imgs.formats and "JPEG" not in imgs.formats):
                return None
            with Image.open(BytesIO(data), formats=("JPEG",)) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - unreadable here: the PIL path reports it with its message
            return None
        if imgs.max_pixels is not None and w * h > imgs.max_pixels:
            return None
        return np.frombuffer(data, dtype=np.uint8)


def _scale(src: np.ndarray, dst: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> None:
    """``ToTensor``'s ``/ 255`` then ``Normalize`` of one image's uint8 pixels into ``dst`` (float32): the same
    float32 operations as the transforms, so the same numbers bit for bit (one image stays in the CPU cache:
    several times faster than whole-batch torch ops on a busy 2-core machine)."""
    if src.shape != dst.shape:
        raise ValueError(f"could not broadcast image {src.shape} into the batch's {dst.shape}")
    np.divide(src, np.float32(255), out=dst, dtype=np.float32)
    if mean is not None:
        dst -= mean
        dst /= std


_WORK: _Work | None = None


def _init_worker(work: _Work) -> None:
    global _WORK
    _WORK = work
    work.shared = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)


def _run(indices: list[int], seeds: list[int] | None, which: str) -> _Decoded:
    return _WORK(indices, seeds, which)


def _mp_context():
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


class ImageFeed:
    """Batches of pixels of an image set, decoded in worker processes (see the module docstring).

    ``transform`` is the eval transform, ``train_transform`` an optional augmentation (``batch(..., train=True)``);
    ``batch_size`` defaults per device, ``num_workers`` to the cores, ``prefetch`` batches per worker are decoded
    ahead. ``digests`` hashes each image's file in the worker that decodes it (recorded in the digest table).
    ``gpu_decode`` decodes JPEG files of an :class:`ImageFiles` set on the GPU when the transform is a plain
    resize and centre crop (other formats, and any JPEG the GPU refuses, take the PIL path)."""

    def __init__(self, images: ImageSet, transform: Callable, *, device: str | torch.device = "cpu",
                 batch_size: int | None = None, num_workers: int | None = None, prefetch: int = 2,
                 train_transform: Callable | None = None, digests: bool = False, gpu_decode: bool = False,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.images = images
        preps = {"eval": split_transform(transform)}
        if train_transform is not None:
            preps["train"] = split_transform(train_transform)
        self.prep = preps["eval"]
        self.batch_size = int(batch_size or default_batch_size(self.device))
        self.workers = default_workers() if num_workers is None else max(0, int(num_workers))
        self.prefetch, self.channels_last = max(1, int(prefetch)), channels_last
        self.gpu_decode = bool(gpu_decode and self.device.type == "cuda" and isinstance(images, ImageFiles)
                               and self.prep.uint8 and self.prep.resize is not None)
        self._work = _Work(images, preps, digests, self.gpu_decode, scale=self.device.type == "cpu")
        self._pool: ProcessPoolExecutor | None = None
        self._batches = 0  # calls of batch()
        self._finalizer: weakref.finalize | None = None

    # -- the worker pool
    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_mp_context(), initializer=_init_worker,
                                             initargs=(self._work,))
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def close(self) -> None:
        """Stop the workers (a later batch starts them again)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None

    def __enter__(self) -> "ImageFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _here(self, n: int) -> bool:
        """Whether a job of ``n`` items runs in this process: no workers, or a small job before the pool started."""
        return self.workers == 0 or (self._pool is None and n < INLINE_BELOW)

    def map(self, fn: Callable, items: Sequence) -> list:
        """``map(fn, items)`` in the workers (``fn`` picklable), in order; here when there are none or the pool has
        not started for fewer than ``INLINE_BELOW`` items."""
        if len(items) < 2 or self._here(len(items)):
            return list(map(fn, items))
        return list(self._executor().map(fn, items, chunksize=max(1, len(items) // (4 * self.workers))))

    def _submit(self, indices: list[int], seeds: list[int] | None = None, which: str = "eval") -> Future:
        return self._executor().submit(_run, indices, seeds, which)

    def _result(self, fut: Future, indices: list[int], seeds: list[int] | None = None,
                which: str = "eval") -> _Decoded:
        """A worker's result; when a worker was lost (killed, out of memory) the items are decoded here instead
        (whatever killed it then happens to this process, as with in-process decoding) and the pool restarts."""
        try:
            return fut.result()
        except BrokenProcessPool:
            self.close()
            return self._work(indices, seeds, which)

    # -- batches
    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[FeedBatch]:
        """Eval batches of images ``[start, stop)`` in order, ``prefetch`` per worker decoding ahead."""
        stop = len(self.images) if stop is None else stop
        ranges = (list(range(s, min(s + self.batch_size, stop))) for s in range(start, stop, self.batch_size))
        if self._here(stop - start):
            for r in ranges:
                yield self._finish(r, self._work(r))
            return
        pending = deque((r, self._submit(r)) for r in islice(ranges, self.workers * self.prefetch))
        while pending:
            r, fut = pending.popleft()
            nxt = next(ranges, None)
            if nxt is not None:
                pending.append((nxt, self._submit(nxt)))
            yield self._finish(r, self._result(fut, r))

    def batch(self, indices: Sequence[int], seed: int | None = None, train: bool = False) -> FeedBatch:
        """Images ``indices`` (any order) as one batch, split across the workers; ``train`` applies the training
        transform, item k seeded with ``seed + k`` (the same pixels whatever the number of workers)."""
        idx = [int(i) for i in indices]
        which = "train" if train and "train" in self._work.preps else "eval"
        seeds = None if seed is None else [(int(seed) + k) % (1 << 62) for k in range(len(idx))]
        n = min(self.workers, len(idx))
        self._batches += 1  # the first few small batches are decoded here; a longer run's next ones start the pool
        if n <= 1 or (self._here(len(idx)) and self._batches <= INLINE_FIRST_BATCHES):
            return self._finish(idx, self._work(idx, seeds, which), which)
        bounds = np.linspace(0, len(idx), n + 1).astype(int)
        parts = [(idx[a:b], None if seeds is None else seeds[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        futures = [self._submit(part, part_seeds, which) for part, part_seeds in parts]
        return self._finish(idx, _concat([self._result(f, *part, which) for f, part in zip(futures, parts)]), which)

    # -- on the device
    def _finish(self, indices: list[int], dec: _Decoded, which: str = "eval") -> FeedBatch:
        prep = self._work.preps[which]
        x = dec.pixels if isinstance(dec.pixels, torch.Tensor) else torch.from_numpy(dec.pixels)
        if not self._work.scale:  # uint8 (or a non-splittable transform's floats) to the device, finished there
            x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x.to(self.device)
            if dec.raw:
                x = self._decode_on_gpu(x, indices, dec)
            if prep.uint8:
                x = x.to(torch.float32).div_(255)
                if prep.mean is not None:
                    x = TF.normalize(x, list(prep.mean), list(prep.std), inplace=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fresh = [d for d in dec.digests if d is not None]
        if fresh:
            remember_sha256(fresh)
        return FeedBatch(indices, x, dec.ok, dec.errors, dec.digests)

    def _decode_on_gpu(self, x: torch.Tensor, indices: list[int], dec: _Decoded) -> torch.Tensor:
        """Decode the raw JPEGs of a batch on the GPU (in one call; one by one if that fails), resize and crop
        them there; any the GPU refuses is decoded by PIL here. Returns float pixels 0-255."""
        from torchvision.io import ImageReadMode, decode_jpeg

        x = x.to(torch.float32)
        positions = sorted(dec.raw)
        data = [torch.from_numpy(dec.raw[p].copy()) for p in positions]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = [self._decode_one(d) for d in data]
        side, interpolation, crop = self.prep.resize
        for p, img in zip(positions, images):
            if img is not None:
                img = TF.resize(img.to(torch.float32), side, interpolation=interpolation, antialias=True)
                x[p] = TF.center_crop(img, [crop, crop]).round_().clamp_(0, 255)
                continue
            cpu = _Work(self.images, self._work.preps, digests=False, raw_jpeg=False)([indices[p]])
            dec.ok[p], dec.errors[p] = cpu.ok[0], cpu.errors[0]
            x[p] = torch.from_numpy(cpu.pixels[0]).to(self.device, torch.float32)
        return x

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None
