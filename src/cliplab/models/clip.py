"""Load a real CLIP (open_clip or Hugging Face ``CLIPModel``) behind the cliplab model interface.

``load_clip`` accepts:
- a local folder with ``open_clip_config.json`` (open_clip's hub layout) or ``local-dir:PATH``;
- ``hf-hub:org/repo`` (open_clip weights on the HF hub);
- ``ARCH/PRETRAINED`` such as ``ViT-B-32/openai`` (open_clip's built-in registry);
- a local folder with a Hugging Face ``config.json`` of a CLIP model, or a hub id such as
  ``openai/clip-vit-base-patch32`` (``hf:`` prefix forces this backend).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn

from cliplab.errors import ConfigError
from cliplab.utils import sha256_file, sha256_text


class CLIPModelWrapper(nn.Module):
    """One interface over open_clip and HF CLIP: ``encode_image``, ``encode_text``, ``preprocess``."""

    def __init__(self, model: nn.Module, backend: str, tokenizer, transform: T.Compose, source: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.backend = backend
        self.tokenizer = tokenizer
        self._transform = transform
        self.source = source

    # -- towers (used by fine-tuning code to find the parts to adapt)
    @property
    def visual(self) -> nn.Module:
        return self.model.visual if self.backend == "open_clip" else self.model.vision_model

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def preprocess(self) -> T.Compose:
        return self._transform

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor] | torch.Tensor:
        device = next(self.model.parameters()).device
        if self.backend == "open_clip":
            return self.tokenizer(list(texts)).to(device)
        ctx = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=ctx, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.backend == "open_clip":
            z = self.model.encode_image(images)
        else:
            z = _as_tensor(self.model.get_image_features(pixel_values=images))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts
        if self.backend == "open_clip":
            z = self.model.encode_text(tokens)
        else:
            z = _as_tensor(self.model.get_text_features(**tokens))
        return F.normalize(z, dim=-1) if normalize else z

    def fingerprint(self) -> str:
        folder = Path(self.source)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        return sha256_text("clip", self.backend, sha256_file(files[0]) if files else self.source)


def _as_tensor(out) -> torch.Tensor:
    """HF returns a tensor in most versions, a model output with ``pooler_output`` in some."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


def _transform(size: int, mean, std, interpolation: str = "bicubic") -> T.Compose:
    return T.Compose([
        T.Resize(size, interpolation=getattr(T.InterpolationMode, interpolation.upper())),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def _load_open_clip(name: str, pretrained: str | None) -> CLIPModelWrapper:
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot load open_clip model {name!r}: {str(exc).splitlines()[0]}") from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = _transform(int(size), model.visual.image_mean, model.visual.image_std)
    source = name.split(":", 1)[1] if name.startswith("local-dir:") else name
    return CLIPModelWrapper(model, "open_clip", tokenizer, transform, source)


def _load_hf(name: str) -> CLIPModelWrapper:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load Hugging Face CLIP {name!r}: {str(exc).splitlines()[0]}") from None
    try:
        proc = AutoImageProcessor.from_pretrained(name)
        crop = getattr(proc, "crop_size", None) or {}
        size = crop.get("height") or model.config.vision_config.image_size
        transform = _transform(int(size), proc.image_mean, proc.image_std)
    except (OSError, ValueError):
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        transform = _transform(model.config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return CLIPModelWrapper(model, "hf", tokenizer, transform, name)


def load_clip(name_or_path: str, backend: str = "auto", device: str | torch.device = "cpu") -> CLIPModelWrapper:
    """Load a CLIP from a folder, an open_clip name or a hub id; see the module docstring."""
    spec = str(name_or_path)
    if backend not in ("auto", "open_clip", "hf"):
        raise ConfigError(f"backend must be auto, open_clip or hf, not {backend!r}")
    path = Path(spec)
    if spec.startswith("hf:"):
        backend, spec = "hf", spec[3:]
        path = Path(spec)
    if spec.startswith(("local-dir:", "hf-hub:")):
        wrapper = _load_open_clip(spec, None)
    elif path.is_dir():
        if backend != "hf" and (path / "open_clip_config.json").is_file():
            wrapper = _load_open_clip(f"local-dir:{path}", None)
        elif backend != "open_clip" and (path / "config.json").is_file():
            wrapper = _load_hf(str(path))
        else:
            raise ConfigError(f"{path}: no open_clip_config.json or Hugging Face config.json found")
    elif backend == "hf":
        wrapper = _load_hf(spec)
    elif "/" in spec and backend in ("auto", "open_clip"):
        arch, _, tag = spec.partition("/")
        import open_clip

        if arch in open_clip.list_models():
            wrapper = _load_open_clip(arch, tag or None)
        elif backend == "open_clip":
            raise ConfigError(f"unknown open_clip architecture {arch!r}")
        else:
            wrapper = _load_hf(spec)
    else:
        raise ConfigError(f"cannot resolve CLIP model {spec!r}: not a folder, 'ARCH/PRETRAINED' or hub id")
    return wrapper.to(device)
