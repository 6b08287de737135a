"""Training: contrastive losses, configs, the trainer (heads, tower blocks, LoRA; DDP) and runs."""

from cliplab.train.config import DataConfig, RunConfig, TrainConfig
from cliplab.train.losses import InfoNCELoss, create_loss
from cliplab.train.trainer import Trainer

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "InfoNCELoss", "create_loss", "Trainer"]
