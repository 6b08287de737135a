"""Choose a trained captioner's decoding on dev: beam size and consensus re-ranking (k nearest training images,
0 = the beam's best). Every dev image is decoded once per beam size (all of the beam's candidates kept), every
k re-ranks those candidates, and each variant is scored against the 5 dev references (PTB tokenizer). The
variant with the best dev BLEU-4 is chosen (CIDEr-D breaks ties); the test split is not read.

    python bench/caption_decode_dev.py RUN [--beams 3 5] [--ks 0 5 10 25 50] [--images N]

Candidates are kept in ``RUN/dev_candidates_beam{B}.json`` (a rerun re-scores without decoding); results:
``bench/results/caption_decode_dev.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

from cliplab.caption.metrics import caption_metrics  # noqa: E402
from cliplab.caption.model import Captioner  # noqa: E402
from cliplab.caption.rerank import consensus_rerank  # noqa: E402
from cliplab.caption.train import (CaptionRunConfig, consensus_captions, generate_candidates,  # noqa: E402
                                   load_split)
from cliplab.embed.cache import FeatureCache  # noqa: E402
from cliplab.utils import resolve_device, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--beams", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 25, 50])
    ap.add_argument("--images", type=int, default=None, help="first N dev images only")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    config = CaptionRunConfig.from_run(a.run)
    device = resolve_device(a.device)
    cache = FeatureCache(config.data.cache_dir)
    train = load_split(config, config.data.train_split, cache, device, True)
    dev = load_split(config, config.data.dev_split, cache, device, True)
    if a.images:
        dev = dev.subset(a.images)
    if set(train.dataset.images) & set(dev.dataset.images):
        raise SystemExit("train and dev share images")
    refs = dev.references
    model = None
    variants, rows = {}, []
    for beam in a.beams:
        path = a.run / f"dev_candidates_beam{beam}.json"
        stored = json.loads(path.read_text()) if path.is_file() else None
        if stored is None or stored["images"] != dev.dataset.images:
            model = model or Captioner.load(a.run).to(device)
            t0 = time.time()
            cands = generate_candidates(model, dev, config.decode, device, beam=beam, num_return=beam, progress=True)
            stored = {"images": dev.dataset.images, "beam": beam, "seconds": time.time() - t0, "candidates": cands}
            write_json(path, stored)
        cands = stored["candidates"]
        for k in a.ks:
            chosen = ({n: c[0] for n, c in cands.items()} if k == 0 else
                      consensus_rerank(cands, consensus_captions(train, dev, k))[0])
            m = caption_metrics(refs, chosen, tokenizer="ptb", meteor=False)
            key = f"beam{beam}_k{k}"
            variants[key] = {"beam": beam, "rerank_k": k, "decode_seconds": stored["seconds"],
                             **{x: m[x] for x in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")}}
            rows.append((beam, k, *(f"{m[x]:.2f}" for x in ("bleu1", "bleu4", "rouge_l", "cider"))))
    best = max(variants, key=lambda v: (round(variants[v]["bleu4"], 6), variants[v]["cider"]))
    print(table(rows, ("beam", "rerank k", "dev BLEU-1", "dev BLEU-4", "dev ROUGE-L", "dev CIDEr-D")))
    print(f"chosen on dev: {best}")
    save("caption_decode_dev", {"run": str(a.run), "n_dev_images": dev.dataset.num_images,
                                "protocol": "dev split of the run's data, every reference, PTB tokenizer; chosen by "
                                            "dev BLEU-4 (CIDEr-D breaks ties); test not read",
                                "variants": variants, "chosen": variants[best] | {"key": best}})


if __name__ == "__main__":
    main()
