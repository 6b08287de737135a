"""Models: towers, projection heads, the two-tower model, ConSE and real CLIP loading."""

from cliplab.models.clip import CLIPModelWrapper, load_clip
from cliplab.models.conse import ConSE, imagenet_classnames
from cliplab.models.heads import HeadConfig, ProjectionHead
from cliplab.models.image_tower import ImageTower, ImageTowerConfig
from cliplab.models.text_tower import TextTower, TextTowerConfig
from cliplab.models.tuning import TowerTuning
from cliplab.models.two_tower import TwoTower, TwoTowerConfig

__all__ = [
    "CLIPModelWrapper", "load_clip", "ConSE", "imagenet_classnames", "HeadConfig", "ProjectionHead",
    "ImageTower", "ImageTowerConfig", "TextTower", "TextTowerConfig", "TowerTuning", "TwoTower",
    "TwoTowerConfig",
]
