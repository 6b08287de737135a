"""Train projection heads, temperature and (optionally) tower blocks or adapters on cached activations.

Dev evaluation every epoch, early stopping on a dev retrieval metric (higher or lower is better, by
the metric), ``best/`` and ``last.pt`` checkpoints, per-epoch metrics + TensorBoard logs (file names in
:mod:`cliplab.rundir`). A killed run resumes from ``last.pt``; epoch shuffles are a function of (seed,
epoch), so a resumed run ends where an uninterrupted one does. The checkpoint records the training
config: resuming with a changed one is refused, naming the changed keys. A NaN/inf loss or dev metric
stops training with a clear error and is never saved as best.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cliplab import rundir
from cliplab.embed.pipeline import DatasetFeatures
from cliplab.errors import ConfigError, NumericError
from cliplab.models.checkpoint import load_checked, load_checkpoint
from cliplab.rundir import (BEST, CHECKPOINT, METRICS, append_metrics, check_resume_config, flatten,
                            truncate_metrics)
from cliplab.train.config import TrainConfig
from cliplab.train.distributed import DistContext
from cliplab.train.inputs import SplitInputs, embed_side, inputs_from_features
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
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                                                   pct_start=max(warmup / total, 0.01))
    if cfg.schedule == "plateau":  # stepped once per epoch on the dev metric (see Trainer.fit)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=cfg.select_direction, factor=0.5, patience=2)
    if cfg.schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be cosine, onecycle, plateau or constant, not {cfg.schedule!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        from cliplab.eval.retrieval import retrieval_metrics

        split = self._inputs(split)
        img, txt = self.embed(split)
        return retrieval_metrics(img, txt, split.caption_image, device=self.device).metrics

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

    def _save_checkpoint(self, epoch: int, optimizer, scheduler, scaler, state: dict) -> None:
        if not self.dist.is_main:
            return
        ckpt = {"epoch": epoch, "model": self._trainable_state(), "loss": self.loss_fn.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(), "config": self.config_record, **state}
        atomic_write(self.run_dir / CHECKPOINT, lambda p: torch.save(ckpt, p))

    @property
    def config_record(self) -> dict:
        """What a checkpoint must have been trained with to be resumed (see ``RunConfig.training_record``)."""
        if self._config_record is not None:
            return self._config_record
        return {k: v for k, v in flatten({"train": asdict(self.cfg)}).items() if k != "train.device"}

    def _better(self, score: float, best: float) -> bool:
        return score > best if self.cfg.select_direction == "max" else score < best

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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        model = self.model.to(self.device)
        train = self._inputs(train)
        dev = self._inputs(dev) if dev is not None else None
        also_evaluate = {k: self._inputs(v) for k, v in (also_evaluate or {}).items()}
        self._check_boundaries(train)
        if len(train.dataset.image_paths()) < 2:
            raise ConfigError("training needs at least 2 images")
        frozen = train.features.image if (train.features is not None and cfg.sampling == "hard") else None
        sampler = PairSampler(train.caption_image, len(train.image), cfg.sampling, cfg.batch_size, cfg.seed,
                              image_features=frozen)
        self.loss_fn = self.loss_fn.to(self.device)
        optimizer = self.make_optimizer()
        if cfg.grad_accum_steps < 1:
            raise ConfigError("grad_accum_steps must be >= 1")
        scheduler = make_scheduler(optimizer, cfg, -(-len(sampler) // cfg.grad_accum_steps))
        scaler = (torch.amp.GradScaler("cuda") if self.device.type == "cuda" and cfg.amp
                  and not torch.cuda.is_bf16_supported() else None)
        per_epoch = cfg.schedule == "plateau"
        trainable = [p for p in model.parameters() if p.requires_grad] + \
            [p for p in self.loss_fn.parameters() if p.requires_grad]
        worst = -float("inf") if cfg.select_direction == "max" else float("inf")
        state = {"best_metric": worst, "best_epoch": -1, "bad_epochs": 0, "stopped_early": False}
        start_epoch = 0
        ckpt_path = self.run_dir / CHECKPOINT
        if resume and ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path, self.device)
            check_resume_config(self.run_dir, ckpt.get("config"), self.config_record)
            load_checked(model, ckpt["model"], where=str(ckpt_path), required=self._trainable_state())
            self.loss_fn.load_state_dict(ckpt.get("loss", {}))
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["torch_rng"])
            state = {k: ckpt[k] for k in state}
            start_epoch = ckpt["epoch"] + 1
            if self.dist.is_main:
                truncate_metrics(self.run_dir, ckpt["epoch"])
        elif (self.run_dir / METRICS).exists() and self.dist.is_main:
            (self.run_dir / METRICS).unlink()
        self.dist.barrier()
        writer = self._writer()
        log_scale_max = math.log(cfg.max_logit_scale)
        augment = cfg.augment != "none"
        epochs = range(start_epoch, cfg.epochs)
        bar = tqdm(epochs, desc="train", unit="epoch", disable=not self.progress, dynamic_ncols=True)
        for epoch in bar:
            if state["stopped_early"]:
                break
            model.train()
            t0, losses = time.time(), []
            optimizer.zero_grad(set_to_none=True)
            n_batches = len(sampler)
            steps = tqdm(sampler.epoch(epoch), total=n_batches, desc=f"epoch {epoch}", unit="batch", leave=False,
                         disable=not self.progress or n_batches < 20, dynamic_ncols=True)
            for step, (images, captions) in enumerate(steps, 1):
                rng = np.random.default_rng([cfg.seed, epoch, step, self.dist.rank]) if augment else None
                loss = self.batch_loss(train, images, captions, rng)
                value = loss.item()
                if not math.isfinite(value):
                    last = f"{CHECKPOINT} holds epoch {epoch - 1}" if epoch > 0 else "no epoch finished"
                    raise NumericError(f"training loss is {value} at epoch {epoch}, batch {step} (lr "
                                       f"{optimizer.param_groups[0]['lr']:.3g}); stopped, {last}. Lower train.lr, "
                                       "set train.grad_clip, or check the inputs for NaN")
                # accumulation averages gradients of micro-batches; each keeps its own in-batch negatives
                scaled = loss / cfg.grad_accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                losses.append(value)
                if step % cfg.grad_accum_steps and step != n_batches:
                    continue
                self.dist.average_gradients(trainable)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not per_epoch:
                    scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, log_scale_max)
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                      "temperature": float(1.0 / model.logit_scale.exp().item()), "step_seconds": time.time() - t0}
            for name, split in also_evaluate.items():
                record[name] = self.evaluate(split)
            if dev is not None:
                dev_metrics = self.evaluate(dev)
                record["dev"] = dev_metrics
                score = dev_metrics[cfg.select_metric]
                if not math.isfinite(score):
                    raise NumericError(f"dev {cfg.select_metric} is {score} at epoch {epoch}; not saved as best")
                if per_epoch:
                    scheduler.step(score)
                if self._better(score, state["best_metric"]):
                    state.update(best_metric=score, best_epoch=epoch, bad_epochs=0)
                    if self.dist.is_main:
                        model.save(self.run_dir / BEST)
                else:
                    state["bad_epochs"] += 1
                    if cfg.patience and state["bad_epochs"] >= cfg.patience:
                        state["stopped_early"] = True
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", dev_r1=f"{dev_metrics['t2i_r1']:.1f}/"
                                f"{dev_metrics['i2t_r1']:.1f}")
            record["epoch_seconds"] = time.time() - t0  # optimisation + dev evaluation (training time across resumes)
            if self.dist.is_main:
                self._log(writer, record)
            self._save_checkpoint(epoch, optimizer, scheduler, scaler, state)
            self.dist.barrier()
        bar.close()
        if (dev is None or state["best_epoch"] < 0) and self.dist.is_main:
            model.save(self.run_dir / BEST)
        if writer is not None:
            writer.close()
        return {"best_epoch": state["best_epoch"], f"best_dev_{cfg.select_metric}": state["best_metric"],
                "stopped_early": state["stopped_early"], "config": asdict(cfg)}

    def _writer(self):
        if not self.tensorboard:
            return None
        from cliplab.extras import available

        if not available("torch.utils.tensorboard"):  # optional: every value is in metrics.jsonl as well
            import sys

            print('note: tensorboard is not installed (pip install "cliplab[tensorboard]"); per-epoch metrics '
                  f"are in {rundir.METRICS}", file=sys.stderr)
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / rundir.TENSORBOARD))

    def _log(self, writer, record: dict) -> None:
        append_metrics(self.run_dir, record)
        if writer is not None:
            step = record["epoch"]
            for key in ("train_loss", "lr", "temperature"):
                writer.add_scalar(key, record[key], step)
            for split, metrics in record.items():  # dev and any also_evaluate splits
                if isinstance(metrics, dict):
                    for key, value in metrics.items():
                        writer.add_scalar(f"{split}/{key}", value, step)
            writer.flush()
