"""Images/s of the image feed alone (no model): the threaded decoder cliplab used before #27 vs the process-based
feed (cliplab.embed.feed), each with 1 and 2 workers, in one run on the same files.

Both decode the same Flickr8k JPEGs the way embedding does (PIL draft mode at the tower's input size, resize
and centre crop, the default EfficientNet-Lite0 transform) into normalised float batches of 64 on the CPU;
nothing consumes them. The files are read once before timing (page cache warm for every configuration); each
configuration runs ``--repeats`` times, alternating, and keeps its best run (the least disturbed by other work).

    python bench/feed.py [--data ../shared/data/flickr8k] [--images 2000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402

from cliplab.data.images import ImageFiles, ImageSet  # noqa: E402
from cliplab.embed.feed import ImageFeed  # noqa: E402
from cliplab.errors import CliplabError  # noqa: E402
from cliplab.models import ImageTower  # noqa: E402


class ThreadDecoder:
    """The decoder of cliplab.embed.extract before #27 (kept here as the baseline): a whole batch per thread,
    the full transform (PIL steps, ToTensor, Normalize) under the GIL."""

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


def thread_batches(decoder: ThreadDecoder, start: int, stop: int, batch_size: int, workers: int):
    """The old ``prefetched_batches``: batches in order, the next ones decoding in ``workers`` threads."""
    ranges = [range(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque((r, pool.submit(decoder.batch, r)) for r in ranges[: workers + 1])
        next_index = len(pending)
        while pending:
            r, fut = pending.popleft()
            if next_index < len(ranges):
                pending.append((ranges[next_index], pool.submit(decoder.batch, ranges[next_index])))
                next_index += 1
            yield r, fut.result()


def run_threads(images: ImageFiles, transform, size: int, workers: int) -> int:
    return sum(len(r) for r, _ in thread_batches(ThreadDecoder(images, transform, size), 0, len(images), 64, workers))


def run_feed(images: ImageFiles, transform, workers: int) -> int:
    with ImageFeed(images, transform, num_workers=workers, batch_size=64) as feed:  # worker start-up is timed
        return sum(len(b.indices) for b in feed.batches())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    load_before = os.getloadavg()
    paths = sorted(Path(args.data, "images").glob("*.jpg"))[: args.images]
    tower = ImageTower()
    transform, size = tower.transform(), tower.image_size
    images = ImageFiles(paths).with_draft(size)  # as embedding decodes them
    for p in paths:
        p.read_bytes()  # page cache warm for every configuration
    configs = {f"{kind}_{w}": (kind, w) for kind in ("threads", "feed") for w in (1, 2)}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (kind, workers) in configs.items():
            t = time.perf_counter()
            n = run_threads(images, transform, size, workers) if kind == "threads" else run_feed(images, transform,
                                                                                                  workers)
            best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t))
            print(f"{name}: {n / (time.perf_counter() - t):.1f} images/s", flush=True)
    res = {"n_images": len(paths), "cores": len(os.sched_getaffinity(0)), "repeats": args.repeats,
           "load_average_before": load_before,
           "load_average_after": os.getloadavg(), **{f"{k}_images_per_s": v for k, v in best.items()}}
    res["feed_workers2_speedup"] = best["feed_2"] / best["feed_1"]
    res["threads_workers2_speedup"] = best["threads_2"] / best["threads_1"]
    res["feed_vs_threads_2_workers"] = best["feed_2"] / best["threads_2"]
    print(machine())
    print(table([(kind, f"{best[f'{kind}_1']:.1f}", f"{best[f'{kind}_2']:.1f}", f"{best[f'{kind}_2'] / best[f'{kind}_1']:.2f}x")
                 for kind in ("threads", "feed")], ("decoder", "1 worker", "2 workers", "2 vs 1")))
    print(f"feed.workers2_speedup {res['feed_workers2_speedup']:.2f} (threads: {res['threads_workers2_speedup']:.2f}); "
          f"feed vs threads at 2 workers: {res['feed_vs_threads_2_workers']:.2f}x; load average {os.getloadavg()}")
    save("feed", res)


if __name__ == "__main__":
    main()
