"""One place where models are created and loaded (open_clip's ``factory.py`` / timm's ``create_model``).

``create_model(config)`` builds a fresh two-tower model; ``create_conse()`` the zero-shot baseline;
``load_model(spec)`` resolves every way a user names a model, through the registered model kinds
(:mod:`cliplab.models.registry`; the built-in ones are registered at the end of this module, one call each):

- ``conse``: ConSE over the default offline towers; ``conse:ARCH`` over another packaged image tower
  (``conse:efficientnet_lite2``); ``conse:ARCH@SIZE`` feeds that tower ``SIZE``-pixel inputs instead of its
  native size (the ``ARCH[@SIZE]`` names of :func:`image_tower_config`, which also name a linear probe's
  stacked features: :func:`feature_stack`, ``cliplab eval probe --features lite0,lite2@224``);
- ``clip:SPEC``: a real CLIP through :func:`cliplab.models.clip.load_clip` (folder, ``ARCH/TAG``,
  ``hf-hub:...``, HF id);
- a training run folder (its dev-selected ``best/``) or a saved model folder (two-tower or tuned CLIP);
- ``ensemble:W*SPEC+W*SPEC``: a weighted sum of the named models' similarities
  (:mod:`cliplab.models.ensemble`), e.g. ``ensemble:0.6*conse+0.4*runs/demo``; or a folder written by
  ``cliplab ensemble`` (its ``ensemble.json`` names the members and their dev-chosen weights).

Every model returned satisfies :class:`~cliplab.models.base.EmbeddingModel`. A new kind of model (another
prefix, another saved-folder layout, another trainable model) is one ``register_model_kind`` call.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from cliplab.errors import ConfigError
from cliplab.models.base import EmbeddingModel
from cliplab.models.clip import CLIP_TUNED_CONFIG, CLIPModelWrapper, CLIPSource, load_clip
from cliplab.models.conse import CONSE_TEMPLATES, ConSE, imagenet_classnames
from cliplab.models.image_tower import ImageTower, ImageTowerConfig
from cliplab.models.registry import (ModelKind, folder_markers, kind_for_folder, kind_for_spec, register_model_kind,
                                     spec_usage)
from cliplab.models.text_tower import TextTower, TextTowerConfig
from cliplab.models.two_tower import CONFIG_NAME, TwoTower, TwoTowerConfig
from cliplab.rundir import BEST, ENSEMBLE


_TOWERS: OrderedDict[str, torch.nn.Module] = OrderedDict()  # recently built pretrained towers (pristine)
_MAX_TOWERS = 4


def pretrained_tower(config: ImageTowerConfig | TextTowerConfig) -> ImageTower | TextTower:
    """A pretrained tower for ``config``: built from its weight source once per process, then handed out as
    private copies (callers may tune them) so repeated model builds do not reload weights from disk."""
    cls = ImageTower if isinstance(config, ImageTowerConfig) else TextTower
    key = cls.__name__ + json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _TOWERS:
        _TOWERS[key] = cls(copy.deepcopy(config))
        while len(_TOWERS) > _MAX_TOWERS:
            _TOWERS.popitem(last=False)
    _TOWERS.move_to_end(key)
    return copy.deepcopy(_TOWERS[key])


def create_model(config: TwoTowerConfig | dict | None = None, seed: int | None = None) -> TwoTower:
    """A new two-tower model: pretrained towers from their weight sources, fresh heads. With ``seed`` the
    heads are initialised from ``torch.manual_seed(seed)`` taken after the towers are built, so the
    initialisation never depends on whether the towers came from disk or from the in-process cache."""
    if isinstance(config, dict):
        config = TwoTowerConfig.from_dict(config)
    cfg = copy.deepcopy(config or TwoTowerConfig())  # tuning records adapters in the model's config, not the caller's
    image, text = pretrained_tower(cfg.image), pretrained_tower(cfg.text)
    cfg.image, cfg.text = image.config, text.config  # one config object per tower: tuning records adapters there
    if seed is not None:
        torch.manual_seed(seed)
    return TwoTower(cfg, image_tower=image, text_tower=text)


_CONSE_CLASSES: dict[str, torch.Tensor] = {}  # text-tower fingerprint -> ConSE class embeddings


def create_conse(image_tower: ImageTower | None = None, text_tower: TextTower | None = None,
                 disk_cache: bool = False) -> ConSE:
    """The ConSE zero-shot baseline over the given (default: offline default) towers. Its 1,000 class-name
    embeddings are computed once per process and text tower; with ``disk_cache`` (pristine packaged towers
    only) also kept in the feature cache folder, so a later process skips the ~7 s of encoding them."""
    image_tower = image_tower or pretrained_tower(ImageTowerConfig())
    text_tower = text_tower or pretrained_tower(TextTowerConfig())
    key = text_tower.fingerprint()
    if key not in _CONSE_CLASSES and disk_cache:
        _CONSE_CLASSES[key] = _read_conse_classes(_conse_classes_file(key), text_tower.output_dim)
    model = ConSE(image_tower, text_tower, class_embeddings=_CONSE_CLASSES.get(key))
    if disk_cache and _CONSE_CLASSES.get(key) is None:  # absent or unusable: (re)written
        _write_conse_classes(_conse_classes_file(key), model.class_embeddings)
    _CONSE_CLASSES[key] = model.class_embeddings
    return model


def _conse_classes_file(text_fingerprint: str) -> Path:
    from cliplab.utils import default_cache_dir, sha256_text

    key = sha256_text(text_fingerprint, *CONSE_TEMPLATES, *imagenet_classnames())[:32]
    return default_cache_dir() / f"conse-classes-{key}.safetensors"


def _read_conse_classes(path: Path, dim: int) -> torch.Tensor | None:
    """Cached class embeddings, or None when absent or unusable (then they are computed and rewritten)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        emb = load_file(str(path))["class_embeddings"]
    except (OSError, KeyError, SafetensorError):  # missing, damaged or not a safetensors file
        return None
    usable = (emb.shape == (len(imagenet_classnames()), dim) and emb.dtype == torch.float32
              and bool(torch.isfinite(emb).all()))
    return emb if usable else None


def _write_conse_classes(path: Path, emb: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from cliplab.utils import atomic_write

    try:
        atomic_write(path, lambda p: save_file({"class_embeddings": emb.contiguous()}, str(p)))
    except OSError:  # a read-only cache folder only costs the next process the encoding again
        pass


def model_folder_kind(path: Path) -> str | None:
    """The name of the registered kind that recognises the model folder ``path``, or None."""
    kind = kind_for_folder(Path(path))
    return kind.name if kind is not None else None


def is_ensemble_spec(spec: str | Path) -> bool:
    """Whether a model spec names an ensemble (``ensemble:...`` or a folder written by ``cliplab ensemble``)."""
    kind = kind_for_spec(str(spec)) or kind_for_folder(Path(spec))
    return kind is not None and kind.name == "ensemble"


def _load_ensemble(spec: str, members: list[str], weights: list[float], flip_tta: bool = False) -> EmbeddingModel:
    from cliplab.models.ensemble import score_ensemble
    from cliplab.models.wrappers import with_flip_tta

    for m in members:
        if is_ensemble_spec(m):
            raise ConfigError(f"{spec}: ensembles do not nest (member {m}); list every model in one ensemble")
    if len(members) == 1 and not spec.startswith("ensemble:"):  # a dev search that kept one member: that model
        return with_flip_tta(load_model(members[0]), flip_tta)
    return with_flip_tta(score_ensemble([load_model(m) for m in members], weights), flip_tta)


def load_ensemble(spec: str) -> EmbeddingModel:
    """``ensemble:W*A+W*B`` or an ensemble folder (``ensemble.json``)."""
    from cliplab.models.ensemble import parse_ensemble_spec, read_ensemble_folder

    if spec.startswith("ensemble:"):
        return _load_ensemble(spec, *parse_ensemble_spec(spec[len("ensemble:"):]))
    return _load_ensemble(spec, *read_ensemble_folder(spec))


def image_tower_config(name: str, where: str | None = None) -> ImageTowerConfig:
    """The packaged (or timm) image tower ``ARCH`` or ``ARCH@SIZE`` (``SIZE``-pixel inputs instead of its native
    size); a packaged tower may be named without ``efficientnet_`` (``lite2@224``). ``where`` starts errors
    (default: the name)."""
    where = where or repr(name)
    from cliplab.models.pretrained import find_weights

    arch, at, size = name.partition("@")
    if not arch:
        raise ConfigError(f"{where}: name an image tower (e.g. efficientnet_lite2 or lite2@224)")
    packaged = find_weights(arch, "image") or find_weights(f"efficientnet_{arch}", "image")
    arch = packaged.name if packaged is not None else arch
    if not at:
        return ImageTowerConfig(arch=arch)
    if not size.isdigit() or not 32 <= int(size) <= 1024:
        raise ConfigError(f"{where}: the input size after '@' must be a whole number of pixels from 32 to "
                          f"1024, not {size!r}")
    return ImageTowerConfig(arch=arch, image_size=int(size))


def conse_tower_config(spec: str) -> ImageTowerConfig:
    """The image tower named by ``conse:ARCH`` or ``conse:ARCH@SIZE``."""
    return image_tower_config(spec[len("conse:"):], f"model {spec!r}")


def feature_stack(names: Sequence[str]):
    """A linear probe's image features: the named image towers (``ARCH[@SIZE]``, see :func:`image_tower_config`)
    side by side, as a :class:`~cliplab.models.wrappers.FeatureStack`."""
    from cliplab.models.wrappers import FeatureStack

    names = [n.strip() for n in names if n.strip()]
    configs = [image_tower_config(n, f"probe features {n!r}") for n in names]  # every name checked, then built
    return FeatureStack([pretrained_tower(c) for c in configs], names)


def resolve_model_spec(spec: str | Path) -> tuple[ModelKind, str]:
    """The registered kind a spec names (by prefix, or by the model folder it is: a run folder stands for its
    dev-selected ``best/``) and what that kind's ``load`` takes."""
    spec = str(spec)
    kind = kind_for_spec(spec)
    if kind is not None:
        return kind, spec
    path = Path(spec)
    if (path / BEST).is_dir():
        path = path / BEST
    kind = kind_for_folder(path)
    if kind is not None:
        return kind, str(path)
    if not path.exists():
        raise ConfigError(f"model not found: {spec} (give {spec_usage()}, a run folder or a model folder)")
    raise ConfigError(f"{spec}: not a cliplab model or run folder (no {folder_markers()})")


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> EmbeddingModel:
    """Resolve a model name or folder through the registered model kinds (see the module docstring)."""
    kind, resolved = resolve_model_spec(spec)
    model = kind.load(resolved)
    if not isinstance(model, EmbeddingModel):  # every model kind must offer the whole interface
        raise TypeError(f"{type(model).__name__} (model kind {kind.name!r}) does not implement EmbeddingModel")
    return model.eval().to(device)


def load_conse(spec: str) -> ConSE:
    """``conse`` (the offline default towers) or ``conse:ARCH[@SIZE]``."""
    image_tower = None if spec == "conse" else pretrained_tower(conse_tower_config(spec))
    return create_conse(image_tower, disk_cache=True)


def _conse_baseline(model: TwoTower) -> tuple[str, ConSE]:
    return "conse", create_conse(model.image_tower, model.text_tower)


def _clip_baseline(model: CLIPModelWrapper) -> tuple[str, CLIPModelWrapper]:
    return "zero-shot CLIP", model  # the CLIP before tuning: its cached embeddings, compared directly


# -- the built-in model kinds, one registration each (folder detection in this order)
register_model_kind("twotower", detect_folder=CONFIG_NAME, config=TwoTowerConfig, baseline=_conse_baseline,
                    load=lambda path: TwoTower.load(path, build_tower=pretrained_tower),
                    create=lambda config, seed: create_model(config, seed=seed))
register_model_kind("conse", prefix="conse", load=load_conse)
register_model_kind("clip", prefix="clip:", detect_folder=CLIP_TUNED_CONFIG, config=CLIPSource,
                    baseline=_clip_baseline, load=lambda spec: load_clip(spec.removeprefix("clip:")),
                    create=lambda config, seed: load_clip(config.source))
register_model_kind("ensemble", prefix="ensemble:", detect_folder=ENSEMBLE, load=load_ensemble,
                    usage="'ensemble:W*A+W*B'")
