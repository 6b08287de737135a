"""Int8 captioning quality: SmoothQuant's alpha chosen on Flickr8k dev, then float32 vs int8 on test, once.

    python bench/caption_int8.py [--captioner runs/examples/04_captioning/lora] [--dev 512] [--test 1000]

Protocol: the captioner's LM is calibrated on the caption run's first training images (as ``cliplab index``
does: :func:`cliplab.serve.captions.calibration_images`), then quantised (:func:`cliplab.caption.quantize.
quantize_int8`) for each alpha; every variant decodes greedily (``cliplab index``'s settings, 512 images per
batch) the first ``--dev`` Flickr8k dev images, scored by CIDEr-D (pycocoevalcap, simple tokenizer) against
their five references, beside float32 on the same images. The alpha with the best dev CIDEr-D is then run once
on the first ``--test`` test images, beside float32. Decoding images/s is printed too (decoding alone).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.5, 0.6, 0.7, 0.8)


def split_features(captioner, data: Path, split: str, n: int):
    from cliplab.caption.visual import visual_features
    from cliplab.data.captions import load_caption_dataset
    from cliplab.data.images import ImageFiles
    from cliplab.embed.cache import FeatureCache

    ds = load_caption_dataset(data, split)
    with tempfile.TemporaryDirectory() as tmp:
        f = visual_features(captioner.tower, ImageFiles(ds.image_paths()[:n]), captioner.model.config.grid,
                            cache=FeatureCache(tmp), progress=False)
    refs = {str(i): [ds.captions[c] for c in ds.captions_of(i)] for i in range(n)}
    return torch.from_numpy(f.grid.astype(np.float32)), torch.from_numpy(f.pooled.astype(np.float32)), refs


def score(model, feats, base=None) -> dict:
    from cliplab.caption.metrics import cider_d
    from cliplab.serve.captions import DECODE

    grid, pooled, refs = feats
    t, ids = time.perf_counter(), []
    for s in range(0, len(grid), 512):
        ids += model.greedy(grid[s:s + 512], pooled[s:s + 512], max_new_tokens=DECODE["max_new_tokens"])
    seconds = time.perf_counter() - t
    out = {"cider_d": cider_d(refs, {str(i): model.decode(x) for i, x in enumerate(ids)})[0],
           "images_per_s": len(grid) / seconds, "ids": ids}
    if base is not None:
        out["identical"] = sum(a == b for a, b in zip(ids, base["ids"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captioner", type=Path, default=ROOT / "runs" / "examples" / "04_captioning" / "lora")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k")
    parser.add_argument("--dev", type=int, default=512)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()

    from cliplab.caption.quantize import SMOOTHING_ALPHA, activation_maxima, quantize_int8
    from cliplab.serve.captions import DECODE, PhotoCaptioner, calibration_images

    captioner = PhotoCaptioner(args.captioner, precision="float32")
    model = captioner.model
    from cliplab.caption.visual import visual_features
    from cliplab.data.images import ImageFiles
    from cliplab.embed.cache import FeatureCache

    with tempfile.TemporaryDirectory() as tmp:
        f = visual_features(captioner.tower, ImageFiles(calibration_images(args.captioner)), model.config.grid,
                            cache=FeatureCache(tmp), progress=False)
    calib = (torch.from_numpy(f.grid.astype(np.float32)), torch.from_numpy(f.pooled.astype(np.float32)))
    maxima = activation_maxima(model, *calib, max_new_tokens=DECODE["max_new_tokens"])

    def int8(alpha: float):
        m = copy.deepcopy(model)
        return quantize_int8(m, maxima, alpha)

    dev = split_features(captioner, args.data, "dev", args.dev)
    rows, result = [], {"captioner": str(args.captioner), "dev_images": args.dev, "test_images": args.test,
                        "calibration_images": len(calib[0]), "dev": {}, "test": {}}
    base = score(model, dev)
    result["dev"]["float32"] = {k: v for k, v in base.items() if k != "ids"}
    rows.append(("dev", "float32", f"{base['cider_d']:.2f}", f"{base['images_per_s']:.1f}", "-"))
    for alpha in ALPHAS:
        got = score(int8(alpha), dev, base)
        result["dev"][f"int8_alpha{alpha}"] = {k: v for k, v in got.items() if k != "ids"}
        rows.append(("dev", f"int8, alpha {alpha}", f"{got['cider_d']:.2f}", f"{got['images_per_s']:.1f}",
                     f"{got['identical']}/{args.dev}"))
        print(rows[-1], flush=True)
    best = max(ALPHAS, key=lambda a: result["dev"][f"int8_alpha{a}"]["cider_d"])
    result["chosen_alpha"] = best
    if best != SMOOTHING_ALPHA:
        print(f"NOTE: dev chooses alpha {best}, the library uses {SMOOTHING_ALPHA}")

    test = split_features(captioner, args.data, "test", args.test)
    base = score(model, test)
    got = score(int8(best), test, base)
    result["test"] = {"float32": {k: v for k, v in base.items() if k != "ids"},
                      f"int8_alpha{best}": {k: v for k, v in got.items() if k != "ids"}}
    rows.append(("test", "float32", f"{base['cider_d']:.2f}", f"{base['images_per_s']:.1f}", "-"))
    rows.append(("test", f"int8, alpha {best} (dev's choice)", f"{got['cider_d']:.2f}",
                 f"{got['images_per_s']:.1f}", f"{got['identical']}/{args.test}"))
    print(machine())
    print(table(rows, ("split", "decoder", "CIDEr-D", "images/s (decoding)", "identical to float32")))
    save("caption_int8", result)


if __name__ == "__main__":
    main()
