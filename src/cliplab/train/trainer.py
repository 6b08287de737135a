"""Train projection heads (and the temperature) on cached frozen-tower features.

Dev evaluation every epoch, early stopping on a dev recall metric, ``best/`` and ``last.pt``
checkpoints, ``metrics.jsonl`` + TensorBoard logs. A killed run resumes from ``last.pt``; epoch
shuffles are a function of (seed, epoch), so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cliplab.embed.pipeline import DatasetFeatures, evaluate_retrieval
from cliplab.errors import ConfigError
from cliplab.train.config import TrainConfig
from cliplab.train.losses import create_loss
from cliplab.utils import atomic_write, resolve_device, seed_everything, write_text

CHECKPOINT = "last.pt"
BEST_DIR = "best"
METRICS = "metrics.jsonl"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the temperature are not decayed (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=max(warmup / total, 0.01))
    if cfg.schedule == "plateau":  # stepped once per epoch on the dev metric (see HeadTrainer.fit)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
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
    """Batches of (image index, caption index) for one epoch, deterministic in (seed, epoch)."""

    def __init__(self, caption_image: np.ndarray, n_images: int, mode: str, batch_size: int, seed: int) -> None:
        if mode not in ("random_caption", "all_pairs"):
            raise ConfigError(f"sampling must be random_caption or all_pairs, not {mode!r}")
        self.caption_image = np.asarray(caption_image)
        self.mode, self.batch_size, self.seed = mode, batch_size, seed
        order = np.argsort(self.caption_image, kind="stable")
        counts = np.bincount(self.caption_image, minlength=n_images)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts, self.order, self.n_images = counts, order, n_images
        self.images_with_captions = np.flatnonzero(counts > 0)

    def __len__(self) -> int:
        n = len(self.images_with_captions) if self.mode == "random_caption" else len(self.caption_image)
        return max(1, n // self.batch_size)  # drop the ragged last batch: contrastive losses need negatives

    def epoch(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "random_caption":
            images = rng.permutation(self.images_with_captions)
            pick = (rng.random(len(images)) * self.counts[images]).astype(np.int64)
            captions = self.order[self.starts[images] + pick]
        else:
            captions = rng.permutation(len(self.caption_image))
            images = self.caption_image[captions]
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield images[sl], captions[sl]


class HeadTrainer:
    """Fits the trainable parameters of a model with ``project_image``/``project_text`` on cached features."""

    def __init__(self, model: nn.Module, config: TrainConfig, run_dir: str | Path, *, progress: bool = True,
                 tensorboard: bool = True) -> None:
        self.model = model
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.device = resolve_device(config.device)
        self.loss_fn = create_loss(config.loss, **config.loss_args)
        self.progress = progress
        self.tensorboard = tensorboard

    # -- evaluation
    def evaluate(self, feats: DatasetFeatures) -> dict[str, float]:
        return evaluate_retrieval(self.model, feats, self.device)

    # -- checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if k in names or k.startswith(("image_head.", "text_head."))}

    def _save_checkpoint(self, epoch: int, optimizer, scheduler, state: dict) -> None:
        ckpt = {"epoch": epoch, "model": self._trainable_state(), "loss": self.loss_fn.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), **state}
        atomic_write(self.run_dir / CHECKPOINT, lambda p: torch.save(ckpt, p))

    def fit(self, train: DatasetFeatures, dev: DatasetFeatures | None = None, resume: bool = True,
            also_evaluate: dict[str, DatasetFeatures] | None = None) -> dict:
        """Train; ``dev`` picks the best epoch, ``also_evaluate`` splits are only logged each epoch."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        model = self.model.to(self.device)
        sampler = PairSampler(train.caption_image, len(train.image), cfg.sampling, cfg.batch_size, cfg.seed)
        if len(train.image) < 2:
            raise ConfigError("training needs at least 2 images")
        self.loss_fn = self.loss_fn.to(self.device)
        groups = param_groups(model, cfg.weight_decay)
        groups[1]["params"] += [p for p in self.loss_fn.parameters() if p.requires_grad]  # e.g. SigLIP's bias
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        if cfg.grad_accum_steps < 1:
            raise ConfigError("grad_accum_steps must be >= 1")
        scheduler = make_scheduler(optimizer, cfg, -(-len(sampler) // cfg.grad_accum_steps))
        per_epoch = cfg.schedule == "plateau"
        state = {"best_metric": -float("inf"), "best_epoch": -1, "bad_epochs": 0, "stopped_early": False}
        start_epoch = 0
        ckpt_path = self.run_dir / CHECKPOINT
        if resume and ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location=self.device, weights_only=False)
            model.load_state_dict(ckpt["model"], strict=False)
            self.loss_fn.load_state_dict(ckpt.get("loss", {}))
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["torch_rng"])
            state = {k: ckpt[k] for k in state}
            start_epoch = ckpt["epoch"] + 1
            self._truncate_metrics(ckpt["epoch"])
        elif (self.run_dir / METRICS).exists():
            (self.run_dir / METRICS).unlink()
        writer = self._writer()
        img_all = torch.from_numpy(np.array(train.image, dtype=np.float32)).to(self.device)
        txt_all = torch.from_numpy(np.array(train.text, dtype=np.float32)).to(self.device)
        log_scale_max = math.log(cfg.max_logit_scale)
        epochs = range(start_epoch, cfg.epochs)
        bar = tqdm(epochs, desc="train", unit="epoch", disable=not self.progress, dynamic_ncols=True)
        for epoch in bar:
            if state["stopped_early"]:
                break
            model.train()
            t0, losses = time.time(), []
            optimizer.zero_grad(set_to_none=True)
            n_batches = len(sampler)
            for step, (images, captions) in enumerate(sampler.epoch(epoch), 1):
                ids = torch.as_tensor(images, device=self.device)
                zi = model.project_image(img_all[ids])
                zt = model.project_text(txt_all[torch.as_tensor(captions, device=self.device)])
                loss = self.loss_fn(zi, zt, model.logit_scale.exp(), image_ids=ids)
                # accumulation averages gradients of micro-batches; each keeps its own in-batch negatives
                (loss / cfg.grad_accum_steps).backward()
                losses.append(loss.item())
                if step % cfg.grad_accum_steps and step != n_batches:
                    continue
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not per_epoch:
                    scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, log_scale_max)
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                      "temperature": float(1.0 / model.logit_scale.exp().item()), "epoch_seconds": time.time() - t0}
            for name, feats in (also_evaluate or {}).items():
                record[name] = self.evaluate(feats)
            if dev is not None:
                dev_metrics = self.evaluate(dev)
                record["dev"] = dev_metrics
                score = dev_metrics[cfg.select_metric]
                if per_epoch:
                    scheduler.step(score)
                if score > state["best_metric"]:
                    state.update(best_metric=score, best_epoch=epoch, bad_epochs=0)
                    model.save(self.run_dir / BEST_DIR)
                else:
                    state["bad_epochs"] += 1
                    if cfg.patience and state["bad_epochs"] >= cfg.patience:
                        state["stopped_early"] = True
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", dev_r1=f"{dev_metrics['t2i_r1']:.1f}/"
                                f"{dev_metrics['i2t_r1']:.1f}")
            self._log(writer, record)
            self._save_checkpoint(epoch, optimizer, scheduler, state)
        bar.close()
        if dev is None or state["best_epoch"] < 0:
            model.save(self.run_dir / BEST_DIR)
        if writer is not None:
            writer.close()
        return {"best_epoch": state["best_epoch"], f"best_dev_{cfg.select_metric}": state["best_metric"],
                "stopped_early": state["stopped_early"], "config": asdict(cfg)}

    def _writer(self):
        if not self.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _log(self, writer, record: dict) -> None:
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            step = record["epoch"]
            for key in ("train_loss", "lr", "temperature"):
                writer.add_scalar(key, record[key], step)
            for split, metrics in record.items():  # dev and any also_evaluate splits
                if isinstance(metrics, dict):
                    for key, value in metrics.items():
                        writer.add_scalar(f"{split}/{key}", value, step)
            writer.flush()

    def _truncate_metrics(self, last_epoch: int) -> None:
        path = self.run_dir / METRICS
        if not path.is_file():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
        write_text(path, "".join(ln + "\n" for ln in keep))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
