"""Choose the captioner's visual tower on dev, cheaply: for each candidate tower, caption every Flickr8k dev
image with the nearest-neighbour baseline (the consensus caption of the most similar training image by the
tower's pooled feature) and score it with CIDEr-D and BLEU-4 against the dev references. A tower whose
features find images described alike is one whose visual tokens carry what captions name. Test is not read.

    python bench/caption_towers_dev.py [-c flickr8k_caption] [--towers lite0 tuned-lite2 ...]

Results: ``bench/results/caption_towers_dev.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

from cliplab.caption.metrics import caption_metrics  # noqa: E402
from cliplab.caption.train import CaptionRunConfig, load_split, nearest_neighbour_captions  # noqa: E402
from cliplab.embed.cache import FeatureCache  # noqa: E402

TOWERS = {  # name -> config overrides
    "lite0": ["model.image={arch: efficientnet_lite0, weights: packaged}", "model.image_model=null"],
    "lite2": ["model.image={arch: efficientnet_lite2, weights: packaged}", "model.image_model=null"],
    "tuned-lite2": ["model.image={arch: efficientnet_lite2, weights: packaged}",
                    "model.image_model=runs/flickr8k-tuned-strong"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="flickr8k_caption")
    ap.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    a = ap.parse_args()
    base = CaptionRunConfig.load(a.config)
    out, rows = {}, []
    for name in a.towers:
        config = base.with_overrides(TOWERS[name])
        cache = FeatureCache(config.data.cache_dir)
        t0 = time.time()
        train = load_split(config, config.data.train_split, cache, "cpu", True)
        dev = load_split(config, config.data.dev_split, cache, "cpu", True)
        if set(train.dataset.images) & set(dev.dataset.images):
            raise SystemExit("train and dev share images")
        captions = nearest_neighbour_captions(train, dev)
        m = caption_metrics(dev.references, captions, tokenizer="ptb", meteor=False)
        out[name] = {"overrides": TOWERS[name], "dev_cider": m["cider"], "dev_bleu4": m["bleu4"],
                     "dev_bleu1": m["bleu1"], "seconds": time.time() - t0, "grid_dim": int(train.grid.shape[2]),
                     "pooled_dim": int(train.pooled.shape[1])}
        rows.append((name, f"{m['cider']:.2f}", f"{m['bleu4']:.2f}", f"{m['bleu1']:.2f}",
                     f"{train.grid.shape[2]} / {train.pooled.shape[1]}"))
    print(table(rows, ("tower", "dev NN CIDEr-D", "dev NN BLEU-4", "dev NN BLEU-1", "grid / pooled dim")))
    save("caption_towers_dev", {"protocol": "nearest-neighbour captions of the 1,000 Flickr8k dev images from the "
                                            "6,000 training images, PTB tokenizer, 5 references; test not read",
                                "towers": out})


if __name__ == "__main__":
    main()
