"""GPU figures in one command (well under 8 minutes on one GPU): where the time of image embedding goes.

- ``model_only_images_per_s``: the image tower alone on random batches already on the device (bf16 autocast,
  channels-last on CUDA): the ceiling of any feed;
- ``decode_cpu_workers_images_per_s`` / ``decode_gpu_images_per_s``: the image feed alone (no model), decoding
  in CPU worker processes / JPEGs on the GPU (``--device cuda`` only), batches normalised on the device;
- ``embed_images_per_s`` / ``embed_captions_per_s``: end to end through the engine ``cliplab embed`` runs
  (``embed_images`` / ``embed_texts`` into an empty feature cache, default per-device batch sizes);
  ``embed_gpu_decode_images_per_s`` the same with JPEGs decoded on the GPU;
- ``train_full_tower_images_per_s``: every weight of the image tower trained from pixels through the feed
  (training augmentation, AMP on CUDA, AdamW, InfoNCE against fixed random caption embeddings).

Images: Flickr8k from ``--data`` (else synthetic JPEGs); ``--quick`` (32 images, 64 captions, tiny batches) is the
CPU dry run ``tests/test_feed.py`` runs so the script cannot rot.

    python bench/gpu.py [--device cuda] [--data ../shared/data/flickr8k] [--images 4000] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

from cliplab.data.images import ImageFiles  # noqa: E402
from cliplab.embed.cache import FeatureCache  # noqa: E402
from cliplab.embed.extract import embed_images, embed_texts  # noqa: E402
from cliplab.embed.feed import ImageFeed, default_batch_size, default_workers  # noqa: E402
from cliplab.models import ImageTower, TextTower  # noqa: E402
from cliplab.train.inputs import PixelActs, train_augmentation  # noqa: E402
from cliplab.utils import autocast  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data(args, tmp: Path) -> tuple[list[Path], list[str]]:
    """Flickr8k images and captions when ``--data`` has them, else synthetic JPEGs and captions."""
    folder = Path(args.data)
    paths = sorted((folder / "images").glob("*.jpg"))[: args.images]
    captions: list[str] = []
    if (folder / "captions.txt").is_file():
        lines = (folder / "captions.txt").read_text(encoding="utf-8").splitlines()[1:]
        captions = [line.split(",", 1)[1] for line in lines if "," in line][: args.captions]
    if len(paths) < args.images:
        from PIL import Image

        rng = np.random.default_rng(0)
        (tmp / "synthetic").mkdir()
        paths = []
        for i in range(args.images):
            path = tmp / "synthetic" / f"{i:05d}.jpg"
            noise = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(noise).save(path, quality=90)
            paths.append(path)
    words = ["a", "dog", "runs", "on", "the", "beach", "two", "children", "play", "in", "a", "red", "park"]
    while len(captions) < args.captions:
        captions.append(" ".join(words[: 3 + len(captions) % 10]))
    return paths, captions


def model_only(tower: ImageTower, device: torch.device, batch: int, iters: int) -> float:
    """Images/s of the tower on a batch already on the device (bf16 autocast and channels-last on CUDA)."""
    model = tower.eval().to(device)
    x = torch.randn(batch, 3, tower.image_size, tower.image_size, device=device)
    if device.type == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device):
        model(x)  # warm-up (cuDNN algorithm choice)
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync(device)
    return batch * iters / (time.perf_counter() - t)


def decode_only(images: ImageFiles, tower: ImageTower, device: torch.device, gpu_decode: bool) -> float:
    """Images/s of the feed alone (worker start-up included), batches normalised on the device."""
    t = time.perf_counter()
    with ImageFeed(images, tower.transform(), device=device, gpu_decode=gpu_decode) as feed:
        n = sum(len(b.indices) for b in feed.batches())
    sync(device)
    return n / (time.perf_counter() - t)


def train_full_tower(tower: ImageTower, images: ImageFiles, device: torch.device, batch: int, steps: int) -> float:
    """Images/s of training every weight of the tower from pixels (augmented, AMP on CUDA), after one warm-up
    step; the pixels come through the feed."""
    model = tower.train().to(device)
    head = torch.nn.Linear(tower.output_dim, 256).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-5)
    targets = F.normalize(torch.randn(len(images), 256, generator=torch.Generator().manual_seed(0)), dim=-1)
    acts = PixelActs(images, tower.transform(), train_augmentation(tower.image_size, tower.mean, tower.std))
    rng = np.random.default_rng(0)
    t = 0.0
    for step in range(steps + 1):
        if step == 1:
            sync(device)
            t = time.perf_counter()
        idx = rng.choice(len(images), size=min(batch, len(images)), replace=False)
        x = acts.batch(idx, device, rng)
        with autocast(device):
            z = F.normalize(head(model(x)).float(), dim=-1)
        logits = 20 * z @ targets[idx].to(device).T
        loss = F.cross_entropy(logits, torch.arange(len(idx), device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    acts.feed(device).close()
    return batch * steps / (time.perf_counter() - t)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--images", type=int, default=None, help="default 4000 (quick: 32)")
    ap.add_argument("--captions", type=int, default=None, help="default 20000 (quick: 64)")
    ap.add_argument("--quick", action="store_true", help="a dry run: 32 images, 64 captions, tiny batches")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args()
    args.images = args.images or (32 if args.quick else 4000)
    args.captions = args.captions or (64 if args.quick else 20000)
    device = torch.device(args.device)
    res: dict = {"device": device.type, "machine": machine(), "cores": default_workers(), "n_images": args.images,
                 "n_captions": args.captions, "load_average_before": os.getloadavg(),
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "image_batch": default_batch_size(device)}
    image_tower, text_tower = ImageTower(), TextTower()
    with tempfile.TemporaryDirectory() as tmp:
        paths, captions = data(args, Path(tmp))
        images = ImageFiles(paths).with_draft(image_tower.image_size)
        batch = 8 if args.quick else res["image_batch"]
        res["model_only_images_per_s"] = model_only(image_tower, device, batch, 2 if args.quick else 50)
        res["decode_cpu_workers_images_per_s"] = decode_only(images, image_tower, device, False)
        res["decode_gpu_images_per_s"] = (decode_only(ImageFiles(paths), image_tower, device, True)
                                          if device.type == "cuda" else None)
        for key, gpu in (("embed_images_per_s", False), ("embed_gpu_decode_images_per_s", True)):
            if gpu and device.type != "cuda":
                res[key] = None
                continue
            cache = FeatureCache(Path(tmp) / f"cache-{key}")
            seconds, _ = timed(lambda: embed_images(image_tower, paths, cache=cache, device=device, backend="torch",
                                                    gpu_decode=gpu, progress=False))
            res[key] = len(paths) / seconds
        cache = FeatureCache(Path(tmp) / "cache-text")
        seconds, _ = timed(lambda: embed_texts(text_tower, captions, cache=cache, device=device, backend="torch",
                                               progress=False))
        res["embed_captions_per_s"] = len(captions) / seconds
        res["train_full_tower_images_per_s"] = train_full_tower(image_tower, images, device, 8 if args.quick else 128,
                                                                2 if args.quick else 30)
    res["load_average_after"] = os.getloadavg()
    for key, value in res.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
