"""TwoTower: pretrained image tower + pretrained text tower + projection heads + learnable temperature."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cliplab.errors import ConfigError
from cliplab.models.heads import HeadConfig, ProjectionHead
from cliplab.models.image_tower import ImageTower, ImageTowerConfig
from cliplab.models.text_tower import TextTower, TextTowerConfig
from cliplab.utils import atomic_write, write_json

CONFIG_NAME = "cliplab_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TwoTowerConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    init_temperature: float = 0.07
    learn_temperature: bool = True

    def to_dict(self) -> dict:
        return {"image": self.image.to_dict(), "text": self.text.to_dict(), "head": self.head.to_dict(),
                "init_temperature": self.init_temperature, "learn_temperature": self.learn_temperature}

    @classmethod
    def from_dict(cls, d: dict) -> "TwoTowerConfig":
        known = {"image", "text", "head", "init_temperature", "learn_temperature"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        image = dict(d.get("image", {}))
        for key in ("mean", "std"):
            if image.get(key) is not None:
                image[key] = tuple(image[key])
        try:
            return cls(
                image=ImageTowerConfig(**image),
                text=TextTowerConfig(**d.get("text", {})),
                head=HeadConfig(**d.get("head", {})),
                init_temperature=float(d.get("init_temperature", 0.07)),
                learn_temperature=bool(d.get("learn_temperature", True)),
            )
        except TypeError as exc:
            raise ConfigError(f"bad model config: {exc}") from None


class TwoTower(nn.Module):
    """A CLIP-style dual encoder built from separately pretrained towers."""

    def __init__(self, config: TwoTowerConfig | None = None, *, image_tower: ImageTower | None = None,
                 text_tower: TextTower | None = None) -> None:
        super().__init__()
        self.config = config or TwoTowerConfig()
        self.image_tower = image_tower or ImageTower(self.config.image)
        self.text_tower = text_tower or TextTower(self.config.text)
        self.image_head = ProjectionHead(self.image_tower.output_dim, self.config.head)
        self.text_head = ProjectionHead(self.text_tower.output_dim, self.config.head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.config.init_temperature)),
                                        requires_grad=self.config.learn_temperature)

    @property
    def embed_dim(self) -> int:
        return self.config.head.embed_dim

    def freeze_towers(self) -> "TwoTower":
        for p in list(self.image_tower.parameters()) + list(self.text_tower.parameters()):
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "TwoTower":
        """Frozen towers stay in eval mode (BatchNorm statistics and dropout untouched) while heads train."""
        super().train(mode)
        for tower in (self.image_tower, self.text_tower):
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self

    def set_trainable(self, mode: str) -> "TwoTower":
        """``heads`` (both heads + temperature), ``image_head`` or ``text_head`` (the other side fixed)."""
        modes = {"heads": ("image_head", "text_head"), "image_head": ("image_head",), "text_head": ("text_head",)}
        if mode not in modes:
            raise ConfigError(f"trainable must be one of {', '.join(modes)}, not {mode!r}")
        self.freeze_towers()
        for name in ("image_head", "text_head"):
            for p in getattr(self, name).parameters():
                p.requires_grad_(name in modes[mode])
        return self

    # -- from cached tower features (training heads on frozen towers)
    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.image_head(features)
        return F.normalize(z, dim=-1) if normalize else z

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.text_head(features)
        return F.normalize(z, dim=-1) if normalize else z

    # -- the open_clip convention
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Preprocessed images ``[N, 3, H, W]`` -> embeddings ``[N, d]``."""
        return self.project_image(self.image_tower(images), normalize)

    def encode_text(self, texts: list[str] | dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Strings (or a tokenizer batch) -> embeddings ``[N, d]``."""
        feats = self.text_tower.encode(texts) if isinstance(texts, (list, tuple)) else self.text_tower(**texts)
        return self.project_text(feats, normalize)

    def forward(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(texts), self.logit_scale.exp()

    def preprocess(self):
        return self.image_tower.transform()

    # -- persistence
    def _tower_state_trained(self) -> bool:
        return any(p.requires_grad for p in list(self.image_tower.parameters()) + list(self.text_tower.parameters()))

    def save(self, directory: str | Path, include_towers: bool | None = None) -> Path:
        """Config JSON + safetensors. Tower weights are stored when they were trained (or asked for)."""
        directory = Path(directory)
        include = self._tower_state_trained() if include_towers is None else include_towers
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if include or not k.startswith(("image_tower.", "text_tower."))}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
        write_json(directory / CONFIG_NAME, {"model_type": "cliplab.TwoTower", "includes_towers": include,
                                              **self.config.to_dict()})
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "TwoTower":
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise ConfigError(f"not a cliplab model directory (no {CONFIG_NAME}): {directory}")
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        raw.pop("model_type", None)
        includes_towers = raw.pop("includes_towers", False)
        model = cls(TwoTowerConfig.from_dict(raw))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if includes_towers or not k.startswith(("image_tower.", "text_tower."))]
        if bad_missing or unexpected:
            raise ConfigError(f"{directory}: weights do not match config (missing {bad_missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        return model.eval()
