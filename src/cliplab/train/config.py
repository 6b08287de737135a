"""Run configuration: model + training + data, loadable from YAML/JSON and saved next to results."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cliplab.config import check_section, coerce, load_section, setting
from cliplab.errors import ConfigError
from cliplab.rundir import config_changes, flatten  # noqa: F401 - re-exported for callers
from cliplab.models.two_tower import TwoTowerConfig


AUGMENTS = ("none", "flip", "full")
SCHEDULES = ("cosine", "onecycle", "plateau", "constant")
SAMPLINGS = ("random_caption", "all_pairs", "hard")
TRAINABLE = ("heads", "image_head", "text_head", "none")
DEFAULT_EVALUATOR = "retrieval"
# settings that never change what a run computes: a resumed run may differ in these
NOT_TRAINING_RELEVANT = ("train.device", "data.cache_dir", "data.num_workers", "data.backend", "baseline",
                         "train.image_tower.grad_checkpointing", "train.text_tower.grad_checkpointing")


def _check_device(device: str, where: str) -> None:
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, not {device!r}")


def _evaluator_names() -> tuple[str, ...]:
    from cliplab.eval.evaluators import EVALUATORS

    return tuple(EVALUATORS)


def _backends() -> tuple[str, ...]:
    from cliplab.embed.backends import BACKENDS

    return tuple(BACKENDS)


@dataclass
class TrainConfig:
    epochs: int = setting(60, min=1)
    batch_size: int = setting(256, min=2)
    lr: float = setting(1e-3, above=0)
    weight_decay: float = setting(0.1, min=0)
    warmup_epochs: float = setting(2.0, min=0)
    # cosine | onecycle | plateau (ReduceLROnPlateau on the dev metric) | constant
    schedule: str = setting("cosine", choices=SCHEDULES)
    # random_caption (each image once) | all_pairs | hard (k-means grouped)
    sampling: str = setting("random_caption", choices=SAMPLINGS)
    loss: str = "infonce"  # a name in cliplab.train.losses.LOSSES: infonce | triplet | ntxent | sigmoid | ...
    loss_args: dict = field(default_factory=dict)  # e.g. {margin: 0.2, mining: semihard} for triplet
    # heads | image_head | text_head | none (for a CLIP: its projections)
    trainable: str = setting("heads", choices=TRAINABLE)
    # tower tuning: {mode: frozen | last_n | full | lora, last_n: N, lora_r, lora_alpha, lora_dropout, lora_targets}
    image_tower: dict | str = field(default_factory=lambda: {"mode": "frozen"})
    text_tower: dict | str = field(default_factory=lambda: {"mode": "frozen"})
    tower_lr: float | None = setting(None, above=0)  # learning rate of tower parameters (None = lr)
    init_from: str | None = None  # start from a saved cliplab model (heads, temperature, tuned tensors)
    # none | flip (also on cached prefixes) | full (crop/flip/jitter; image tower from pixels)
    augment: str = setting("none", choices=AUGMENTS)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)
    grad_clip: float = setting(0.0, min=0)  # 0 = off
    grad_accum_steps: int = setting(1, min=1)  # optimiser step every N batches (each batch keeps its negatives)
    patience: int = setting(10, min=0)  # epochs without dev improvement before stopping (0 = never stop early)
    # the registered evaluator (cliplab.eval.evaluators) scoring the dev split after every epoch
    evaluator: str = setting(DEFAULT_EVALUATOR, choices=_evaluator_names)
    select_metric: str | None = None  # its dev metric that picks the best checkpoint (None: its primary metric)
    max_logit_scale: float = setting(100.0, above=0)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        """Every setting is checked here, before any data is read or model built."""
        from cliplab.models.tuning import TowerTuning
        from cliplab.train.losses import create_loss

        check_section(self, "train")
        evaluator = self.evaluator_class
        evaluator.check_trains("train.evaluator")  # it can score the dev split of a contrastive run
        self.select_metric = self.select_metric or evaluator.primary_metric
        try:  # unknown names fail now, not after an epoch
            evaluator.direction(self.select_metric)
        except ConfigError as exc:
            raise ConfigError(f"train.select_metric: {exc}") from None
        create_loss(self.loss, **self.loss_args)  # unknown loss or bad loss_args
        _check_device(self.device, "train.device")
        self.image_tower = TowerTuning.from_any(self.image_tower, "train.image_tower").to_dict()
        self.text_tower = TowerTuning.from_any(self.text_tower, "train.text_tower").to_dict()

    @property
    def evaluator_class(self):
        """The registered :class:`~cliplab.eval.evaluators.Evaluator` class named by ``evaluator``."""
        from cliplab.eval.evaluators import evaluator_class

        return evaluator_class(self.evaluator)

    @property
    def select_direction(self) -> str:
        """``max`` or ``min``: whether a higher dev ``select_metric`` is better, as the evaluator says (a
        retrieval median rank: lower)."""
        return self.evaluator_class.direction(self.select_metric)

    def tunings(self):
        from cliplab.models.tuning import TowerTuning

        return TowerTuning(**self.image_tower), TowerTuning(**self.text_tower)


@dataclass
class DatasetConfig:
    """A caption dataset and its train / dev / test split names: the ``data`` settings that contrastive runs
    (:class:`DataConfig`) and caption runs (``CaptionDataConfig``) share."""

    path: str = "../shared/data/flickr8k"
    image_root: str | None = None
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    cache_dir: str | None = None
    # frozen-tower inference: auto | torch | onnx | onnx-int8
    backend: str = setting("auto", choices=_backends)

    def __post_init__(self) -> None:
        check_section(self, "data")
        for name in ("train_split", "dev_split", "test_split"):
            if not getattr(self, name):
                raise ConfigError(f"data.{name} must be a split name, not {getattr(self, name)!r}")


@dataclass
class DataConfig(DatasetConfig):
    """The ``data`` section of a contrastive training run."""

    on_error: str = setting("raise", choices=("raise", "skip"))  # an unreadable image: raise | skip it
    num_workers: int | None = setting(None, min=0)


def without_default_evaluator(record: dict) -> dict:
    """A flat training record without ``train.evaluator`` when it is the default: runs started before the
    setting existed record none, and still resume."""
    return {k: v for k, v in record.items() if not (k == "train.evaluator" and v == DEFAULT_EVALUATOR)}


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
        so that runs started then still resume; so does ``train.evaluator``, recorded only when not the default."""
        d = self.to_dict()
        if self.model_kind in _LEGACY_KINDS:
            d.pop("model")
            clip = self.model_kind == "clip"
            d.update(model=TwoTowerConfig().to_dict() if clip else self.model.to_dict(),
                     clip=self.model.source if clip else None)
        flat = without_default_evaluator(flatten(d))
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
                   train=load_section(TrainConfig, d.get("train"), "train"),
                   data=load_section(DataConfig, d.get("data"), "data"),
                   baseline=coerce(d.get("baseline", True), bool, "baseline"))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A YAML/JSON file, or the name of a packaged config (``flickr8k_heads``)."""
        from cliplab.configs import read_yaml_config

        return cls.from_dict(read_yaml_config(path))

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` overrides (values parsed as YAML). ``model.kind=NAME`` starts the model
        section from that kind's defaults (then ``model.KEY=...`` sets its keys); ``clip=SPEC`` is the older
        spelling of ``model.kind=clip model.source=SPEC``. ``train.evaluator=NAME`` without ``train.select_metric``
        selects on that evaluator's primary metric."""
        import yaml

        from cliplab.configs import apply_overrides

        d = {**self.to_dict(), "clip": None}
        kinds = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "model.kind"]
        if kinds and yaml.safe_load(kinds[-1]) != self.model_kind:
            name = str(yaml.safe_load(kinds[-1]))
            d["model"] = {"kind": name, **_default_settings(name)}
        keys = {o.partition("=")[0].strip() for o in overrides}
        if "train.evaluator" in keys and "train.select_metric" not in keys:
            d["train"]["select_metric"] = None
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
