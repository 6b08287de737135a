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

from cliplab import rundir
from cliplab.config import check_section, load_section, setting
from cliplab.errors import ConfigError
from cliplab.models.checkpoint import check_base_weights, load_checked
from cliplab.models.heads import HeadConfig, ProjectionHead
from cliplab.models.image_tower import ImageTower, ImageTowerConfig
from cliplab.models.text_tower import TextTower, TextTowerConfig
from cliplab.models.stages import Stage, Stages
from cliplab.models.tuning import TowerTuning, apply_tower_tuning, count_parameters
from cliplab.utils import atomic_write, sha256_state, sha256_text, write_json

CONFIG_NAME = rundir.TWO_TOWER_CONFIG
WEIGHTS_NAME = rundir.MODEL_WEIGHTS


@dataclass
class TwoTowerConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    init_temperature: float = setting(0.07, above=0)
    learn_temperature: bool = True

    def to_dict(self) -> dict:
        return {"image": self.image.to_dict(), "text": self.text.to_dict(), "head": self.head.to_dict(),
                "init_temperature": self.init_temperature, "learn_temperature": self.learn_temperature}

    def __post_init__(self) -> None:
        check_section(self, "model")

    @classmethod
    def from_dict(cls, d: dict) -> "TwoTowerConfig":
        """A run config's ``model`` section (or a saved model's config) through the one config loader."""
        return load_section(cls, d, "model")


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
        self.tuned_tower_keys: list[str] = []
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
        """Frozen towers stay in eval mode (dropout off) while heads train; BatchNorm statistics are never
        updated, also in partly trained towers (their cached prefixes were computed with them)."""
        super().train(mode)
        for tower in (self.image_tower, self.text_tower):
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def set_trainable(self, mode: str) -> "TwoTower":
        """``heads`` (both heads + temperature), ``image_head`` or ``text_head`` (the other side fixed), or
        ``none`` (only tower tuning and the temperature train). Freezes the towers."""
        modes = {"heads": ("image_head", "text_head"), "image_head": ("image_head",), "text_head": ("text_head",),
                 "none": ()}
        if mode not in modes:
            raise ConfigError(f"trainable must be one of {', '.join(modes)}, not {mode!r}")
        self.freeze_towers()
        for name in ("image_head", "text_head"):
            for p in getattr(self, name).parameters():
                p.requires_grad_(name in modes[mode])
        return self

    def tune_towers(self, image: TowerTuning, text: TowerTuning) -> dict:
        """Make tower parameters trainable (last N blocks, whole, or LoRA adapters); call after
        ``set_trainable``. Returns trainable/total parameter counts per part."""
        for tower, tuning, stages in ((self.image_tower, image, self.image_stages()),
                                      (self.text_tower, text, self.text_stages())):
            spec = apply_tower_tuning(tower.model, stages, tuning)
            if spec is not None:
                tower.config.lora = spec
        self.tuned_tower_keys = sorted(k for k, p in self.named_parameters()
                                       if p.requires_grad and k.startswith(("image_tower.", "text_tower.")))
        return {name: count_parameters(getattr(self, name)) for name in
                ("image_tower", "text_tower", "image_head", "text_head")}

    # -- stages (what fine-tuning caches and runs)
    def image_stages(self) -> Stages:
        return Stages(self.image_tower.stages() + [Stage("head", [self.image_head], self.image_head, is_block=False)])

    def text_stages(self) -> Stages:
        return Stages(self.text_tower.stages() + [Stage("head", [self.text_head], self.text_head, is_block=False)])

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

    def side_fingerprints(self) -> tuple[str, str]:
        """Tower fingerprints (what cached tower features and frozen prefixes are keyed by)."""
        return self.image_tower.fingerprint(), self.text_tower.fingerprint()

    def fingerprint(self) -> str:
        """Towers + the current head/temperature tensors: changes whenever the embeddings can."""
        heads = {k: v for k, v in self.state_dict().items() if not k.startswith(("image_tower.", "text_tower."))}
        return sha256_text("twotower", *self.side_fingerprints(), sha256_state(heads))

    def base_weights(self) -> dict[str, str]:
        """Digests of the pretrained tower weights the trained tensors sit on."""
        return {"image": self.image_tower.weights_id, "text": self.text_tower.weights_id}

    # -- persistence
    def _saved_keys(self, include_towers: bool = False) -> list[str]:
        tuned = set(self.tuned_tower_keys)
        return [k for k in self.state_dict()
                if include_towers or k in tuned or not k.startswith(("image_tower.", "text_tower."))]

    def save(self, directory: str | Path, include_towers: bool = False) -> Path:
        """Config JSON + safetensors: heads, temperature and the fine-tuned tower tensors (LoRA adapters,
        unfrozen blocks); the rest of each tower comes from its weight source on load. ``include_towers``
        stores the towers whole."""
        directory = Path(directory)
        keys = set(self._saved_keys(include_towers))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in keys}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
        write_json(directory / CONFIG_NAME, {"model_type": "cliplab.TwoTower", "includes_towers": include_towers,
                                              "tuned_tower_keys": sorted(self.tuned_tower_keys),
                                              "base_weights": self.base_weights(), **self.config.to_dict()})
        return directory

    def load_trained(self, directory: str | Path) -> None:
        """Reload tensors this model saved (e.g. the dev-selected ``best/``), strictly: every saved key must
        exist here and every tensor this model saves must be in the file."""
        directory = Path(directory)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise ConfigError(f"{directory}: no {WEIGHTS_NAME}")
        raw = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")) if (directory / CONFIG_NAME).is_file() else {}
        check_base_weights(raw.get("base_weights"), self.base_weights(), str(directory))
        state = load_file(str(path), device=str(self.logit_scale.device))
        load_checked(self, state, where=str(path), required=self._saved_keys())

    def init_from(self, path: str | Path) -> None:
        """Copy a saved two-tower model's tensors (heads, temperature, any tuned tower tensors) into this model
        (``train.init_from``; call after tuning, so that LoRA adapters exist to receive saved ones): every saved
        tensor must exist here, the heads must be there, and the base weights must be the same."""
        path = rundir.model_dir(Path(path))
        weights = path / WEIGHTS_NAME
        if not weights.is_file() or not (path / CONFIG_NAME).is_file():
            raise ConfigError(f"train.init_from: {path} is not a two-tower model folder (no {WEIGHTS_NAME})")
        check_base_weights(rundir.read_json(path / CONFIG_NAME).get("base_weights"), self.base_weights(),
                           f"train.init_from {path}")
        heads = [k for k in self.state_dict() if k.startswith(("image_head.", "text_head.", "logit_scale"))]
        load_checked(self, load_file(str(weights)), where=f"train.init_from {weights}", required=heads)

    # -- weight interpolation (WiSE-FT): the tensors a fine-tuned model saved
    def interpolation_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def interpolation_keys(self) -> list[str]:
        """Heads, temperature and tuned tower tensors (the initial model's value of a tower tensor it did not
        tune is its pretrained weight)."""
        heads = [k for k in self.state_dict() if not k.startswith(("image_tower.", "text_tower."))]
        return sorted(set(heads) | set(self.tuned_tower_keys))

    def load_interpolated(self, state: dict[str, torch.Tensor], alpha: float) -> None:
        """Load mixed tensors; each tower's fingerprint follows the mix of its own tensors."""
        self.load_state_dict(state, strict=False)
        for prefix, tower in (("image_tower.", self.image_tower), ("text_tower.", self.text_tower)):
            keys = {k: v for k, v in state.items() if k.startswith(prefix)}
            tower.weights_delta = sha256_state(keys) if keys else ""

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu", *,
             build_tower=None) -> "TwoTower":
        """A saved model: towers from their weight sources (``build_tower(config)``, default the tower
        classes; the factory passes its cache), then the saved tensors, loaded strictly."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise ConfigError(f"not a cliplab model directory (no {CONFIG_NAME}): {directory}")
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        raw.pop("model_type", None)
        includes_towers = raw.pop("includes_towers", False)
        tuned = raw.pop("tuned_tower_keys", [])
        base = raw.pop("base_weights", None)
        cfg = TwoTowerConfig.from_dict(raw)
        if build_tower is not None:
            image, text = build_tower(cfg.image), build_tower(cfg.text)
            cfg.image, cfg.text = image.config, text.config
            model = cls(cfg, image_tower=image, text_tower=text)
        else:
            model = cls(cfg)
        check_base_weights(base, model.base_weights(), str(directory))
        if not (directory / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{directory}: no {WEIGHTS_NAME}")
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        model.tuned_tower_keys = list(tuned)
        load_checked(model, state, where=str(directory / WEIGHTS_NAME), required=model._saved_keys(includes_towers))
        for prefix, tower in (("image_tower.", model.image_tower), ("text_tower.", model.text_tower)):
            keys = sorted(k for k in state if k.startswith(prefix))
            if keys:  # feature caches must not mix fine-tuned and original tower outputs
                tower.weights_delta = sha256_state({k: state[k] for k in keys})
        return model.eval()
