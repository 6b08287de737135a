"""Optional features and the extra that installs each: a missing one is one line naming the extra.

The core install (``pip install cliplab``) embeds, trains and evaluates with the offline default towers;
everything else comes with an extra, e.g. ``pip install "cliplab[serve,caption]"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cliplab.errors import CliplabError

# importable module -> (extra, what needs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnx", "the ONNX Runtime backend"),
    "onnx": ("onnx", "exporting towers to ONNX"),
    "faiss": ("index", "FAISS indexes (cliplab index / search / serve)"),
    "matplotlib": ("viz", "figures (--plots, cliplab report)"),
    "torch.utils.tensorboard": ("tensorboard", "TensorBoard logs"),
    "open_clip": ("clip", "open_clip CLIP models"),
    "peft": ("tune", "LoRA adapters"),
    "fastapi": ("serve", "the search server (cliplab serve)"),
    "uvicorn": ("serve", "the search server (cliplab serve)"),
    "multipart": ("serve", "image uploads to the search server"),
    "gguf": ("caption", "GGUF language models (the offline SmolLM2 decoder)"),
    "pycocoevalcap": ("caption", "caption metrics (BLEU, METEOR, ROUGE-L, CIDEr)"),
    "ray": ("ray", "the Ray engine (--engine ray)"),
}


class MissingExtraError(CliplabError):
    """A feature's optional dependency is not installed."""


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, what = EXTRAS.get(module, ("all", module))
        raise MissingExtraError(f"{feature or what} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install \"cliplab[{extra}]\"") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
