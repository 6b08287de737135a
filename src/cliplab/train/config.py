"""Run configuration: model + training + data, loadable from YAML/JSON and saved next to results."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cliplab.errors import ConfigError, check_minimums
from cliplab.rundir import config_changes, flatten  # noqa: F401 - re-exported for callers
from cliplab.models.two_tower import TwoTowerConfig


AUGMENTS = ("none", "flip", "full")
SCHEDULES = ("cosine", "onecycle", "plateau", "constant")
SAMPLINGS = ("random_caption", "all_pairs", "hard")
TRAINABLE = ("heads", "image_head", "text_head", "none")
# settings that never change what a run computes: a resumed run may differ in these
NOT_TRAINING_RELEVANT = ("train.device", "data.cache_dir", "data.num_workers", "data.backend", "baseline")


def _choice(where: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")


def _check_device(device: str, where: str) -> None:
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, not {device!r}")


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 2.0
    schedule: str = "cosine"  # cosine | onecycle | plateau (ReduceLROnPlateau on the dev metric) | constant
    sampling: str = "random_caption"  # random_caption (each image once) | all_pairs | hard (k-means grouped)
    loss: str = "infonce"  # infonce | triplet | ntxent | sigmoid
    loss_args: dict = field(default_factory=dict)  # e.g. {margin: 0.2, mining: semihard} for triplet
    trainable: str = "heads"  # heads | image_head | text_head | none (for a CLIP: its projections)
    # tower tuning: {mode: frozen | last_n | full | lora, last_n: N, lora_r, lora_alpha, lora_dropout, lora_targets}
    image_tower: dict = field(default_factory=lambda: {"mode": "frozen"})
    text_tower: dict = field(default_factory=lambda: {"mode": "frozen"})
    tower_lr: float | None = None  # learning rate of tower parameters (None = lr)
    init_from: str | None = None  # start from a saved cliplab model (heads, temperature, tuned tensors)
    augment: str = "none"  # none | flip (also on cached prefixes) | full (crop/flip/jitter; image tower from pixels)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)
    grad_clip: float = 0.0  # 0 = off
    grad_accum_steps: int = 1  # optimiser step every N batches (each batch keeps its own negatives)
    patience: int = 10  # epochs without dev improvement before stopping (0 = never stop early)
    select_metric: str = "rsum"  # dev metric that picks the best checkpoint
    max_logit_scale: float = 100.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        """Every setting is checked here, before any data is read or model built."""
        from cliplab.eval.retrieval import metric_direction
        from cliplab.models.tuning import TowerTuning
        from cliplab.train.losses import create_loss

        _choice("train.augment", self.augment, AUGMENTS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.sampling", self.sampling, SAMPLINGS)
        _choice("train.trainable", self.trainable, TRAINABLE)
        metric_direction(self.select_metric)  # unknown names fail now, not after an epoch
        create_loss(self.loss, **self.loss_args)  # unknown loss or bad loss_args
        check_minimums(self, "train", (("epochs", 1), ("batch_size", 2), ("grad_accum_steps", 1), ("patience", 0)))
        for name in ("lr", "max_logit_scale"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"train.{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_epochs", "grad_clip"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"train.{name} must be >= 0, not {getattr(self, name)!r}")
        if self.tower_lr is not None and not float(self.tower_lr) > 0:
            raise ConfigError(f"train.tower_lr must be > 0, not {self.tower_lr!r}")
        _check_device(self.device, "train.device")
        self.image_tower = TowerTuning.from_any(self.image_tower, "train.image_tower").to_dict()
        self.text_tower = TowerTuning.from_any(self.text_tower, "train.text_tower").to_dict()

    @property
    def select_direction(self) -> str:
        """``max`` or ``min``: whether a higher dev ``select_metric`` is better (median rank: lower)."""
        from cliplab.eval.retrieval import metric_direction

        return metric_direction(self.select_metric)

    def tunings(self):
        from cliplab.models.tuning import TowerTuning

        return TowerTuning(**self.image_tower), TowerTuning(**self.text_tower)


@dataclass
class DataConfig:
    path: str = "../shared/data/flickr8k"
    image_root: str | None = None
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    on_error: str = "raise"  # raise | skip
    cache_dir: str | None = None
    num_workers: int | None = None
    backend: str = "auto"  # frozen-tower inference: auto | torch | onnx | onnx-int8

    def __post_init__(self) -> None:
        from cliplab.embed.backends import BACKENDS

        _choice("data.on_error", self.on_error, ("raise", "skip"))
        _choice("data.backend", self.backend, BACKENDS)
        for name in ("train_split", "dev_split", "test_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"data.{name} must be a split name, not {getattr(self, name)!r}")


@dataclass
class RunConfig:
    """A training run. ``model`` holds the settings of the registered model kind ``model_kind`` (the config
    file's ``model.kind``, default ``twotower``: a :class:`TwoTowerConfig`; ``clip``: the CLIP to fine-tune,
    ``model.source``). Configs written before ``model.kind`` name a CLIP with a top-level ``clip: SPEC``."""

    model: Any = field(default_factory=TwoTowerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    baseline: bool = True  # also evaluate the model kind's zero-shot baseline (ConSE, or the CLIP before tuning)
    model_kind: str = "twotower"

    def kind(self):
        """The registered model kind (:mod:`cliplab.models.registry`) this run trains."""
        from cliplab.models.registry import model_kind

        return model_kind(self.model_kind)

    def to_dict(self) -> dict:
        return {"model": {"kind": self.model_kind, **_settings_dict(self.model)}, "train": asdict(self.train),
                "data": asdict(self.data), "baseline": self.baseline}

    def training_record(self) -> dict:
        """The settings that decide what training computes, flattened (``train.lr`` -> value); stored in
        checkpoints so that resuming with another config is refused (see :func:`config_changes`). The built-in
        kinds keep the record's shape from before ``model.kind`` (a two-tower ``model``, a top-level ``clip``),
        so that runs started then still resume."""
        d = self.to_dict()
        if self.model_kind in _LEGACY_KINDS:
            d.pop("model")
            clip = self.model_kind == "clip"
            d.update(model=TwoTowerConfig().to_dict() if clip else self.model.to_dict(),
                     clip=self.model.source if clip else None)
        flat = flatten(d)
        return {k: v for k, v in flat.items() if k not in NOT_TRAINING_RELEVANT}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        unknown = set(d) - {"model", "train", "data", "baseline", "clip"}
        if unknown:
            raise ConfigError(f"unknown config sections: {', '.join(sorted(unknown))}")
        section = _model_section(d.get("model"), d.get("clip"))
        name = section.pop("kind", "twotower")
        from cliplab.models.registry import model_kind

        return cls(model=model_kind(name).settings(section), model_kind=name,
                   train=_build(TrainConfig, d.get("train") or {}, "train"),
                   data=_build(DataConfig, d.get("data") or {}, "data"),
                   baseline=bool(d.get("baseline", True)))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A YAML/JSON file, or the name of a packaged config (``flickr8k_heads``)."""
        from cliplab.configs import read_yaml_config

        return cls.from_dict(read_yaml_config(path))

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` overrides (values parsed as YAML). ``model.kind=NAME`` starts the model
        section from that kind's defaults (then ``model.KEY=...`` sets its keys); ``clip=SPEC`` is the older
        spelling of ``model.kind=clip model.source=SPEC``."""
        import yaml

        from cliplab.configs import apply_overrides

        d = {**self.to_dict(), "clip": None}
        kinds = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "model.kind"]
        if kinds and yaml.safe_load(kinds[-1]) != self.model_kind:
            name = str(yaml.safe_load(kinds[-1]))
            d["model"] = {"kind": name, **_default_settings(name)}
        return RunConfig.from_dict(apply_overrides(d, overrides))


_LEGACY_KINDS = ("twotower", "clip")


def _settings_dict(settings) -> dict:
    return settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)


def _default_settings(name: str) -> dict:
    """The ``model`` keys of kind ``name`` with their defaults (None for a setting without one)."""
    from cliplab.models.registry import model_kind

    config = model_kind(name).config
    if config is None:
        return {}
    try:
        return _settings_dict(config())
    except TypeError:  # required settings: named, to be given by the overrides
        return {f.name: None for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}


def _model_section(model, clip) -> dict:
    """The ``model`` section as a dict with its ``kind``: ``model: clip:SPEC`` and the older top-level
    ``clip: SPEC`` (whose run configs also carried an unused two-tower ``model`` section) name kind ``clip``."""
    if isinstance(model, str) and model.startswith("clip:"):
        model, clip = None, clip or model
    if clip:
        if isinstance(model, dict) and model.get("kind", "clip") not in ("clip", "twotower"):
            raise ConfigError(f"config gives both clip: {clip} and model.kind: {model['kind']}; give one")
        return {"kind": "clip", "source": str(clip)}
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"the model section must be a mapping (model.kind and its settings), not {model!r}")
    return dict(model or {})


def _build(cls, values: dict, section: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {section} config keys: {', '.join(sorted(unknown))}")
    return cls(**{k: _coerce(v, fields[k].type, f"{section}.{k}") for k, v in values.items()})


def _coerce(value, annotation, where: str):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: turn numeric strings into the field's number type."""
    kind = str(annotation)
    if isinstance(value, str) and (kind.startswith("float") or kind.startswith("int")):
        try:
            return int(value) if kind.startswith("int") else float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and kind.startswith("float"):
        return float(value)
    return value

