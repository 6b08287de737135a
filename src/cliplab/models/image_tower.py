"""Image tower: a timm architecture plus a weight source, with its preprocessing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torchvision.transforms as T
from torch import nn

from cliplab.config import check_section, load_section
from cliplab.errors import ConfigError
from cliplab.models.pretrained import DEFAULT_IMAGE_TOWER, map_state_dict, packaged_image_weights
from cliplab.models.stages import Stage, timm_image_stages
from cliplab.models.tuning import apply_lora_spec, tuned_parts
from cliplab.utils import sha256_file, sha256_text


@dataclass
class ImageTowerConfig:
    """``arch`` is a timm model name; ``weights`` is ``packaged`` (offline default), ``timm`` (hub),
    ``none`` (random init) or a path to a ``.pth``/``.safetensors`` state dict."""

    arch: str = DEFAULT_IMAGE_TOWER
    weights: str = "packaged"
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str = "bicubic"
    extra: dict = field(default_factory=dict)  # passed to timm.create_model
    lora: dict | None = None  # LoRA adapters (set by fine-tuning; rebuilt on load)

    def __post_init__(self) -> None:
        check_section(self, "model.image")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, section: str = "model.image") -> "ImageTowerConfig":
        """The inverse of :meth:`to_dict` (JSON and YAML lists become the config's tuples)."""
        return load_section(cls, d, section)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"image weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class ImageTower(nn.Module):
    """Pooled image features from a timm backbone; keeps the classifier for ConSE and probing. An
    :class:`~cliplab.models.base.ImageFeatureTower` the ONNX backends can export."""

    onnx_exportable = True

    def __init__(self, config: ImageTowerConfig | None = None) -> None:
        super().__init__()
        cfg = config or ImageTowerConfig()
        self.config = cfg
        weights_file: Path | None = None
        packaged = packaged_image_weights(cfg.arch) if cfg.weights == "packaged" else None
        if cfg.weights == "packaged" and packaged is None:
            raise ConfigError(f"no packaged weights for image tower {cfg.arch!r}; use weights='timm' or a file path")
        try:
            self.model = timm.create_model(cfg.arch, pretrained=cfg.weights == "timm", **cfg.extra)
        except RuntimeError as exc:  # unknown model name
            raise ConfigError(f"image tower {cfg.arch!r}: {exc}") from None
        if packaged is not None:
            spec, weights_file = packaged
            self.model.load_state_dict(map_state_dict(_load_state_dict(weights_file), self.model, spec.package),
                                       strict=True)
            defaults = (spec.input_size, spec.mean, spec.std)
        else:
            if cfg.weights not in ("timm", "none"):
                weights_file = Path(cfg.weights)
                state = _load_state_dict(weights_file)
                self.model.load_state_dict(map_state_dict(state, self.model, str(weights_file)), strict=True)
            pcfg = self.model.pretrained_cfg
            defaults = (pcfg.get("input_size", (3, 224, 224))[-1], tuple(pcfg.get("mean", (0.5,) * 3)),
                        tuple(pcfg.get("std", (0.5,) * 3)))
        self.image_size = int(cfg.image_size or defaults[0])
        self.mean = tuple(float(x) for x in (cfg.mean or defaults[1]))
        self.std = tuple(float(x) for x in (cfg.std or defaults[2]))
        self.weights_id = sha256_file(weights_file) if weights_file else cfg.weights  # the base weights
        self.weights_delta = ""  # digest of fine-tuned tensors loaded on top of the weights
        apply_lora_spec(self.model, cfg.lora)
        self.model.eval()

    @property
    def output_dim(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    def transform(self) -> T.Compose:
        """Eval preprocessing: resize short side, centre crop, normalise."""
        interp = getattr(T.InterpolationMode, self.config.interpolation.upper())
        return T.Compose([
            T.Resize(self.image_size, interpolation=interp),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> pooled features ``[N, output_dim]``."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def stages(self) -> list[Stage]:
        return timm_image_stages(self.model)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features -> ImageNet-style class logits of the pretrained classifier."""
        head = self.model.get_classifier()
        if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
            raise ConfigError(f"image tower {self.config.arch} has no classifier head")
        return head(features)

    def fingerprint(self) -> str:
        """Identifies architecture, weights and preprocessing (a feature-cache key part)."""
        return sha256_text("image", self.config.arch, self.weights_id, str(self.image_size), str(self.mean),
                           str(self.std), self.config.interpolation, repr(sorted(self.config.extra.items())),
                           *tuned_parts(self.config.lora, self.weights_delta))
