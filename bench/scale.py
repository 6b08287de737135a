"""Time and peak memory of embedding + indexing + querying as the gallery grows (synthetic images).

Each size runs in its own process (peak RSS is per process). Images are synthetic 256x256 JPEGs
written to a temporary folder; features go to a memory-mapped store, a FAISS index is built from it,
and 1,000 caption queries are searched.

    python bench/scale.py [--sizes 1000 10000 100000] [--index flat]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mib, save, table  # noqa: E402


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        p = folder / f"{i:07d}.jpg"
        if not p.exists():
            tile = np.roll(base, shift=(i * 7) % 64, axis=0) ^ np.uint8(i % 251)
            Image.fromarray(tile).resize((256, 256)).save(p, quality=85)
        paths.append(p)
    return paths


def worker(n: int, folder: Path, index_kind: str) -> dict:
    from cliplab.embed import FeatureCache, embed_images, embed_texts
    from cliplab.embed.index import VectorIndex
    from cliplab.models import ImageTower, TextTower

    paths = make_images(folder / "images", n)
    res = {"n": n}
    image_tower = ImageTower()
    cache = FeatureCache(folder / f"cache-{n}", chunk_size=1024)
    t = time.perf_counter()
    feats = embed_images(image_tower, paths, cache=cache, progress=False).features  # memory-mapped
    res["embed_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    index = VectorIndex.build(feats, index_kind)
    res["index_seconds"] = time.perf_counter() - t
    text_tower = TextTower()
    queries = [f"a photo number {i} of a pattern" for i in range(1000)]
    q = embed_texts(text_tower, queries, cache=cache, progress=False).features
    # text features are 384-d, image features 1280-d: a trained model would project both; here a fixed
    # random projection stands in so the search cost is measured at the real gallery size
    proj = np.random.default_rng(0).normal(size=(q.shape[1], feats.shape[1])).astype(np.float32)
    t = time.perf_counter()
    index.search(np.asarray(q) @ proj, 10)
    res["query_seconds_1000"] = time.perf_counter() - t
    res["peak_rss_mib"] = peak_rss_mib()
    res["store_mib"] = feats.nbytes / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"])
    ap.add_argument("--workdir", type=Path, default=None, help="keep images/caches here (default: a temp dir)")
    ap.add_argument("--worker", type=int)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.index)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        rows = []
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--workdir", str(workdir),
                                  "--index", args.index], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(machine())
    print(table([(r["n"], f"{r['embed_seconds']:.1f}", f"{r['n'] / r['embed_seconds']:.1f}", f"{r['index_seconds']:.2f}",
                  f"{r['query_seconds_1000']:.2f}", f"{r['store_mib']:.0f}", f"{r['peak_rss_mib']:.0f}") for r in rows],
                ("images", "embed s", "images/s", "index s", "1k queries s", "store MiB", "peak RSS MiB")))
    save("scale", {"index": args.index, "rows": rows})


if __name__ == "__main__":
    main()
