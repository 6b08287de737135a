"""Models: towers, projection heads, the two-tower model, ConSE and real CLIP loading.

Create and load models through :mod:`cliplab.models.factory` (``create_model``, ``create_conse``,
``load_model``); :mod:`cliplab.models.base` says what every model and tower offers; a new kind of model is one
:func:`~cliplab.models.registry.register_model_kind` call.
"""

from cliplab.models.base import (EmbeddingModel, ImageFeatureTower, TextFeatureTower, Tower, TowerModel,
                                 TrainableModel)
from cliplab.models.clip import CLIPModelWrapper, load_clip
from cliplab.models.conse import ConSE, imagenet_classnames
from cliplab.models.factory import create_conse, create_model, load_model
from cliplab.models.heads import HeadConfig, ProjectionHead
from cliplab.models.image_tower import ImageTower, ImageTowerConfig
from cliplab.models.registry import register_model_kind, unregister_model_kind
from cliplab.models.text_tower import TextTower, TextTowerConfig
from cliplab.models.tuning import TowerTuning
from cliplab.models.two_tower import TwoTower, TwoTowerConfig

__all__ = [
    "EmbeddingModel", "TowerModel", "TrainableModel", "Tower", "ImageFeatureTower", "TextFeatureTower",
    "register_model_kind", "unregister_model_kind", "CLIPModelWrapper", "load_clip", "ConSE",
    "imagenet_classnames", "create_conse", "create_model", "load_model", "HeadConfig", "ProjectionHead",
    "ImageTower", "ImageTowerConfig", "TextTower", "TextTowerConfig", "TowerTuning", "TwoTower", "TwoTowerConfig",
]
