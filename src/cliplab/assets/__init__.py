"""Data shipped inside the package: ImageNet class names (ConSE) and CLIP's prompt templates (zero-shot)."""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def _load(name: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet class names in index order (OpenAI CLIP's readable names)."""
    return list(_load("imagenet_classnames.json")["classnames"])


def prompt_templates(name: str) -> list[str]:
    """A template set with ``{}`` for the class name: ``clip80`` (CLIP's 80 ImageNet prompts) or ``simple7``."""
    return list(_load("prompt_templates.json")[name])
