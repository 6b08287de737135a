"""One epoch of head training on Flickr8k: from the feature cache vs re-encoding through the frozen towers.

Both runs use the same seed, sampler (one random caption per image), heads, loss and optimiser, so they
see the same batches; the towers are frozen, so the heads receive the same features either way and
reach the same dev recall (printed). The naive epoch decodes, preprocesses and encodes every batch with
the eager towers, as a notebook that never caches does.

    python bench/train.py [--data ../shared/data/flickr8k] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402

from cliplab.data import read_flickr8k  # noqa: E402
from cliplab.embed import FeatureCache, tower_features  # noqa: E402
from cliplab.models import HeadConfig, ImageTower, TextTower, TwoTower, TwoTowerConfig  # noqa: E402
from cliplab.train.config import TrainConfig  # noqa: E402
from cliplab.train.losses import InfoNCELoss  # noqa: E402
from cliplab.train.trainer import Trainer, PairSampler, make_scheduler, param_groups  # noqa: E402


def one_epoch(model: TwoTower, sampler: PairSampler, cfg: TrainConfig, batch_features) -> float:
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr)
    sched = make_scheduler(opt, cfg, len(sampler))
    loss_fn = InfoNCELoss()
    model.train()
    t = time.perf_counter()
    for images, captions in sampler.epoch(0):
        img, txt = batch_features(images, captions)
        loss = loss_fn(model.project_image(img), model.project_text(txt), model.logit_scale.exp(),
                       image_ids=torch.as_tensor(images))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/flickr8k")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    image_tower, text_tower = ImageTower(), TextTower()
    cache = FeatureCache(args.cache_dir)
    t = time.perf_counter()
    train = tower_features(image_tower, text_tower, read_flickr8k(args.data, "train"), cache=cache, progress=False)
    dev = tower_features(image_tower, text_tower, read_flickr8k(args.data, "dev"), cache=cache, progress=False)
    cache_seconds = time.perf_counter() - t
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=1e-3, warmup_epochs=0.2, sampling="random_caption",
                      device="cpu")
    sampler = PairSampler(train.caption_image, len(train.image), cfg.sampling, cfg.batch_size, cfg.seed)
    img_all = torch.from_numpy(np.array(train.image))
    txt_all = torch.from_numpy(np.array(train.text))

    def make_model() -> TwoTower:
        torch.manual_seed(0)
        return TwoTower(TwoTowerConfig(head=HeadConfig(dropout=0.0)), image_tower=image_tower,
                        text_tower=text_tower).freeze_towers()

    cached_model = make_model()
    cached_s = one_epoch(cached_model, sampler, cfg, lambda i, c: (img_all[i], txt_all[c]))

    tf = image_tower.transform()
    paths = train.dataset.image_paths()
    captions = train.dataset.captions

    def encode_batch(images, caps):
        with torch.no_grad():
            x = torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in images])
            return image_tower(x), text_tower.encode([captions[c] for c in caps])

    naive_model = make_model()
    naive_s = one_epoch(naive_model, sampler, cfg, encode_batch)

    recall = {}
    for name, model in (("cached", cached_model), ("re-encoded", naive_model)):
        m = Trainer(model, cfg, "/tmp/unused", progress=False, tensorboard=False).evaluate(dev)
        recall[name] = {k: m[k] for k in ("t2i_r1", "i2t_r1", "rsum")}
    res = {"epoch_seconds_cached": cached_s, "epoch_seconds_reencode": naive_s, "speedup": naive_s / cached_s,
           "one_time_cache_seconds_this_run": cache_seconds, "dev": recall, "batch_size": args.batch_size,
           "steps": len(sampler)}
    print(machine())
    print(table([(n, f"{s:.2f}", f"{recall[n]['t2i_r1']:.2f}", f"{recall[n]['i2t_r1']:.2f}")
                 for n, s in (("cached", cached_s), ("re-encoded", naive_s))],
                ("epoch", "seconds", "dev T→I R@1", "dev I→T R@1")))
    print(f"speedup: {res['speedup']:.0f}x per epoch")
    save("train", res)


if __name__ == "__main__":
    main()
