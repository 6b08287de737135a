"""Retrieval metrics on a 5k-image x 25k-caption score matrix: cliplab vs the clip-benchmark package.

Both run on the same embeddings, each in its own process so peak memory is measured separately
(peak RSS minus the RSS after loading the embeddings). clip-benchmark is a bench-only dependency
(`pip install -e '.[bench]'`); its `zeroshot_retrieval` code is called exactly as its `evaluate` does.

    python bench/eval.py [--images 5000] [--captions-per-image 5] [--dim 512]
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

KS = (1, 5, 10)


def worker(kind: str, folder: Path) -> dict:
    import torch

    img = torch.from_numpy(np.load(folder / "img.npy"))
    txt = torch.from_numpy(np.load(folder / "txt.npy"))
    owner = np.load(folder / "owner.npy")
    if kind == "cliplab":  # imports before the memory baseline: only the computation is compared
        from cliplab.eval.retrieval import retrieval_metrics
    else:
        from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
    base = peak_rss_mib()
    t = time.perf_counter()
    if kind == "cliplab":
        m = retrieval_metrics(img, txt, owner, ks=KS).metrics
        recalls = {f"t2i_r{k}": m[f"t2i_r{k}"] for k in KS} | {f"i2t_r{k}": m[f"i2t_r{k}"] for k in KS}
    else:
        texts_image_index = torch.from_numpy(owner)
        scores = txt @ img.t()
        positive_pairs = torch.zeros_like(scores, dtype=bool)
        positive_pairs[torch.arange(len(scores)), texts_image_index] = True
        recalls = {}
        for k in KS:  # as clip_benchmark.metrics.zeroshot_retrieval.evaluate, batch_size 64 on CPU
            recalls[f"t2i_r{k}"] = 100 * (batchify(recall_at_k, scores, positive_pairs, 64, "cpu", k=k) > 0).float().mean().item()
            recalls[f"i2t_r{k}"] = 100 * (batchify(recall_at_k, scores.T, positive_pairs.T, 64, "cpu", k=k) > 0).float().mean().item()
    return {"seconds": time.perf_counter() - t, "peak_extra_mib": peak_rss_mib() - base, "recalls": recalls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=7.0, help="caption noise: sets how hard retrieval is")
    ap.add_argument("--worker", choices=["cliplab", "clip_benchmark"])
    ap.add_argument("--folder", type=Path)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder)))
        return
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        img = rng.normal(size=(args.images, args.dim)).astype(np.float32)
        owner = np.repeat(np.arange(args.images), args.captions_per_image)
        txt = img[owner] + args.noise * rng.normal(size=(len(owner), args.dim)).astype(np.float32)  # a mid-quality model
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        np.save(folder / "img.npy", img)
        np.save(folder / "txt.npy", txt)
        np.save(folder / "owner.npy", owner)
        runs = {}
        for kind in ("cliplab", "clip_benchmark"):
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", str(folder)],
                                 capture_output=True, text=True)
            if out.returncode:
                last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"the {kind} worker failed: {last}"
                         + ("  (pip install -e '.[bench]')" if "No module named" in last else ""))
            runs[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = runs["cliplab"], runs["clip_benchmark"]
    # the same number of hits for every K (clip-benchmark averages in float32, so compare counts)
    n_queries = {"t2i": args.images * args.captions_per_image, "i2t": args.images}
    hits = {name: {k: round(r["recalls"][k] * n_queries[k[:3]] / 100) for k in r["recalls"]}
            for name, r in runs.items()}
    identical = hits["cliplab"] == hits["clip_benchmark"]
    res = {"images": args.images, "captions": args.images * args.captions_per_image, "dim": args.dim, "runs": runs,
           "identical_recalls": identical, "hits": hits, "speedup": b["seconds"] / a["seconds"],
           "peak_memory_ratio": b["peak_extra_mib"] / max(a["peak_extra_mib"], 1e-9)}
    print(machine())
    rows = [(k, f"{a['recalls'][k]:.2f}", f"{b['recalls'][k]:.2f}") for k in a["recalls"]]
    print(table(rows, ("recall (%)", "cliplab", "clip-benchmark")))
    print(table([("seconds", f"{a['seconds']:.2f}", f"{b['seconds']:.2f}", f"{res['speedup']:.1f}x faster"),
                 ("peak extra memory (MiB)", f"{a['peak_extra_mib']:.0f}", f"{b['peak_extra_mib']:.0f}",
                  f"{res['peak_memory_ratio']:.1f}x less")], ("", "cliplab", "clip-benchmark", "ratio")))
    print(f"identical Recall@K: {identical}")
    save("eval", res)


if __name__ == "__main__":
    main()
