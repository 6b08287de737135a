"""The offline tower zoo: every registered tower with its sizes, whether its weights are installed, and its
speed measured on this machine (``cliplab models``). What it lists is the weights registry
(:func:`cliplab.models.pretrained.register_weights`)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass

import torch

from cliplab.errors import ConfigError
from cliplab.models.pretrained import (packaged_image_weights, registered_weights, resolve_language_model,
                                       resolve_text_model)
from cliplab.utils import default_cache_dir, write_json


@dataclass
class TowerInfo:
    name: str
    kind: str  # image | text | decoder
    output_dim: int | None
    input: str
    parameters: int | None
    installed: bool
    source: str
    speed: float | None = None  # items per second on this machine (batch 32, CPU, torch eager)
    speed_unit: str = ""
    note: str = ""


def _speed_file():
    return default_cache_dir() / "tower-speed.json"


def _machine() -> str:
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{torch.get_num_threads()}threads-torch{torch.__version__}"


def _measured() -> dict:
    path = _speed_file()
    return json.loads(path.read_text()) if path.is_file() else {}


@torch.inference_mode()
def _measure(kind: str, model) -> float:
    if kind == "image":
        x = torch.randn(32, 3, model.image_size, model.image_size)
        model(x[:4])
        t = time.perf_counter()
        model(x)
        return 32 / (time.perf_counter() - t)
    texts = [f"a photo number {i} of a dog running on the beach with a ball" for i in range(32)]
    model.encode(texts[:4])
    t = time.perf_counter()
    model.encode(texts)
    return 32 / (time.perf_counter() - t)


def catalog(measure: bool = False) -> list[TowerInfo]:
    """Every registered tower; ``measure`` times the installed ones (results cached per machine)."""
    import timm

    from cliplab.models.factory import pretrained_tower
    from cliplab.models.image_tower import ImageTowerConfig
    from cliplab.models.text_tower import TextTowerConfig

    speeds = _measured().get(_machine(), {})
    out = []
    for spec in registered_weights("image"):
        arch = spec.name
        try:
            packaged_image_weights(arch)
            installed = True
        except ConfigError:
            installed = False
        net = timm.create_model(arch, pretrained=False)
        info = TowerInfo(arch, "image", int(net.num_features), f"{spec.input_size}x{spec.input_size}",
                         sum(p.numel() for p in net.parameters()), installed, spec.source,
                         note="ImageNet-1k classifier kept (ConSE)")
        if installed and measure:
            speeds[arch] = _measure("image", pretrained_tower(ImageTowerConfig(arch=arch)))
        info.speed, info.speed_unit = speeds.get(arch), "images/s"
        out.append(info)
    for spec in registered_weights("text"):
        name, dim = spec.name, spec.dim
        try:
            folder = resolve_text_model(name)
            installed = True
        except ConfigError:
            folder, installed = None, False
        if installed:
            from transformers import AutoConfig

            dim = int(AutoConfig.from_pretrained(folder).hidden_size)
        info = TowerInfo(name, "text", dim, "64 tokens", None, installed, spec.source,
                         note="" if installed else f"install: {spec.install}")
        if installed and measure:
            tower = pretrained_tower(TextTowerConfig(name=name))
            info.parameters = sum(p.numel() for p in tower.parameters())
            speeds[name] = _measure("text", tower)
        info.speed, info.speed_unit = speeds.get(name), "captions/s"
        out.append(info)
    for spec in registered_weights("decoder"):
        try:
            resolve_language_model(spec.name)
            installed = True
        except ConfigError:
            installed = False
        out.append(TowerInfo(spec.name, "decoder", None, "causal LM", None, installed, spec.source,
                             note="" if installed else f"install: {spec.install}"))
    if measure:
        all_speeds = _measured()
        all_speeds[_machine()] = speeds
        write_json(_speed_file(), all_speeds)
    return out


def catalog_dicts(measure: bool = False) -> list[dict]:
    return [asdict(t) for t in catalog(measure)]


__all__ = ["TowerInfo", "catalog", "catalog_dicts"]
