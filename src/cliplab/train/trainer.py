"""Train projection heads, temperature and (optionally) tower blocks or adapters on cached activations.

:class:`Trainer` is contrastive training as a task (:class:`ContrastiveTask`) on the training engine
(:mod:`cliplab.train.loop`), which does the rest: dev evaluation every epoch by the run's evaluator
(``train.evaluator``, default retrieval), early stopping on one of its metrics (higher or lower is better, as
the evaluator says), ``best/`` and ``last.pt`` checkpoints,
per-epoch metrics + TensorBoard logs (file names in :mod:`cliplab.rundir`). A killed run resumes from
``last.pt``; epoch shuffles are a function of (seed, epoch), so a resumed run ends where an uninterrupted
one does. The checkpoint records the training config: resuming with a changed one is refused, naming the
changed keys. A NaN/inf loss or dev metric stops training with a clear error and is never saved as best.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cliplab.embed.pipeline import DatasetFeatures
from cliplab.errors import ConfigError
from cliplab.models.checkpoint import load_checked
from cliplab.rundir import append_metrics, flatten
from cliplab.train.config import TrainConfig, without_default_evaluator
from cliplab.train.distributed import DistContext
from cliplab.train.inputs import SplitInputs, embed_side, inputs_from_features
from cliplab.train.loop import LoopSettings, TrainLoop, TrainTask, warmup_cosine
from cliplab.train.losses import create_loss
from cliplab.utils import atomic_write, autocast, resolve_device, seed_everything


def param_groups(model: nn.Module, weight_decay: float, lr: float, tower_params: set[int] | None = None,
                 tower_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the temperature are not decayed (as open_clip).
    Tower parameters (ids in ``tower_params``) get ``tower_lr`` when it is set."""
    tower_params = tower_params or set()
    groups = {(t, d): [] for t in (False, True) for d in (True, False)}
    for _, p in model.named_parameters():
        if p.requires_grad:
            groups[(id(p) in tower_params, p.ndim >= 2)].append(p)
    out = []
    for (is_tower, decay), params in groups.items():
        if params or not is_tower:  # the head groups always exist (loss parameters join the second)
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                        "lr": (tower_lr or lr) if is_tower else lr, "name": ("tower" if is_tower else "head")
                        + ("" if decay else "_no_decay")})
    return out


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":  # a rising and a falling phase of at least one step each (OneCycleLR's needs)
        if total < 3:
            raise ConfigError(f"train.schedule onecycle needs at least 3 optimizer steps; this run has {total} "
                              "(more epochs or a smaller batch, or another schedule)")
        rise = min(max(warmup, 0.01 * total, 2.0), total - 1.0)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total, pct_start=rise / total)
    if cfg.schedule == "plateau":  # stepped once per epoch on the dev metric (see cliplab.train.loop)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=cfg.select_direction, factor=0.5, patience=2)
    if cfg.schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be cosine, onecycle, plateau or constant, not {cfg.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, cfg.schedule == "constant"))


class PairSampler:
    """Batches of (image index, caption index) for one epoch, deterministic in (seed, epoch).

    ``random_caption``: each image once with one of its captions; ``all_pairs``: every caption once;
    ``hard``: each image once with a random caption, images grouped by k-means clusters of their frozen
    features so that a batch holds look-alikes (harder in-batch negatives in both directions).
    """

    def __init__(self, caption_image: np.ndarray, n_images: int, mode: str, batch_size: int, seed: int,
                 image_features: np.ndarray | None = None) -> None:
        if mode not in ("random_caption", "all_pairs", "hard"):
            raise ConfigError(f"sampling must be random_caption, all_pairs or hard, not {mode!r}")
        self.caption_image = np.asarray(caption_image)
        self.mode, self.batch_size, self.seed = mode, batch_size, seed
        order = np.argsort(self.caption_image, kind="stable")
        counts = np.bincount(self.caption_image, minlength=n_images)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts, self.order, self.n_images = counts, order, n_images
        self.images_with_captions = np.flatnonzero(counts > 0)
        self.clusters = None
        if mode == "hard":
            if image_features is None:
                raise ConfigError("sampling=hard needs frozen image features to cluster")
            self.clusters = self._cluster(np.asarray(image_features, dtype=np.float32)[self.images_with_captions])

    def _cluster(self, feats: np.ndarray) -> np.ndarray:
        from sklearn.cluster import KMeans

        k = int(np.clip(len(feats) // max(1, self.batch_size), 2, max(2, len(feats) // 2)))  # ~one cluster a batch
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        return KMeans(n_clusters=k, n_init=1, random_state=self.seed).fit_predict(feats)

    def __len__(self) -> int:
        n = len(self.caption_image) if self.mode == "all_pairs" else len(self.images_with_captions)
        return max(1, n // self.batch_size)  # drop the ragged last batch: contrastive losses need negatives

    def epoch(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "all_pairs":
            captions = rng.permutation(len(self.caption_image))
            images = self.caption_image[captions]
        else:
            images = rng.permutation(self.images_with_captions)
            if self.mode == "hard":  # clusters in random order, images shuffled within each
                pos = rng.permutation(len(self.images_with_captions))
                cluster_rank = rng.permutation(self.clusters.max() + 1)[self.clusters]
                images = self.images_with_captions[np.lexsort((pos, cluster_rank))]
            pick = (rng.random(len(images)) * self.counts[images]).astype(np.int64)
            captions = self.order[self.starts[images] + pick]
        batches = list(range(len(self)))
        if self.mode == "hard":
            batches = list(rng.permutation(batches))
        for b in batches:
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield images[sl], captions[sl]


class Trainer:
    """Fits the trainable parameters of a model (heads, and tower blocks or adapters when unfrozen).

    Each side runs only the stages after its first trainable one, on cached activations of the frozen
    prefix (:class:`~cliplab.train.inputs.SplitInputs`); plain :class:`DatasetFeatures` mean head
    training on pooled tower features. Works for :class:`~cliplab.models.two_tower.TwoTower` and for a
    CLIP from ``load_clip`` (whose last stage per side is its projection).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, run_dir: str | Path, *, progress: bool = True,
                 tensorboard: bool = True, dist: DistContext | None = None, device: torch.device | None = None) -> None:
        self.model = model
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.device = device or resolve_device(config.device)
        self.loss_fn = create_loss(config.loss, **config.loss_args)
        self.dist = dist or DistContext()
        self.progress = progress and self.dist.is_main
        self.tensorboard = tensorboard and self.dist.is_main
        self.image_stages, self.text_stages = model.image_stages(), model.text_stages()
        self._config_record: dict | None = None

    def _inputs(self, split: SplitInputs | DatasetFeatures) -> SplitInputs:
        return split if isinstance(split, SplitInputs) else inputs_from_features(split, self.model)

    # -- evaluation
    def embed(self, split: SplitInputs | DatasetFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and caption embeddings of a split under the current model (CPU tensors)."""
        split = self._inputs(split)
        self.model.eval()
        with self._autocast():
            img = embed_side(self.image_stages, split.image_boundary, split.image, self.device)
            txt = embed_side(self.text_stages, split.text_boundary, split.text, self.device)
        return img.float(), txt.float()

    def evaluate(self, split: SplitInputs | DatasetFeatures) -> dict[str, float]:
        """The metrics of ``train.evaluator`` (default: retrieval) on a split under the current model."""
        from cliplab.eval.evaluators import get_evaluator

        return get_evaluator(self.cfg.evaluator, data=self._inputs(split), device=self.device)(self)

    def _autocast(self):
        return autocast(self.device, enabled=self.cfg.amp)

    # -- one global batch
    def batch_loss(self, split: SplitInputs, images: np.ndarray, captions: np.ndarray,
                   rng: np.random.Generator | None) -> torch.Tensor:
        """Loss of one global batch; under torchrun each process encodes its slice and gathers the rest."""
        sl = self.dist.shard(len(images))
        xi = split.image.batch(images[sl], self.device, rng)
        xt = split.text.batch(captions[sl], self.device, rng)
        with self._autocast():
            zi = F.normalize(self.image_stages.run(xi, split.image_boundary).float(), dim=-1)
            zt = F.normalize(self.text_stages.run(xt, split.text_boundary).float(), dim=-1)
        zi, zt = self.dist.gather(zi), self.dist.gather(zt)
        ids = torch.as_tensor(images, device=self.device)
        return self.loss_fn(zi, zt, self.model.logit_scale.exp(), image_ids=ids)

    # -- checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if k in names or k.startswith(("image_head.", "text_head."))}

    def _save_checkpoint(self, epoch: int, path: Path, ckpt: dict) -> None:
        """Write the checkpoint made after ``epoch`` (the engine calls it; tests stop a run right after it)."""
        atomic_write(path, lambda p: torch.save(ckpt, p))

    @property
    def config_record(self) -> dict:
        """What a checkpoint must have been trained with to be resumed (see ``RunConfig.training_record``)."""
        if self._config_record is not None:
            return self._config_record
        record = without_default_evaluator(flatten({"train": asdict(self.cfg)}))
        return {k: v for k, v in record.items() if k != "train.device"}

    def _check_boundaries(self, split: SplitInputs) -> None:
        for side, stages, b in (("image", self.image_stages, split.image_boundary),
                                ("text", self.text_stages, split.text_boundary)):
            first = stages.first_trainable()
            if b > first:
                raise ConfigError(f"{side} inputs start after stage {b} but stage {first} "
                                  f"({stages[first].name}) trains; rebuild the inputs for this tuning")

    def make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        tower = {id(p) for st in (self.image_stages, self.text_stages) for p in st.parameters(0, len(st) - 1)}
        groups = param_groups(self.model, cfg.weight_decay, cfg.lr, tower, cfg.tower_lr)
        head_no_decay = next(g for g in groups if g["name"] == "head_no_decay")
        head_no_decay["params"] += [p for p in self.loss_fn.parameters() if p.requires_grad]  # e.g. SigLIP's bias
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def fit(self, train: SplitInputs | DatasetFeatures, dev: SplitInputs | DatasetFeatures | None = None,
            resume: bool = True, also_evaluate: dict[str, SplitInputs | DatasetFeatures] | None = None,
            config_record: dict | None = None) -> dict:
        """Train; ``dev`` picks the best epoch, ``also_evaluate`` splits are only logged each epoch.
        ``config_record`` (flat settings, default: the train config) is stored in the checkpoint and must
        match on resume."""
        cfg = self.cfg
        if config_record is not None:
            self._config_record = dict(config_record)
        seed_everything(cfg.seed)
        self.model.to(self.device)
        train = self._inputs(train)
        self._check_boundaries(train)
        if len(train.dataset.image_paths()) < 2:
            raise ConfigError("training needs at least 2 images")
        settings = LoopSettings(cfg.epochs, cfg.patience, cfg.select_metric, grad_accum_steps=cfg.grad_accum_steps,
                                grad_clip=cfg.grad_clip, evaluator=cfg.evaluator_class)
        task = ContrastiveTask(self, train, self._inputs(dev) if dev is not None else None,
                               {k: self._inputs(v) for k, v in (also_evaluate or {}).items()})
        state = TrainLoop(task, settings, self.run_dir, device=self.device, config_record=self.config_record,
                          resume=resume, progress=self.progress, tensorboard=self.tensorboard, dist=self.dist).run()
        return {"best_epoch": state["best_epoch"], f"best_dev_{cfg.select_metric}": state["best_metric"],
                "stopped_early": state["stopped_early"], "select_metric": cfg.select_metric,
                "select_direction": settings.select_direction, "evaluator": cfg.evaluator, "config": asdict(cfg)}


class ContrastiveTask(TrainTask):
    """Contrastive training of a :class:`Trainer`'s model on the engine (:mod:`cliplab.train.loop`): batches
    from a :class:`PairSampler`, the in-batch contrastive loss, dev retrieval metrics."""

    loss_name, nan_advice = "training", "Lower train.lr, set train.grad_clip, or check the inputs for NaN"

    def __init__(self, trainer: Trainer, train: SplitInputs, dev: SplitInputs | None,
                 also_evaluate: dict[str, SplitInputs]) -> None:
        cfg = trainer.cfg
        self.trainer, self.cfg, self.train, self.dev, self.also_evaluate = trainer, cfg, train, dev, also_evaluate
        self.model = trainer.model
        frozen = train.features.image if (train.features is not None and cfg.sampling == "hard") else None
        self.sampler = PairSampler(train.caption_image, len(train.image), cfg.sampling, cfg.batch_size, cfg.seed,
                                   image_features=frozen)
        trainer.loss_fn = trainer.loss_fn.to(trainer.device)
        self.optimizer = trainer.make_optimizer()
        self.scheduler = make_scheduler(self.optimizer, cfg, -(-len(self.sampler) // cfg.grad_accum_steps))
        self.scaler = (torch.amp.GradScaler("cuda") if trainer.device.type == "cuda" and cfg.amp
                       and not torch.cuda.is_bf16_supported() else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad] + \
            [p for p in trainer.loss_fn.parameters() if p.requires_grad]
        self.log_scale_max = math.log(cfg.max_logit_scale)

    def batches(self, epoch: int) -> list:
        return list(self.sampler.epoch(epoch))

    def loss(self, batch, epoch: int, step: int) -> torch.Tensor:
        images, captions = batch
        augment = self.cfg.augment != "none"
        rng = np.random.default_rng([self.cfg.seed, epoch, step, self.trainer.dist.rank]) if augment else None
        return self.trainer.batch_loss(self.train, images, captions, rng)

    def after_update(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.log_scale_max)

    def train_record(self, batches, seconds: float) -> dict:
        return {"temperature": float(1.0 / self.model.logit_scale.exp().item()), "step_seconds": seconds}

    def evaluate(self) -> dict[str, dict]:
        out = {name: self.trainer.evaluate(split) for name, split in self.also_evaluate.items()}
        if self.dev is not None:
            out["dev"] = self.trainer.evaluate(self.dev)
        return out

    def report(self, record: dict, bar) -> None:
        if "dev" in record:
            dev, metric = record["dev"], self.cfg.select_metric
            shown = {"dev_r1": f"{dev['t2i_r1']:.1f}/{dev['i2t_r1']:.1f}"} if "t2i_r1" in dev and "i2t_r1" in dev \
                else {f"dev_{metric}": f"{dev[metric]:.3g}"}
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", **shown)

    def state(self) -> dict:
        return {"model": self.trainer._trainable_state(), "loss": self.trainer.loss_fn.state_dict()}

    def restore(self, ckpt: dict, where: str) -> None:
        load_checked(self.model, ckpt["model"], where=where, required=self.trainer._trainable_state())
        self.trainer.loss_fn.load_state_dict(ckpt.get("loss", {}))

    def save_checkpoint(self, epoch: int, path: Path, ckpt: dict) -> None:
        self.trainer._save_checkpoint(epoch, path, ckpt)

    def append_record(self, run_dir: Path, record: dict) -> None:
        append_metrics(run_dir, record)  # looked up here, where tests interrupt a run mid-write
