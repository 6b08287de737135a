"""Captioning runs: config, cached visual inputs, training with dev-CIDEr selection, evaluation, baselines.

Training: teacher-forced cross-entropy on caption tokens, AdamW, linear warmup + cosine decay, batches of
similar caption lengths (length bucketing), dev evaluation (greedy decoding of a fixed dev subset, CIDEr-D)
every epoch for early stopping and checkpoint selection, ``best/`` + ``last.pt`` (resume gives the same
result as an uninterrupted run; a changed config is refused), per-epoch metrics and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cliplab import rundir
from cliplab.caption.evaluator import CaptionerEvaluator
from cliplab.caption.metrics import caption_metrics, cider_d
from cliplab.caption.model import Captioner, CaptionerConfig
from cliplab.caption.rerank import consensus_rerank, nearest_training_images
from cliplab.caption.visual import caption_image_tower, tower_weights_id, visual_features
from cliplab.config import check_section, load_section, setting
from cliplab.data.captions import CaptionDataset, load_caption_dataset
from cliplab.data.images import ImageFiles
from cliplab.embed.cache import FeatureCache
from cliplab.errors import ConfigError
from cliplab.models.checkpoint import load_checked
from cliplab.rundir import BEST, CAPTIONS, flatten
from cliplab.train.config import DatasetConfig
from cliplab.train.loop import LoopSettings, TrainLoop, TrainTask, refuse_changed_config, warmup_cosine
from cliplab.utils import (atomic_write, autocast, refuse_foreign_file, resolve_device, seed_everything, write_json,
                           write_text)

BUNDLE_FORMAT = "cliplab-caption-bundle"  # the mark in a bundle's meta (``caption features``)


@dataclass
class CaptionTrainConfig:
    epochs: int = setting(10, min=1)
    batch_size: int = setting(64, min=1)
    lr: float = setting(1e-3, above=0)
    lm_lr: float | None = setting(None, above=0)  # learning rate of LM parameters (LoRA, adapters, full); None = lr
    weight_decay: float = setting(0.01, min=0)
    warmup_steps: int = setting(200, min=0)
    # all_captions (every reference once per epoch) | random_caption (one per image)
    sampling: str = setting("all_captions", choices=("all_captions", "random_caption"))
    max_train_images: int | None = None  # a quick demo on part of the training split
    dev_images: int = setting(250, min=1)  # dev subset decoded each epoch (its CIDEr-D picks the best epoch)
    patience: int = setting(3, min=0)
    grad_clip: float = setting(1.0, min=0)
    amp: bool = True
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check_section(self, "train")


@dataclass
class DecodeConfig:
    beam: int = setting(3, min=1)
    max_new_tokens: int = setting(30, min=1)
    length_penalty: float = 1.0
    no_repeat_ngram: int = setting(3, min=0)
    # > 0: consensus re-ranking of the beam's candidates against the captions of the k most similar training
    # images (cliplab.caption.rerank); 0: the beam's best
    rerank_k: int = setting(0, min=0)

    def __post_init__(self) -> None:
        check_section(self, "decode")


@dataclass
class CaptionDataConfig(DatasetConfig):
    """The ``data`` section of a caption run: the dataset and its splits (shared with contrastive runs), or a
    bundle of visual tokens computed elsewhere."""

    features: str | None = None  # a bundle from `cliplab caption features` (visual tokens computed elsewhere)


@dataclass
class CaptionRunConfig:
    model: CaptionerConfig = field(default_factory=CaptionerConfig)
    train: CaptionTrainConfig = field(default_factory=CaptionTrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    clipscore_model: str = "conse"  # the cliplab image-text model CLIPScore is computed with

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train), "decode": asdict(self.decode),
                "data": asdict(self.data), "clipscore_model": self.clipscore_model}

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionRunConfig":
        """A caption config file's mapping through the one config loader (sections model, train, decode, data)."""
        return load_section(cls, d, "")

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "CaptionRunConfig":
        """The config a caption run was trained with (its ``config.json``)."""
        return cls.from_dict({k: v for k, v in rundir.read_json(Path(run_dir) / rundir.CONFIG).items()
                              if k not in ("kind", "provenance")})

    @classmethod
    def load(cls, spec: str | Path) -> "CaptionRunConfig":
        from cliplab.configs import read_yaml_config

        return cls.from_dict(read_yaml_config(spec))

    def with_overrides(self, overrides: list[str]) -> "CaptionRunConfig":
        from cliplab.configs import apply_overrides

        return CaptionRunConfig.from_dict(apply_overrides(self.to_dict(), overrides))

    def training_record(self) -> dict:
        flat = flatten(self.to_dict())
        return {k: v for k, v in flat.items() if not k.startswith(("decode.", "clipscore_model"))
                and k not in ("train.device", "data.cache_dir", "data.backend")}


def clean_caption(text: str) -> str:
    """``"A dog runs on the beach ."`` -> ``"A dog runs on the beach."`` (training target)."""
    text = " ".join(text.replace(" .", ".").replace(" ,", ",").split()).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


@dataclass
class CaptionSplit:
    """A split's images with their visual features and reference captions."""

    dataset: CaptionDataset
    grid: np.ndarray
    pooled: np.ndarray
    image_weights: str = ""  # digest of the image tower weights the features came from

    @property
    def references(self) -> dict[str, list[str]]:
        ds = self.dataset
        return {ds.images[i]: [ds.captions[c] for c in ds.captions_of(i)] for i in range(ds.num_images)}

    def subset(self, n: int) -> "CaptionSplit":
        if n >= self.dataset.num_images:
            return self
        keep = np.arange(n)
        drop = np.arange(n, self.dataset.num_images)
        ds = self.dataset.drop_images(drop, "subset", [""] * len(drop))
        ds.skipped.items.clear()
        return CaptionSplit(ds, self.grid[keep], self.pooled[keep], self.image_weights)


def load_split(config: CaptionRunConfig, split: str, cache: FeatureCache, device, progress: bool,
               image_tower=None) -> CaptionSplit:
    d = config.data
    if d.features:
        sp = bundle_split(Path(d.features), split, config.model.grid)
        if Path(d.path).exists():  # the images are here too: attach them (CLIPScore, figures, generate)
            ds = load_caption_dataset(d.path, split, image_root=d.image_root, on_error="raise")
            if ds.images != sp.dataset.images:
                raise ConfigError(f"data.features: {d.features} was exported from other {split!r} images than "
                                  f"{d.path} holds ({sp.dataset.num_images} vs {ds.num_images} images)")
            sp.dataset.image_root = ds.image_root
        return sp
    ds = load_caption_dataset(d.path, split, image_root=d.image_root, on_error="raise")
    if ds.num_images == 0:
        raise ConfigError(f"{d.path}: split {split!r} has no images")
    tower = image_tower or caption_image_tower(config.model.image, config.model.image_model)
    feats = visual_features(tower, ImageFiles(ds.image_paths()), config.model.grid, cache=cache, device=device,
                            progress=progress, desc=f"{ds.name} images", backend=d.backend)
    return CaptionSplit(ds, np.asarray(feats.grid), np.asarray(feats.pooled), tower_weights_id(tower))


def export_bundle(config: CaptionRunConfig, out: str | Path, device="cpu", progress: bool = True) -> Path:
    """Visual tokens (float16) and captions of the train, dev and test splits in one ``.npz``, for training
    where the images and the image tower are not (e.g. a GPU machine): set ``data.features`` to it."""
    import json

    refuse_foreign_file(out, is_own_bundle, "--out")  # before the features are computed
    cache = FeatureCache(config.data.cache_dir)
    tower = caption_image_tower(config.model.image, config.model.image_model)
    payload = {"meta": np.asarray(json.dumps({"format": BUNDLE_FORMAT, "grid": config.model.grid,
                                              "image_tower": tower.fingerprint(),
                                              "image_weights": tower_weights_id(tower), "dataset": config.data.path}))}
    for role in ("train", "dev", "test"):
        name = getattr(config.data, f"{role}_split")
        sp = load_split(config, name, cache, device, progress, image_tower=tower)
        ds = sp.dataset
        payload[f"{name}/grid"] = sp.grid.astype(np.float16)
        payload[f"{name}/pooled"] = sp.pooled.astype(np.float16)
        payload[f"{name}/dataset"] = np.asarray(json.dumps({"images": ds.images, "captions": ds.captions,
                                                            "caption_image": ds.caption_image.tolist(),
                                                            "name": ds.name}))
    out = Path(out)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)

    return atomic_write(out, write)


def is_own_bundle(path: Path) -> bool:
    """Whether a file is a bundle cliplab wrote (an ``.npz`` whose ``meta`` names a grid and an image tower)."""
    import json

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, AttributeError):
        return False
    return isinstance(meta, dict) and (meta.get("format") == BUNDLE_FORMAT or {"grid", "image_tower"} <= set(meta))


def bundle_split(path: Path, split: str, grid: int) -> CaptionSplit:
    import json

    if not path.is_file():
        raise ConfigError(f"data.features: {path} not found")
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta["grid"] != grid:
            raise ConfigError(f"{path} holds a {meta['grid']}x{meta['grid']} grid, the model wants {grid}x{grid}")
        if f"{split}/grid" not in z:
            raise ConfigError(f"{path} has no split {split!r}")
        d = json.loads(str(z[f"{split}/dataset"]))
        ds = CaptionDataset(path.parent / "images-not-in-bundle", d["images"], d["captions"], d["caption_image"],
                            name=d["name"])
        return CaptionSplit(ds, z[f"{split}/grid"].astype(np.float32), z[f"{split}/pooled"].astype(np.float32),
                            meta["image_weights"])


class LengthBucketSampler:
    """Batches of (image, caption) pairs of similar caption lengths; deterministic in (seed, epoch).

    Pairs are shuffled, cut into pools of 50 batches, sorted by token length within a pool and batched;
    the batch order is shuffled again (the usual bucketing that keeps randomness but little padding)."""

    def __init__(self, caption_image: np.ndarray, lengths: np.ndarray, batch_size: int, sampling: str,
                 seed: int) -> None:
        self.caption_image, self.lengths = np.asarray(caption_image), np.asarray(lengths)
        self.batch_size, self.sampling, self.seed = batch_size, sampling, seed
        self.n_images = int(self.caption_image.max()) + 1 if len(self.caption_image) else 0

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.sampling == "all_captions":
            pairs = rng.permutation(len(self.caption_image))
        else:  # one random caption per image
            order = rng.permutation(len(self.caption_image))
            _, first = np.unique(self.caption_image[order], return_index=True)
            pairs = rng.permutation(order[first])
        pool = self.batch_size * 50
        batches = []
        for s in range(0, len(pairs), pool):
            chunk = pairs[s:s + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def build_captioner(config: CaptionRunConfig, train: CaptionSplit) -> Captioner:
    return Captioner(config.model, int(train.grid.shape[2]), int(train.pooled.shape[1]),
                     image_weights=train.image_weights)


def _to(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


@torch.inference_mode()
def generate_candidates(model: Captioner, split: CaptionSplit, decode: DecodeConfig, device, batch_size: int = 64,
                        beam: int | None = None, num_return: int = 1, progress: bool = False) -> dict[str, list[str]]:
    """image name -> the ``num_return`` best captions of the beam (best first) for every image of a split."""
    model.eval()
    out = {}
    n = split.dataset.num_images
    bar = tqdm(total=n, desc="captioning", unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(0, n, batch_size):
        with autocast(device):
            ids = model.generate(_to(split.grid[s:s + batch_size], device), _to(split.pooled[s:s + batch_size], device),
                                 beam=beam or decode.beam, max_new_tokens=decode.max_new_tokens,
                                 length_penalty=decode.length_penalty, no_repeat_ngram=decode.no_repeat_ngram,
                                 num_return=num_return)
        for i in range(len(ids) // num_return):
            out[split.dataset.images[s + i]] = [model.decode(row) for row in ids[i * num_return:(i + 1) * num_return]]
        bar.update(len(ids) // num_return)
    bar.close()
    return out


def generate_captions(model: Captioner, split: CaptionSplit, decode: DecodeConfig, device, batch_size: int = 64,
                      beam: int | None = None, progress: bool = False, train: CaptionSplit | None = None,
                      rerank_k: int | None = None) -> dict[str, str]:
    """image name -> generated caption for every image of a split: the beam's best, or with ``rerank_k``
    (default ``decode.rerank_k``) > 0 the beam candidate closest to the captions of the ``rerank_k`` most
    similar ``train`` images (consensus re-ranking)."""
    k = decode.rerank_k if rerank_k is None else rerank_k
    width = beam or decode.beam
    if k <= 0 or width == 1:
        return {name: c[0] for name, c in generate_candidates(model, split, decode, device, batch_size, width,
                                                              progress=progress).items()}
    if train is None:
        raise ConfigError("consensus re-ranking (decode.rerank_k > 0) needs the training split's features and "
                          "captions")
    candidates = generate_candidates(model, split, decode, device, batch_size, width, num_return=width,
                                     progress=progress)
    return consensus_rerank(candidates, consensus_captions(train, split, k))[0]


def consensus_captions(train: CaptionSplit, target: CaptionSplit, k: int) -> dict[str, list[str]]:
    """image name -> every reference caption of its ``k`` most similar training images."""
    near = nearest_training_images(train.pooled, target.pooled, k)
    refs, names = train.references, train.dataset.images
    return {t: [c for i in row for c in refs[names[i]]] for t, row in zip(target.dataset.images, near)}


def train_captioner(config: CaptionRunConfig, run_dir: str | Path, *, resume: bool = True, progress: bool = True,
                    log=print) -> dict:
    """Train (resuming ``run_dir`` when it holds a checkpoint of the same config); returns the fit summary."""
    run_dir = rundir.claim_run_folder(run_dir, "caption")  # a folder of the user's is refused before any work
    with rundir.run_lock(run_dir, "cliplab caption train"):
        return _train_captioner(config, run_dir, resume, progress, log)


def _train_captioner(config: CaptionRunConfig, run_dir: Path, resume: bool, progress: bool, log) -> dict:
    record = config.training_record()
    if resume:  # refuse before anything is overwritten or computed
        refuse_changed_config(run_dir, record)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / rundir.CONFIG, {**config.to_dict(), "kind": "caption", "provenance": rundir.provenance()})
    cfg = config.train
    device = resolve_device(cfg.device)
    cache = FeatureCache(config.data.cache_dir)
    t0 = time.time()
    train = load_split(config, config.data.train_split, cache, device, progress)
    dev = load_split(config, config.data.dev_split, cache, device, progress).subset(cfg.dev_images)
    if cfg.max_train_images:
        train = train.subset(cfg.max_train_images)
    shared = set(train.dataset.images) & set(dev.dataset.images)
    if shared:
        raise ConfigError(f"train and dev splits share {len(shared)} images")
    t_features = time.time() - t0
    seed_everything(cfg.seed)
    model = build_captioner(config, train).to(device)
    counts = model.parameter_counts()
    log(f"captioner: {config.model.lm}, tuning {config.model.tuning}, {counts['trainable']:,} trainable of "
        f"{counts['total']:,} parameters; {train.dataset.num_images} training images, "
        f"{train.dataset.num_captions} captions; dev subset {dev.dataset.num_images} images")
    t1 = time.time()
    task = CaptionTask(config, model, train, dev, device, log)
    settings = LoopSettings(cfg.epochs, cfg.patience, grad_clip=cfg.grad_clip, evaluator=type(task.evaluator))
    state = TrainLoop(task, settings, run_dir, device=device, config_record=record, resume=resume,
                      progress=progress, log=log).run()
    metric = settings.select_metric
    fit = {"best_epoch": state["best_epoch"], f"best_dev_{metric}": state["best_metric"],
           "stopped_early": state["stopped_early"], "parameters": counts,
           "seconds": {"features": t_features, "train": rundir.training_seconds(run_dir),
                       "train_this_process": time.time() - t1},
           "selection": f"greedy captions of the first {dev.dataset.num_images} dev images, "
                        f"{task.evaluator.label(metric)} (simple tokenizer), best epoch kept", "device": str(device),
           "select_metric": metric, "select_direction": settings.select_direction}
    write_json(run_dir / rundir.CAPTION_FIT, fit)
    return fit


class CaptionTask(TrainTask):
    """Captioner training on the engine (:mod:`cliplab.train.loop`): teacher-forced cross-entropy on
    length-bucketed batches, AdamW (LM parameters at ``lm_lr``), linear warmup + cosine decay per step, dev
    CIDEr-D of greedy captions, a line logged per epoch."""

    loss_name, nan_advice, epoch_bar = "caption", "Lower train.lr", False

    def __init__(self, config: CaptionRunConfig, model: Captioner, train: CaptionSplit, dev: CaptionSplit, device,
                 log) -> None:
        cfg = config.train
        self.model, self.train, self.dev, self.device, self.cfg, self.log = model, train, dev, device, cfg, log
        self.decode = config.decode
        self.targets = [clean_caption(c) for c in train.dataset.captions]
        lengths = np.array([len(x) for x in model.caption_ids(self.targets)])
        self.sampler = LengthBucketSampler(train.dataset.caption_image, lengths, cfg.batch_size, cfg.sampling,
                                           cfg.seed)
        lm = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("lm.")]
        head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("lm.")]
        groups = [{"params": head, "lr": cfg.lr}] + ([{"params": lm, "lr": cfg.lm_lr or cfg.lr}] if lm else [])
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.params = head + lm
        total = cfg.epochs * len(self.sampler.epoch(0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(cfg.warmup_steps, total))
        refs = {k: [clean_caption(r) for r in v] for k, v in dev.references.items()}
        self.evaluator = CaptionerEvaluator(dev, self.decode, device, references=refs, beam=1)  # greedy, CIDEr-D

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self.sampler.epoch(epoch)

    def loss(self, idx: np.ndarray, epoch: int, step: int) -> torch.Tensor:
        images = self.train.dataset.caption_image[idx]
        with autocast(self.device, enabled=self.cfg.amp):
            return self.model.loss(_to(self.train.grid[images], self.device),
                                   _to(self.train.pooled[images], self.device), [self.targets[i] for i in idx])

    def train_record(self, batches: list[np.ndarray], seconds: float) -> dict:
        return {"train_seconds": seconds, "sequences_per_s": len(np.concatenate(batches)) / max(seconds, 1e-9)}

    def evaluate(self) -> dict[str, dict]:
        return {"dev": self.evaluator(self.model)}

    def report(self, record: dict, bar) -> None:
        metric, dev = self.evaluator.primary_metric, record["dev"]
        self.log(f"epoch {record['epoch']}: loss {record['train_loss']:.3f}, dev {self.evaluator.label(metric)} "
                 f"{dev[metric]:.1f} ({record['sequences_per_s']:.0f} captions/s) e.g. {dev['example']!r}")

    def state(self) -> dict:
        keys = set(self.model.trainable_keys())
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k in keys}}

    def restore(self, ckpt: dict, where: str) -> None:
        load_checked(self.model, ckpt["model"], where=where, required=self.model.trainable_keys())
        if "best_metric" not in ckpt and "best_cider" in ckpt:  # written before the shared engine
            ckpt["best_metric"] = ckpt["best_cider"]

    def save_checkpoint(self, epoch: int, path: Path, ckpt: dict) -> None:
        atomic_write(path, lambda p: torch.save(ckpt, p))  # this module's name: tests interrupt a run here


def nearest_neighbour_captions(train: CaptionSplit, test: CaptionSplit) -> dict[str, str]:
    """The baseline: each test image gets a caption of its most similar training image (cosine of pooled
    image features): the one of that image's references most similar to the others, by CIDEr-D computed
    over all those training images at once (consensus re-ranking, Devlin et al. 2015)."""
    nn_idx = nearest_training_images(train.pooled, test.pooled, 1)[:, 0]
    refs = train.references
    names = train.dataset.images
    cands, others = {}, {}
    for i in sorted(set(nn_idx.tolist())):
        caps = refs[names[i]]
        for j, c in enumerate(caps):
            if len(caps) > 1:
                cands[f"{i}/{j}"], others[f"{i}/{j}"] = c, caps[:j] + caps[j + 1:]
    scores = cider_d(others, cands, tokenizer="simple")[1] if cands else {}
    consensus = {}
    for i in sorted(set(nn_idx.tolist())):
        caps = refs[names[i]]
        consensus[i] = max(range(len(caps)), key=lambda j: (scores.get(f"{i}/{j}", 0.0), -j))
    return {t: refs[names[i]][consensus[i]] for t, i in zip(test.dataset.images, nn_idx)}


def evaluate_captioner(run_dir: str | Path, *, split: str = "test", beam: int | None = None,
                       tokenizer: str = "ptb", device: str = "auto", progress: bool = True, plots: bool = False,
                       clipscore_model: str | None = None, log=print, out_name: str = CAPTIONS,
                       reuse_captions: bool = False, rerank_k: int | None = None) -> dict:
    """Generate captions for a split with the dev-selected model, score them and the nearest-neighbour
    baseline against every reference; writes ``captions.json`` and ``results.md`` (and figures).

    ``beam`` and ``rerank_k`` override the run's ``decode`` settings; ``reuse_captions`` scores the captions an
    earlier evaluation generated (e.g. on a GPU machine without Java) instead of decoding again;
    ``clipscore_model="none"`` skips CLIPScore."""
    from cliplab.caption.model import CONFIG_NAME

    run_dir = Path(run_dir)
    if not (run_dir / BEST / CONFIG_NAME).is_file():
        raise ConfigError(f"{run_dir}: no trained captioner (no {BEST}/{CONFIG_NAME}); train one with "
                          "`cliplab caption train`")
    rundir.claim_run_folder(run_dir, "caption", "RUN")  # writes go only into a folder cliplab made
    config = CaptionRunConfig.from_run(run_dir)
    decode = dataclasses.replace(config.decode, **({"beam": beam} if beam else {}),
                                 **({"rerank_k": rerank_k} if rerank_k is not None else {}))
    dev_ = resolve_device(device)
    cache = FeatureCache(config.data.cache_dir)
    split_name = {"test": config.data.test_split, "dev": config.data.dev_split}.get(split, split)
    target = load_split(config, split_name, cache, dev_, progress)
    train = load_split(config, config.data.train_split, cache, dev_, progress)
    clip_model = clipscore_model or config.clipscore_model
    if plots or clip_model != "none":  # before decoding: both need the images themselves
        missing = [p for p in target.dataset.image_paths() if not Path(p).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} of {target.dataset.num_images} {split_name} images not found "
                              f"(first: {missing[0]}); CLIPScore and --plots need them: set data.path / "
                              "data.image_root, or pass --clipscore-model none without --plots")
    model = None
    if reuse_captions:
        earlier = rundir.read_json(run_dir / out_name)
        if earlier["split"] != split_name:
            raise ConfigError(f"{run_dir / out_name} holds {earlier['split']} captions, not {split_name}")
        generated = {c["image"]: c["generated"] for c in earlier["captions"]}
        decode = DecodeConfig(**earlier["decode"])
        decode_seconds = earlier["seconds"]["decode"]
    else:
        model = Captioner.load(run_dir).to(dev_)
        t0 = time.time()
        generated = generate_captions(model, target, decode, dev_, progress=progress, train=train)
        decode_seconds = time.time() - t0
    refs = {k: [r for r in v] for k, v in target.references.items()}
    meteor = tokenizer == "ptb"  # the official set; the simple tokenizer is the quick, Java-free mode
    metrics = caption_metrics(refs, generated, tokenizer=tokenizer, meteor=meteor)
    baseline = nearest_neighbour_captions(train, target)
    base_metrics = caption_metrics(refs, baseline, tokenizer=tokenizer, meteor=meteor)
    clip = ({"model": {"clipscore": None, "refclipscore": None}, "nearest_neighbour": {"clipscore": None,
                                                                                      "refclipscore": None}}
            if clip_model == "none" else _clipscores(clip_model, target, generated, baseline, cache, dev_))
    result = {"split": split_name, "n_images": target.dataset.num_images, "beam": decode.beam,
              "decode": asdict(decode),
              "model": {k: v for k, v in metrics.items() if k != "per_image_cider"} | clip["model"],
              "nearest_neighbour": {k: v for k, v in base_metrics.items() if k != "per_image_cider"}
              | clip["nearest_neighbour"],
              "clipscore_model": clip_model,
              "clipscore_note": f"CLIPScore with the cliplab model {clip_model!r} (w = 2.5); not comparable to "
                                "CLIP ViT-B/32 CLIPScores",
              "fit": rundir.read_json(run_dir / rundir.CAPTION_FIT) if (run_dir / rundir.CAPTION_FIT).is_file() else {},
              "protocol": f"best epoch chosen on dev CIDEr-D; {split_name} split evaluated with "
                          f"{len(next(iter(refs.values())))} references per image, {tokenizer} tokenizer",
              "seconds": {"decode": decode_seconds},
              "captions": [{"image": k, "generated": generated[k], "nearest_neighbour": baseline[k],
                            "references": refs[k], "cider": metrics["per_image_cider"][k]} for k in refs],
              "provenance": rundir.provenance()}
    write_json(run_dir / out_name, result)
    write_text(run_dir / (rundir.RESULTS_MD if out_name == CAPTIONS else Path(out_name).with_suffix(".md").name),
               caption_markdown(result))
    if plots:
        from cliplab.caption.figures import caption_figures

        caption_figures(run_dir, model or Captioner.load(run_dir).to(dev_), target, result, dev_)
    return result


def _clipscores(spec: str, split: CaptionSplit, generated: dict, baseline: dict, cache, device) -> dict:
    from cliplab.caption.metrics import clip_scores
    from cliplab.embed.pipeline import image_embeddings, text_embeddings
    from cliplab.models.factory import load_model

    model = load_model(spec, device=device)
    img, valid, errors = image_embeddings(model, ImageFiles(split.dataset.image_paths()), cache=cache,
                                          device=device, progress=False)
    if not valid.all():  # a zero embedding would score 0 and pull the mean down silently
        raise ConfigError(f"CLIPScore: {int((~valid).sum())} of {len(valid)} images unreadable "
                          f"(first: {next(iter(errors.values()), '?')})")
    names = split.dataset.images
    refs = split.references
    ref_emb = [text_embeddings(model, refs[n]) for n in names]
    out = {}
    for label, caps in (("model", generated), ("nearest_neighbour", baseline)):
        s = clip_scores(img, text_embeddings(model, [caps[n] for n in names]), ref_emb)
        out[label] = {"clipscore": s["clipscore"], "refclipscore": s["refclipscore"]}
    return out


def caption_markdown(result: dict) -> str:
    keys = CaptionerEvaluator.columns
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    k = result.get("decode", {}).get("rerank_k", 0)
    how = f"beam {result['beam']}" + (f", consensus re-ranking against {k} nearest training images" if k else "")
    lines = [f"### Captioning: {result['split']} split, {result['n_images']} images, {how}", "",
             "| model | " + " | ".join(h for _, h in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, label in (("model", "captioner"), ("nearest_neighbour", "nearest-neighbour baseline")):
        lines.append(f"| {label} | " + " | ".join(fmt(result[name].get(k)) for k, _ in keys) + " |")
    lines += ["", f"SPICE: {result['model']['spice_status']}.", f"*{result['clipscore_note']}.",
              f"Protocol: {result['protocol']}.", ""]
    return "\n".join(lines)
