"""Training: contrastive losses, configs, the trainer (heads, tower blocks, LoRA; DDP) and runs.

The package is also the notebook API's verb: ``cliplab.train("flickr8k_heads", overrides=...)`` runs
:func:`cliplab.api.train`."""

from cliplab.train.config import DataConfig, RunConfig, TrainConfig
from cliplab.train.losses import InfoNCELoss, create_loss
from cliplab.train.trainer import Trainer
from cliplab.utils import make_module_callable

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "InfoNCELoss", "create_loss", "Trainer"]


def _api_train():
    from cliplab.api import train

    return train


make_module_callable(__name__, _api_train)
