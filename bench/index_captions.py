"""Captions at index time: images/s of ``cliplab index --captioner``'s captioning against the naive loop.

    python bench/index_captions.py [--captioner RUN] [--images 512] [--naive 32] [--data ../shared/data/flickr8k]

Protocol (``index.captions_per_s``): the first ``--images`` Flickr8k test images, captioned from their files
as ``cliplab index --captioner`` does by default (:class:`cliplab.serve.captions.PhotoCaptioner`, precision
``auto``: int8 on CPU when the run's training images are there for calibration; visual tokens in one tower
pass, then batched greedy decoding where ended captions leave the batch; greedy, at most 30 new tokens, no
repeated 3-grams), timed end to end without the model load and the first call of a build (the tower's ONNX
export; and for int8, once per captioner, the calibration, kept in the cache after). The same path in
float32 (``--caption-precision float32``) is timed in the same run. Beside it, in the same run: the naive loop,
transformers' ``generate`` (greedy, same settings) called one image at a time on the first ``--naive``
images (their visual tokens computed once, batched, and not timed: the loop's decoding alone), and
transformers' ``generate`` on those images in one batch (every row runs to the batch's longest caption). The
captions of the three must be identical (counted). Without ``--captioner`` a small prefix captioner is trained once into
``runs/bench-captioner`` (1,000 Flickr8k training images, 1 epoch; the decoding cost depends on the caption
lengths, printed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def default_captioner(data: Path) -> Path:
    """A small prefix captioner trained once for this bench (reused when it is there)."""
    import cliplab
    from cliplab import rundir

    run = ROOT / "runs" / "bench-captioner"
    if (run / rundir.BEST / rundir.CAPTIONER_WEIGHTS).is_file():
        return run
    subset = cliplab.datasets.caption_subset(data, run.parent / "bench-captioner-data.csv", train=1000, dev=100,
                                            test=100)
    cliplab.caption.train("flickr8k_caption", run_dir=run, evaluate=False, overrides={
        "data.path": str(subset), "model.tuning": "prefix", "train.epochs": 1, "train.warmup_steps": 10,
        "train.dev_images": 100, "clipscore_model": "conse"})
    return run


def sgemm_gflops() -> float:
    """This machine's speed now: GFLOP/s of a 2048x2048 float32 matrix product (it drifts over a day)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    return 2 * 2048**3 * 10 / (time.perf_counter() - t) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captioner", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--naive", type=int, default=32)
    args = parser.parse_args()

    from cliplab.caption.visual import visual_features
    from cliplab.data.captions import load_caption_dataset
    from cliplab.data.images import SAFE_IMAGE_FORMATS, ImageFiles
    from cliplab.embed.cache import FeatureCache
    from cliplab.serve.captions import DECODE, PhotoCaptioner

    run = args.captioner or default_captioner(args.data)
    paths = load_caption_dataset(args.data, "test").image_paths()[: args.images]
    gflops = [sgemm_gflops()]
    timed = {}
    for precision in ("auto", "float32"):
        t = time.perf_counter()
        captioner = PhotoCaptioner(run, precision=precision)
        load_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:  # a build's work folder: the tower's ONNX export is made once
            t = time.perf_counter()
            warm = captioner.captions(paths[:4], [f"warm{i}" for i in range(4)], Path(tmp) / "warm.jsonl",
                                      max_pixels=10**8, formats=SAFE_IMAGE_FORMATS, progress=False)
            first_s = time.perf_counter() - t  # once per build: the ONNX export and session (int8: calibration)
            assert len(warm) == 4
            t = time.perf_counter()
            out = captioner.captions(paths, [str(p) for p in paths], Path(tmp) / "journal.jsonl",
                                     max_pixels=10**8, formats=SAFE_IMAGE_FORMATS, progress=False)
            timed[captioner.precision] = (out, time.perf_counter() - t, load_s, first_s)
    ours, ours_s, load_s, first_s = timed[next(iter(timed))]
    default_precision = next(iter(timed))
    f32, f32_s = timed["float32"][:2]
    model, steps = captioner.model, DECODE["max_new_tokens"]  # the float32 captioner
    lengths = [len(model.tokenizer(ours[str(p)], add_special_tokens=False)["input_ids"]) for p in paths]

    with tempfile.TemporaryDirectory() as tmp:
        feats = visual_features(captioner.tower, ImageFiles(paths[: args.naive]), model.config.grid,
                                cache=FeatureCache(tmp), progress=False)
    grid, pooled = torch.from_numpy(feats.grid.astype(np.float32)), torch.from_numpy(feats.pooled.astype(np.float32))
    t = time.perf_counter()
    naive = [model.hf_generate(grid[i:i + 1], pooled[i:i + 1], beam=1, max_new_tokens=steps)[0]
             for i in range(len(grid))]
    naive_s = time.perf_counter() - t
    t = time.perf_counter()
    batched = model.hf_generate(grid, pooled, beam=1, max_new_tokens=steps)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    fast = model.greedy(grid, pooled, max_new_tokens=steps)
    fast_s = time.perf_counter() - t
    gflops.append(sgemm_gflops())
    naive_text = [model.decode(x) for x in naive]
    same_naive = sum(a == f32[str(p)] for a, p in zip(naive_text, paths))
    same_default = sum(ours[str(p)] == f32[str(p)] for p in paths)
    same_batched = sum(a == b for a, b in zip(naive, batched))
    same_fast = sum(a == b for a, b in zip(naive, fast))

    n, m = len(paths), len(grid)
    result = {
        "captioner": str(run), "images": n, "naive_images": m, "load_seconds": load_s, "first_call_seconds": first_s,
        "precision": default_precision, "captions_per_s": n / ours_s, "float32_captions_per_s": n / f32_s,
        "default_identical_to_float32": same_default, "naive_per_s": m / naive_s, "speedup": (n / ours_s) / (m / naive_s),
        "decode_only": {"naive_per_s": m / naive_s, "transformers_batched_per_s": m / batched_s,
                        "greedy_per_s": m / fast_s},
        "identical_to_naive": {"index_path_float32": same_naive, "transformers_batched": same_batched,
                               "greedy_tokens": same_fast, "of": m},
        "sgemm_gflops_before_after": gflops,
        "caption_tokens": {"mean": float(np.mean(lengths)), "max": int(np.max(lengths))},
        "examples": {Path(p).name: ours[str(p)] for p in paths[:5]},
    }
    print(machine(), f"; 2048^2 sgemm {gflops[0]:.0f} GFLOP/s before, {gflops[1]:.0f} after")
    print(f"captioner {run} (loaded in {load_s:.1f} s, first 4 images {first_s:.1f} s: not timed); captions of {n} Flickr8k test images, "
          f"{np.mean(lengths):.1f} tokens on average (max {np.max(lengths)})")
    print(table([
        (f"cliplab index path, default ({default_precision})", f"{n / ours_s:.1f}", "end to end", n),
        ("cliplab index path, float32", f"{n / f32_s:.1f}", "end to end", n),
        ("naive: transformers generate, one image at a time", f"{m / naive_s:.1f}", "decoding only", m),
        (f"transformers generate, one batch of {m}", f"{m / batched_s:.1f}", "decoding only", m),
        (f"cliplab greedy, one batch of {m}", f"{m / fast_s:.1f}", "decoding only", m),
    ], ("what", "images/s", "timed", "images")))
    print(f"speedup over the naive loop: {result['speedup']:.2f}x (end to end vs its decoding alone); default "
          f"captions identical to float32's: {same_default}/{n}; identical to the naive loop's: float32 index path "
          f"{same_naive}/{m}, batched generate {same_batched}/{m}, greedy {same_fast}/{m}")
    for name, text in result["examples"].items():
        print(f"  {name}: {text}")
    save("index_captions", result)


if __name__ == "__main__":
    main()
