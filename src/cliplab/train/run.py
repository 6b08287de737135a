"""One training run end to end: data -> cached features -> heads -> test retrieval vs the ConSE baseline."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cliplab.data.captions import load_caption_dataset
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import DatasetFeatures, evaluate_retrieval, tower_features
from cliplab.eval.tables import retrieval_markdown
from cliplab.models.conse import ConSE
from cliplab.models.image_tower import ImageTower
from cliplab.models.text_tower import TextTower
from cliplab.models.two_tower import WEIGHTS_NAME, TwoTower
from cliplab.train.config import RunConfig
from cliplab.train.trainer import BEST_DIR, HeadTrainer
from cliplab.utils import resolve_device, seed_everything, write_json, write_text


def environment() -> dict:
    import timm
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def load_split_features(config: RunConfig, split: str, image_tower, text_tower, cache: FeatureCache,
                        device, progress: bool) -> DatasetFeatures:
    d = config.data
    ds = load_caption_dataset(d.path, split, image_root=d.image_root, on_error=d.on_error)
    return tower_features(image_tower, text_tower, ds, cache=cache, on_error=d.on_error, device=device,
                          num_workers=d.num_workers, progress=progress, backend=d.backend)


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True,
              log=print, track_test: bool = False) -> dict:
    """Train heads on frozen towers and evaluate on the test split; writes results.json and results.md.

    ``track_test`` also records test metrics every epoch (for curves; never used to pick the checkpoint).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)
    cache = FeatureCache(config.data.cache_dir)
    t0 = time.time()
    image_tower, text_tower = ImageTower(config.model.image), TextTower(config.model.text)
    splits = {}
    for name, split in (("train", config.data.train_split), ("dev", config.data.dev_split),
                        ("test", config.data.test_split)):
        splits[name] = load_split_features(config, split, image_tower, text_tower, cache, device, progress)
        ds = splits[name].dataset
        skipped = f"; {ds.skipped.summary()}" if len(ds.skipped) else ""
        log(f"{name}: {ds.name} {ds.num_images} images, {ds.num_captions} captions{skipped}")
    t_features = time.time() - t0

    seed_everything(config.train.seed)
    model = TwoTower(config.model, image_tower=image_tower, text_tower=text_tower)
    model.set_trainable(config.train.trainable)
    trainer = HeadTrainer(model, config.train, run_dir, progress=progress)
    t1 = time.time()
    fit = trainer.fit(splits["train"], splits["dev"], resume=resume,
                      also_evaluate={"test": splits["test"]} if track_test else None)
    t_train = time.time() - t1
    model.load_state_dict(load_file(str(run_dir / BEST_DIR / WEIGHTS_NAME)), strict=False)

    test = {"trained": trainer.evaluate(splits["test"])}
    if config.baseline:
        conse = ConSE(image_tower, text_tower).to(trainer.device)
        test = {"conse": evaluate_retrieval(conse, splits["test"], trainer.device), **test}
    skipped = {name: f.dataset.skipped.to_dict() for name, f in splits.items()}
    results = {
        "test": test,
        "fit": fit,
        "data": {name: {"name": f.dataset.name, "images": f.dataset.num_images, "captions": f.dataset.num_captions}
                 for name, f in splits.items()},
        "skipped": skipped,
        "skipped_total": sum(s["skipped"] for s in skipped.values()),
        "seconds": {"features": t_features, "train": t_train, "total": time.time() - t0},
        "features_reused": all(f.reused for f in splits.values()),
        "environment": environment(),
    }
    write_json(run_dir / "results.json", results)
    write_text(run_dir / "results.md", retrieval_markdown(test, f"Test retrieval: {splits['test'].dataset.name}"))
    return results
