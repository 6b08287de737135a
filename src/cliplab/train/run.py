"""One training run end to end: data -> cached inputs -> training -> test retrieval vs the baseline.

Under ``torchrun`` every process runs this; process 0 writes the results.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from cliplab import rundir
from cliplab.data.captions import check_disjoint_splits, load_caption_dataset
from cliplab.data.images import ImageFiles, MirroredImages
from cliplab.embed.cache import FeatureCache
from cliplab.embed.extract import embed_images
from cliplab.embed.pipeline import encode_dataset, feature_towers, tower_features
from cliplab.errors import ConfigError
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.eval.tables import retrieval_markdown
from cliplab.models.base import TowerModel, TrainableModel
from cliplab.models.checkpoint import load_checkpoint
from cliplab.rundir import BEST, CHECKPOINT
from cliplab.train.config import RunConfig
from cliplab.train.distributed import init_distributed
from cliplab.train.inputs import ArrayActs, SplitInputs, image_acts, text_acts
from cliplab.rundir import check_resume_config
from cliplab.train.trainer import Trainer
from cliplab.utils import resolve_device, seed_everything, write_json, write_text


def environment() -> dict:
    import timm
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def build_model(config: RunConfig):
    """The model a run trains (created by its registered model kind), with ``train.trainable`` and the tower
    tunings applied."""
    model: TrainableModel = config.kind().create(config.model, config.train.seed)
    fingerprints = model.side_fingerprints()  # before adapters change them: the frozen prefixes are untouched
    model.set_trainable(config.train.trainable)
    counts = model.tune_towers(*config.train.tunings())
    if config.train.init_from:  # after tuning, so that LoRA adapters exist to receive saved ones
        if not callable(getattr(model, "init_from", None)):
            raise ConfigError(f"train.init_from applies to two-tower models, not model.kind {config.model_kind}; "
                              "for a CLIP give the tuned folder as model.source")
        model.init_from(Path(config.train.init_from))
    return model, fingerprints, counts


def frozen_features(model, config: RunConfig, split: str, cache: FeatureCache, device, progress: bool):
    """Pooled frozen-tower features (a CLIP: its embeddings) of a split; drops or raises on bad images."""
    d = config.data
    ds = load_caption_dataset(d.path, split, image_root=d.image_root, on_error=d.on_error)
    return tower_features(*feature_towers(model), ds, cache=cache, on_error=d.on_error, device=device,
                          num_workers=d.num_workers, progress=progress, backend=d.backend)


def check_splits(config: RunConfig) -> None:
    """Train, dev and test must be non-empty and share no image (asserted before any features are computed):
    the dev split selects, the test split is reported once."""
    d = config.data
    check_disjoint_splits(d.path, {"train": d.train_split, "dev": d.dev_split, "test": d.test_split},
                          image_root=d.image_root)


def split_inputs(model, fingerprints: tuple[str, str], feats, config: RunConfig, cache: FeatureCache, device,
                 progress: bool, train: bool) -> SplitInputs:
    """Inputs at each side's first trainable stage: pooled features when only heads train, else the
    cached output of the frozen prefix (or raw pixels / tokens when the first stage trains)."""
    ds = feats.dataset
    image_stages, text_stages = model.image_stages(), model.text_stages()
    bi = min(image_stages.first_trainable(), len(image_stages) - 1)
    bt = min(text_stages.first_trainable(), len(text_stages) - 1)
    augment = config.train.augment if train else "none"
    images = ImageFiles(ds.image_paths())
    pooled = isinstance(model, TowerModel)  # a TwoTower's pooled features are the head's input
    if pooled and bi == len(image_stages) - 1:
        mirrored = None
        if augment == "flip":
            mirrored = embed_images(model.image_tower, MirroredImages(images), cache=cache, device=device,
                                    progress=progress, desc=f"{ds.name} images (mirrored)",
                                    backend=config.data.backend).features
        img = ArrayActs(feats.image, mirrored)
    else:
        img = image_acts(model, image_stages, bi, images, cache=cache, device=device, fingerprint=fingerprints[0],
                         augment=augment, progress=progress, desc=f"{ds.name} images", backend=config.data.backend)
    if pooled and bt == len(text_stages) - 1:
        txt = ArrayActs(feats.text)
    else:
        tokenize = model.text_tower.tokenize if pooled else model.tokenize
        txt = text_acts(text_stages, bt, ds.captions, tokenize, cache=cache, device=device,
                        fingerprint=fingerprints[1], progress=progress, desc=f"{ds.name} captions")
    return SplitInputs(ds, img, txt, bi, bt, features=feats,
                       info={"image_stage": image_stages[bi].name, "text_stage": text_stages[bt].name})


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True,
              log=print, track_test: bool = False, plots: bool = False, evaluate_test: bool = True) -> dict:
    """Train and evaluate on the test split; writes config.json, results.json and results.md.

    ``track_test`` also records test metrics every epoch (for curves; never used to pick the checkpoint);
    ``plots`` writes the run's figures (curves, Recall@K, maps before/after, galleries) to ``plots/``;
    ``evaluate_test=False`` leaves the test split untouched (a sweep reports test for its dev-selected run
    only); the dev metrics of the selected checkpoint are always in ``results["dev"]``.
    """
    run_dir = Path(run_dir)
    device, dist = _device_and_processes(config)
    if not dist.is_main:  # process 0 claims and locks; the others refuse what it refuses instead of waiting for it
        rundir.check_run_folder(run_dir, "train")
        return _train_run(config, run_dir, device, dist, resume, progress, log, track_test, plots, evaluate_test)
    rundir.claim_run_folder(run_dir, "train")  # a folder of the user's is refused before any work
    with rundir.run_lock(run_dir, "cliplab train"):
        return _train_run(config, run_dir, device, dist, resume, progress, log, track_test, plots, evaluate_test)


def _train_run(config: RunConfig, run_dir: Path, device, dist, resume: bool, progress: bool, log, track_test: bool,
               plots: bool, evaluate_test: bool) -> dict:
    progress = progress and dist.is_main
    log = log if dist.is_main else (lambda *a, **k: None)
    record = config.training_record()
    if resume and (run_dir / CHECKPOINT).is_file():  # refuse before anything is overwritten or computed
        ckpt = load_checkpoint(run_dir / CHECKPOINT, "cpu", mmap=True)
        check_resume_config(run_dir, ckpt.get("config"), record)
        del ckpt
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / rundir.CONFIG, config.to_dict())
    seed_everything(config.train.seed)
    cache = FeatureCache(config.data.cache_dir)
    t0 = time.time()
    model, fingerprints, counts = build_model(config)
    model.to(device)
    if not dist.is_main:
        dist.barrier()  # process 0 fills the caches first
    splits, inputs = _split_features(model, fingerprints, config, cache, device, progress, log)
    if dist.is_main:
        dist.barrier()
    t_features = time.time() - t0
    log(f"trainable parameters: {counts}; inputs start at image stage {inputs['train'].info['image_stage']!r}, "
        f"text stage {inputs['train'].info['text_stage']!r}")

    seed_everything(config.train.seed)
    trainer = Trainer(model, config.train, run_dir, progress=progress, dist=dist, device=device)
    if not evaluate_test:
        track_test, plots = False, False
    # before training: tuning changes the towers the baseline is built from
    test, spaces = _zero_shot_baseline(config, model, splits["test"], device) if evaluate_test else ({}, {})
    t1 = time.time()
    fit = trainer.fit(inputs["train"], inputs["dev"], resume=resume,
                      also_evaluate={"test": inputs["test"]} if track_test else None, config_record=record)
    t_train = time.time() - t1
    dist.barrier()
    model.load_trained(run_dir / BEST)  # strict: the test numbers are the dev-selected model's

    dev_metrics = trainer.evaluate(inputs["dev"])
    if evaluate_test:
        trained_space = trainer.embed(inputs["test"])
        test["trained"] = retrieval_metrics(*trained_space, splits["test"].caption_image, device=device).metrics
    skipped = {name: f.dataset.skipped.to_dict() for name, f in splits.items()}
    results = {
        "test": test,
        "dev": {"trained": dev_metrics},
        "protocol": f"checkpoint chosen by dev {config.train.select_metric} ({config.data.dev_split} split); "
                    + (f"test ({config.data.test_split} split) evaluated once, after selection" if evaluate_test
                       else "test not evaluated"),
        "fit": fit,
        "parameters": counts,
        "data": {name: {"name": f.dataset.name, "images": f.dataset.num_images, "captions": f.dataset.num_captions}
                 for name, f in splits.items()},
        "skipped": skipped,
        "skipped_total": sum(s["skipped"] for s in skipped.values()),
        "seconds": {"features": t_features, "train": rundir.training_seconds(run_dir) or t_train,
                    "train_this_process": t_train, "total": time.time() - t0},
        "features_reused": all(f.reused for f in splits.values()),
        "world_size": dist.world_size,
        "environment": environment(),
        "provenance": rundir.provenance(),
    }
    if dist.is_main:
        if plots:
            spaces["trained (after)"] = trained_space
        _write_results(run_dir, results, splits, spaces if plots else None, seed=config.train.seed)
    return results


def _device_and_processes(config: RunConfig):
    """The device of this process (its ``LOCAL_RANK``'s GPU under torchrun) and the process group."""
    device = resolve_device(config.train.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, init_distributed(device)


def _split_features(model, fingerprints, config: RunConfig, cache: FeatureCache, device, progress: bool, log):
    """Cached features and training inputs of the train, dev and test splits (checked disjoint first)."""
    splits, inputs = {}, {}
    check_splits(config)
    for name, split in (("train", config.data.train_split), ("dev", config.data.dev_split),
                        ("test", config.data.test_split)):
        splits[name] = frozen_features(model, config, split, cache, device, progress)
        inputs[name] = split_inputs(model, fingerprints, splits[name], config, cache, device, progress, name == "train")
        ds = splits[name].dataset
        skipped = f"; {ds.skipped.summary()}" if len(ds.skipped) else ""
        log(f"{name}: {ds.name} {ds.num_images} images, {ds.num_captions} captions{skipped}")
    return splits, inputs


def _write_results(run_dir: Path, results: dict, splits: dict, spaces: dict | None, seed: int) -> None:
    """results.json, results.md and, given the embedding ``spaces``, the run's figures."""
    test = results["test"]
    write_json(run_dir / rundir.RESULTS, results)
    write_text(run_dir / rundir.RESULTS_MD,
               retrieval_markdown(test or {"trained (dev)": results["dev"]["trained"]},
                                  f"Test retrieval: {splits['test'].dataset.name}" if test else
                                  f"Dev retrieval: {splits['dev'].dataset.name} (test not evaluated)")
               + f"\nProtocol: {results['protocol']}.\n")
    if spaces is not None:
        from cliplab.viz.runs import plot_retrieval, plot_training

        plot_training(run_dir)
        plot_retrieval(run_dir, splits["test"].dataset, spaces, seed=seed)


def _zero_shot_baseline(config: RunConfig, model, feats, device) -> tuple[dict, dict]:
    """Test retrieval (``{name: metrics}``) and embeddings (``{"name (before)": (img, txt)}``) of the model
    kind's zero-shot baseline (none when it declares none or ``baseline: false``), from the run's cached features
    of the untrained model (heads over its frozen towers, or a CLIP's own embeddings compared directly)."""
    baseline = config.kind().baseline if config.baseline else None
    if baseline is None:
        return {}, {}
    name, zero_shot = baseline(model)
    img, txt, _ = encode_dataset(zero_shot.to(device), feats.dataset, features=feats, device=device, progress=False)
    return ({name: retrieval_metrics(img, txt, feats.caption_image, device=device).metrics},
            {f"{name} (before)": (img, txt)})
