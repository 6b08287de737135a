"""Images/s and captions/s: the cliplab engine vs a naive eager loop, with parity.

The naive loop is what tutorials and course projects write: per batch, open each file with PIL,
apply torchvision transforms, stack, run the eager model under no_grad (NCHW); captions in file
order, 32 at a time, padded to the longest in the batch. The engine: the image feed (decoding, resizing
and, on the CPU, normalisation in worker processes; batches in shared memory), ONNX Runtime (exported once
and cached; the export is timed on its own), length-sorted caption batches with one single-threaded batch in
flight per core. The image pair runs ``--repeats`` times, alternating; each side keeps its best run.

    python bench/embed.py [--data ../shared/data/flickr8k] [--images 768] [--captions 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, per_second, save, table  # noqa: E402

from cliplab.data import read_flickr8k  # noqa: E402
from cliplab.embed import FeatureCache, embed_images, embed_texts  # noqa: E402
from cliplab.embed.backends import OnnxImageTower, OnnxTextTower  # noqa: E402
from cliplab.models import ImageTower, TextTower  # noqa: E402


def naive_images(tower: ImageTower, paths, batch_size: int) -> np.ndarray:
    tf = T.Compose([T.Resize(tower.image_size), T.CenterCrop(tower.image_size), T.ToTensor(),
                    T.Normalize(tower.mean, tower.std)])
    model = tower.model.eval()
    out = []
    for s in range(0, len(paths), batch_size):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[s:s + batch_size]])
        with torch.no_grad():
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out)


def naive_captions(tower: TextTower, texts, batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(texts), batch_size):
        batch = tower.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=64,
                                return_tensors="pt")
        with torch.no_grad():
            hidden = tower.model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * m).sum(1) / m.sum(1)).numpy())
    return np.concatenate(out)


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--captions", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=32, help="naive loop batch size (images and captions)")
    ap.add_argument("--int8", action="store_true", help="also measure dynamic int8 quantisation")
    ap.add_argument("--repeats", type=int, default=2,
                    help="image runs of each side, alternating; the best of each is kept (the least disturbed)")
    args = ap.parse_args()
    ds = read_flickr8k(args.data, "all")
    paths = ds.image_paths()[: args.images]
    texts = ds.captions[: args.captions]
    image_tower, text_tower = ImageTower(), TextTower()
    res: dict = {"n_images": len(paths), "n_captions": len(texts), "machine": machine(),
                 "load_average_before": os.getloadavg()}

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()  # the one-time export, into the cache the engine runs below will use
        OnnxImageTower(image_tower, Path(tmp) / "a")
        OnnxTextTower(text_tower, Path(tmp) / "a")
        res["onnx_export_seconds_once"] = time.perf_counter() - t
        naive_images(image_tower, paths[:32], args.batch_size)  # warm-up both paths
        naive_captions(text_tower, texts[:64], args.batch_size)

        n_img, n_txt = len(paths), len(texts)

        def engine_images(store: str, backend: str):
            return lambda: embed_images(image_tower, paths, cache=FeatureCache(Path(tmp) / store), backend=backend,
                                        progress=False).features

        def engine_texts(store: str, backend: str):
            return lambda: embed_texts(text_tower, texts, cache=FeatureCache(Path(tmp) / store), backend=backend,
                                       progress=False).features

        runs: dict[str, list[float]] = {"naive_images_per_s": [], "engine_images_per_s": []}
        for r in range(max(1, args.repeats)):  # alternating; the engine's cache is fresh each time (store a, a1, ...)
            ref_img = per_second(res, "naive_images_per_s", n_img, lambda: naive_images(image_tower, paths, args.batch_size))
            eng_img = per_second(res, "engine_images_per_s", n_img, engine_images("a" + (str(r) if r else ""), "onnx"))
            for key in runs:
                runs[key].append(res[key])
        res.update({key: max(v) for key, v in runs.items()}, image_runs=runs)
        ref_txt = per_second(res, "naive_captions_per_s", n_txt, lambda: naive_captions(text_tower, texts, args.batch_size))
        eng_txt = per_second(res, "engine_captions_per_s", n_txt, engine_texts("a", "onnx"))
        tor_img = per_second(res, "engine_torch_images_per_s", n_img, engine_images("b", "torch"))
        res["image_parity_min_cosine"] = float(cosine(ref_img, eng_img).min())
        res["image_parity_max_abs"] = float(np.abs(ref_img - eng_img).max())
        res["image_torch_backend_min_cosine"] = float(cosine(ref_img, tor_img).min())
        res["caption_parity_min_cosine"] = float(cosine(ref_txt, eng_txt).min())
        res["caption_parity_max_abs"] = float(np.abs(ref_txt - eng_txt).max())
        if args.int8:
            q_img = per_second(res, "int8_images_per_s_incl_quantisation", n_img, engine_images("c", "onnx-int8"))
            res["int8_image_mean_cosine"] = float(cosine(ref_img, q_img).mean())
            q_txt = engine_texts("c", "onnx-int8")()
            res["int8_caption_mean_cosine"] = float(cosine(ref_txt, q_txt).mean())

    res["images_speedup"] = res["engine_images_per_s"] / res["naive_images_per_s"]
    res["captions_speedup"] = res["engine_captions_per_s"] / res["naive_captions_per_s"]
    print(res["machine"])
    print(table([
        ("images/s", f"{res['naive_images_per_s']:.1f}", f"{res['engine_images_per_s']:.1f}",
         f"{res['images_speedup']:.2f}x", f"{res['image_parity_min_cosine']:.6f}"),
        ("captions/s", f"{res['naive_captions_per_s']:.1f}", f"{res['engine_captions_per_s']:.1f}",
         f"{res['captions_speedup']:.2f}x", f"{res['caption_parity_min_cosine']:.6f}"),
    ], ("what", "naive eager loop", "cliplab engine (ONNX)", "speedup", "min cosine vs naive")))
    res["load_average_after"] = os.getloadavg()
    print(f"torch-eager engine backend (channels-last, inference_mode, feed workers): "
          f"{res['engine_torch_images_per_s']:.1f} images/s; one-time ONNX export {res['onnx_export_seconds_once']:.1f}s")
    save("embed", res)


if __name__ == "__main__":
    main()
