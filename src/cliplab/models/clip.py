"""Load a real CLIP (open_clip or Hugging Face ``CLIPModel``) behind the cliplab model interface.

``load_clip`` accepts:
- a local folder with ``open_clip_config.json`` (open_clip's hub layout) or ``local-dir:PATH``;
- ``hf-hub:org/repo`` (open_clip weights on the HF hub);
- ``ARCH/PRETRAINED`` such as ``ViT-B-32/openai`` (open_clip's built-in registry);
- a local folder with a Hugging Face ``config.json`` of a CLIP model, or a hub id such as
  ``openai/clip-vit-base-patch32`` (``hf:`` prefix forces this backend).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from safetensors.torch import load_file, save_file
from torch import nn

from cliplab import rundir
from cliplab.config import load_section
from cliplab.errors import ConfigError
from cliplab.models.checkpoint import check_base_weights, load_checked
from cliplab.models.stages import (Stage, Stages, ParamHolder, hf_clip_text_stages, hf_clip_vision_stages,
                                   open_clip_text_stages, open_clip_vision_stages)
from cliplab.models.tuning import (TowerTuning, apply_lora_spec, apply_tower_tuning, count_parameters,
                                   describe_lora_targets)
from cliplab.utils import atomic_write, sha256_file, sha256_state, sha256_text, write_json

CLIP_TUNED_CONFIG = rundir.CLIP_CONFIG
CLIP_WEIGHTS = rundir.MODEL_WEIGHTS


@contextmanager
def _without(module: nn.Module, name: str):
    """Temporarily set a module's projection to None (so it returns pre-projection features)."""
    saved = getattr(module, name)
    setattr(module, name, None)
    try:
        yield
    finally:
        setattr(module, name, saved)


@dataclass
class CLIPSource:
    """A training run's ``model`` section for ``kind: clip``: the CLIP to fine-tune (a :func:`load_clip` name
    or folder)."""

    source: str

    def to_dict(self) -> dict:
        return {"source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPSource":
        """The section through the one config loader (unknown keys and a missing source named)."""
        source = load_section(cls, d, "model").source.removeprefix("clip:")
        if not source.strip():
            raise ConfigError(f"model.source must name the CLIP to fine-tune (see load_clip), not {d['source']!r}")
        return cls(source)


class OpenClipBackend:
    """How cliplab drives an open_clip ``CLIP`` (stateless: every method takes the open_clip model)."""

    name = "open_clip"
    root_names = {"image": "visual", "text": ""}  # where each side's LoRA adapters go ("" = the model)

    def visual(self, model: nn.Module) -> nn.Module:
        return model.visual

    def tokenize(self, model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(list(texts)).to(next(model.parameters()).device)

    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def encode_text(self, model: nn.Module, tokens) -> torch.Tensor:
        """open_clip's ``encode_text``, on the batch trimmed to its longest caption where that gives the same
        embeddings (a causal text transformer pooled at its end-of-text token)."""
        stages = open_clip_text_stages(model) if model.text_projection is not None else None
        if stages is None:
            return model.encode_text(tokens)
        return self._text_projection(model)[1](Stages(stages).run(tokens))

    def set_grad_checkpointing(self, model: nn.Module, side: str) -> None:
        """open_clip's own switch (used when a side runs as one stage through open_clip's forward)."""
        if side == "image":
            model.visual.set_grad_checkpointing(True)
        else:
            model.transformer.grad_checkpointing = True

    def image_stages(self, model: nn.Module, source: str) -> Stages:
        """Embeddings, each residual block, pooling, projection (one ``vision`` stage for a tower that is not
        an open_clip VisionTransformer)."""
        visual = model.visual
        if not isinstance(getattr(visual, "proj", None), nn.Parameter):
            raise ConfigError(f"{source}: this open_clip vision tower has no separate projection to tune")
        projection = Stage("projection", [ParamHolder([visual.proj])], lambda x: x @ visual.proj, is_block=False)
        blocks = open_clip_vision_stages(visual)
        if blocks is not None:
            return Stages([*blocks, projection])
        body = ParamHolder([p for n, p in visual.named_parameters() if n != "proj"], visual)

        def encode(px):
            with _without(visual, "proj"):
                return visual(px)

        return Stages([Stage("vision", [body], encode), projection])

    @staticmethod
    def _text_projection(model: nn.Module) -> tuple[nn.Module, object]:
        proj = model.text_projection
        if isinstance(proj, nn.Linear):
            return proj, proj
        return ParamHolder([proj]), (lambda x: x @ proj)

    def text_stages(self, model: nn.Module, source: str) -> Stages:
        """Embeddings, each residual block, final norm + pooling, projection (batches trimmed to their longest
        caption); one ``text`` stage over open_clip's ``encode_text`` for text towers that do not allow it."""
        if not hasattr(model, "token_embedding") or model.text_projection is None:
            raise ConfigError(f"{source}: only open_clip CLIP models with a text projection can be tuned")
        holder, project = self._text_projection(model)
        projection = Stage("projection", [holder], project, is_block=False)
        blocks = open_clip_text_stages(model)
        if blocks is not None:
            return Stages([*blocks, projection])
        body = ParamHolder([p for n, p in model.named_parameters()
                            if not n.startswith(("visual.", "logit_", "text_projection"))], model.transformer)

        def encode(tokens):
            with _without(model, "text_projection"):
                return model.encode_text(tokens)

        return Stages([Stage("text", [body], encode), projection])

    def load(self, name: str, pretrained: str | None) -> "CLIPModelWrapper":
        from cliplab.extras import require

        open_clip = require("open_clip")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:
            raise ConfigError(f"cannot load open_clip model {name!r}: {str(exc).splitlines()[0]}") from None
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        transform = _transform(int(size), model.visual.image_mean, model.visual.image_std)
        if name.startswith("local-dir:"):
            source = name.split(":", 1)[1]
        else:  # keep the pretrained tag: ViT-B-32/openai and ViT-B-32/laion2b_s34b_b79k are different weights
            source = f"{name}/{pretrained}" if pretrained else name
        return CLIPModelWrapper(model, self.name, tokenizer, transform, source)


class HFBackend:
    """How cliplab drives a Hugging Face ``CLIPModel`` (stateless: every method takes the HF model)."""

    name = "hf"
    root_names = {"image": "vision_model", "text": "text_model"}

    def visual(self, model: nn.Module) -> nn.Module:
        return model.vision_model

    def tokenize(self, model: nn.Module, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        ctx = getattr(model.config.text_config, "max_position_embeddings", 77)
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=ctx, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return _as_tensor(model.get_image_features(pixel_values=images))

    def encode_text(self, model: nn.Module, tokens) -> torch.Tensor:
        return _as_tensor(model.get_text_features(**tokens))

    def set_grad_checkpointing(self, model: nn.Module, side: str) -> None:
        """Hugging Face's own switch, non-reentrant (a reentrant checkpoint would give no gradients to adapters
        fed by cached, frozen activations)."""
        part = model.vision_model if side == "image" else model.text_model
        target = part if hasattr(part, "gradient_checkpointing_enable") else model  # transformers 4.x: both sides
        kwargs = {"use_reentrant": False}
        if hasattr(target, "activation_checkpointing_enable"):  # its name from transformers 5.2x
            target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def image_stages(self, model: nn.Module, source: str) -> Stages:
        vm = model.vision_model
        return _hf_stages(hf_clip_vision_stages(vm), model.visual_projection,
                          Stage("vision", [vm], lambda px: vm(pixel_values=px).pooler_output))

    def text_stages(self, model: nn.Module, source: str) -> Stages:
        tm = model.text_model
        return _hf_stages(hf_clip_text_stages(tm), model.text_projection,
                          Stage("text", [tm], lambda tok: tm(**tok).pooler_output))

    def load(self, name: str) -> "CLIPModelWrapper":
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
        return CLIPModelWrapper(model, self.name, tokenizer, transform, name)


CLIP_BACKENDS: dict[str, OpenClipBackend | HFBackend] = {"open_clip": OpenClipBackend(), "hf": HFBackend()}


class CLIPModelWrapper(nn.Module):
    """One interface over open_clip and HF CLIP: ``encode_image``, ``encode_text``, ``preprocess``; what differs
    between the two is in their backend adapter (:class:`OpenClipBackend`, :class:`HFBackend`)."""

    def __init__(self, model: nn.Module, backend: str, tokenizer, transform: T.Compose, source: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.backend = backend
        self.adapter = CLIP_BACKENDS[backend]
        self.tokenizer = tokenizer
        self._transform = transform
        self.source = source  # the full spec: a folder, ``ARCH/TAG``, ``hf-hub:org/repo`` or a HF id
        self.lora: dict[str, dict] = {}  # side -> LoRA spec (with the root module it was injected into)
        self.saved_keys: list[str] = []  # tensors loaded from a fine-tuned checkpoint
        self.weights_delta = ""
        folder = Path(source)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        # the base weights: the file's digest for a local folder, else the full spec (ARCH/TAG keeps its tag)
        self.base_id = sha256_file(files[0]) if files else sha256_text("clip-spec", backend, source)

    # -- towers (used by fine-tuning code to find the parts to adapt)
    @property
    def visual(self) -> nn.Module:
        return self.adapter.visual(self.model)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def preprocess(self) -> T.Compose:
        return self._transform

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor] | torch.Tensor:
        return self.adapter.tokenize(self.model, self.tokenizer, texts)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.adapter.encode_image(self.model, images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts
        z = self.adapter.encode_text(self.model, tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def fingerprint(self) -> str:
        return sha256_text("clip", self.backend, self.base_id, *self.tuned_parts)

    def side_fingerprints(self) -> tuple[str, str]:
        return self.fingerprint(), self.fingerprint()

    def base_weights(self) -> dict[str, str]:
        return {"clip": self.base_id}

    # -- fine-tuning: each side is [encoder, projection]
    def _roots(self) -> dict[str, nn.Module]:
        return {side: self.model.get_submodule(name) if name else self.model
                for side, name in self.adapter.root_names.items()}

    def image_stages(self) -> Stages:
        return self.adapter.image_stages(self.model, self.source)

    def text_stages(self) -> Stages:
        return self.adapter.text_stages(self.model, self.source)

    def set_trainable(self, mode: str) -> "CLIPModelWrapper":
        """``heads``: both projections + temperature (the classic exercise); ``image_head``/``text_head``: one
        projection; ``none``: only tower tuning. Everything else is frozen."""
        sides = {"heads": ("image", "text"), "image_head": ("image",), "text_head": ("text",), "none": ()}
        if mode not in sides:
            raise ConfigError(f"trainable must be one of {', '.join(sides)}, not {mode!r}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for side, stages in (("image", self.image_stages()), ("text", self.text_stages())):
            for p in stages.parameters(len(stages) - 1):
                p.requires_grad_(side in sides[mode])
        self.model.logit_scale.requires_grad_(True)
        return self

    def tune_towers(self, image: TowerTuning, text: TowerTuning) -> dict:
        """Apply the tower tunings; returns the parameter counts and, per side with adapters, the adapted layers
        (the training log states them)."""
        roots, names = self._roots(), self.adapter.root_names
        adapted = {}
        for side, tuning, stages in (("image", image, self.image_stages()), ("text", text, self.text_stages())):
            spec = apply_tower_tuning(roots[side], stages, tuning)
            if spec is not None:
                self.lora[side] = {**spec, "root": names[side]}
            if tuning.grad_checkpointing:
                self.adapter.set_grad_checkpointing(self.model, side)
            if tuning.mode == "lora" and side in self.lora:
                adapted[side] = describe_lora_targets(roots[side], self.lora[side]["targets"])
        return {"model": count_parameters(self.model), **({"lora": adapted} if adapted else {})}

    @property
    def tuned_parts(self) -> list[str]:
        return ([repr(sorted(self.lora.items()))] if self.lora else []) + ([self.weights_delta] if self.weights_delta else [])

    def _saved_keys(self) -> set[str]:
        """Keys (relative to the inner model) of the tensors ``save`` writes."""
        return {n for n, p in self.model.named_parameters() if p.requires_grad} | set(self.saved_keys)

    def save(self, directory: str | Path) -> Path:
        """The fine-tuned tensors (projections, adapters, unfrozen blocks) + how to rebuild the base model."""
        directory = Path(directory)
        keys = self._saved_keys()
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items() if k in keys}
        atomic_write(directory / CLIP_WEIGHTS, lambda p: save_file(state, str(p)))
        write_json(directory / CLIP_TUNED_CONFIG, {"model_type": "cliplab.CLIP", "source": self.source,
                                                   "backend": self.backend, "lora": self.lora,
                                                   "base_weights": self.base_weights()})
        return directory

    # -- weight interpolation (WiSE-FT): the whole inner model
    def interpolation_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def interpolation_keys(self) -> list[str]:
        return sorted(k for k, v in self.model.state_dict().items() if v.is_floating_point())

    def load_interpolated(self, state: dict[str, torch.Tensor], alpha: float) -> None:
        """Load mixed tensors; at ``alpha`` 0 the model is the initial one (and shares its cache entries)."""
        self.model.load_state_dict(state, strict=False)
        self.weights_delta = sha256_state(state) if alpha != 0 else ""

    def load_trained(self, directory: str | Path) -> None:
        """Reload tensors this model saved (keys relative to the inner model), strictly."""
        import json

        directory = Path(directory)
        path = directory / CLIP_WEIGHTS
        if not path.is_file():
            raise ConfigError(f"{directory}: no {CLIP_WEIGHTS}")
        raw = json.loads((directory / CLIP_TUNED_CONFIG).read_text(encoding="utf-8"))
        check_base_weights(raw.get("base_weights"), self.base_weights(), str(directory))
        load_checked(self.model, load_file(str(path)), where=str(path), required=self._saved_keys())


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


def load_clip(name_or_path: str, backend: str = "auto", device: str | torch.device = "cpu") -> CLIPModelWrapper:
    """Load a CLIP from a folder, an open_clip name or a hub id; see the module docstring."""
    spec = str(name_or_path)
    open_clip_backend, hf_backend = CLIP_BACKENDS["open_clip"], CLIP_BACKENDS["hf"]
    if backend not in ("auto", *CLIP_BACKENDS):
        raise ConfigError(f"backend must be auto, open_clip or hf, not {backend!r}")
    path = Path(spec)
    if (path / CLIP_TUNED_CONFIG).is_file():
        return _load_tuned(path).to(device)
    if spec.startswith("hf:"):
        backend, spec = "hf", spec[3:]
        path = Path(spec)
    if spec.startswith(("local-dir:", "hf-hub:")):
        wrapper = open_clip_backend.load(spec, None)
    elif path.is_dir():
        if backend != "hf" and (path / "open_clip_config.json").is_file():
            wrapper = open_clip_backend.load(f"local-dir:{path}", None)
        elif backend != "open_clip" and (path / "config.json").is_file():
            wrapper = hf_backend.load(str(path))
        else:
            raise ConfigError(f"{path}: no open_clip_config.json or Hugging Face config.json found")
    elif backend == "hf":
        wrapper = hf_backend.load(spec)
    elif "/" in spec and backend in ("auto", "open_clip"):
        arch, _, tag = spec.partition("/")
        from cliplab.extras import require

        open_clip = require("open_clip")

        if arch in open_clip.list_models():
            wrapper = open_clip_backend.load(arch, tag or None)
        elif backend == "open_clip":
            raise ConfigError(f"unknown open_clip architecture {arch!r}")
        else:
            wrapper = hf_backend.load(spec)
    else:
        raise ConfigError(f"cannot resolve CLIP model {spec!r}: not a folder, 'ARCH/PRETRAINED' or hub id")
    return wrapper.to(device)


def _load_tuned(directory: Path) -> CLIPModelWrapper:
    """A CLIP fine-tuned by cliplab: the base model, its LoRA adapters, then the saved tensors."""
    import json

    raw = json.loads((directory / CLIP_TUNED_CONFIG).read_text(encoding="utf-8"))
    wrapper = load_clip(raw["source"], backend=raw["backend"])
    for side, spec in (raw.get("lora") or {}).items():
        root = wrapper.model.get_submodule(spec["root"]) if spec["root"] else wrapper.model
        apply_lora_spec(root, spec)
        wrapper.lora[side] = spec
    check_base_weights(raw.get("base_weights"), wrapper.base_weights(), str(directory))
    if not (directory / CLIP_WEIGHTS).is_file():
        raise ConfigError(f"{directory}: no {CLIP_WEIGHTS}")
    state = load_file(str(directory / CLIP_WEIGHTS))
    load_checked(wrapper.model, state, where=str(directory / CLIP_WEIGHTS))
    wrapper.saved_keys = sorted(state)
    wrapper.weights_delta = sha256_state(state)
    return wrapper.eval()


def _hf_stages(blocks: list | None, projection: nn.Module, whole: Stage) -> Stages:
    """A HF CLIP side's stages: its transformer blocks (when they can be split) or the whole side in one stage,
    then the projection."""
    head = Stage("projection", [projection], projection, is_block=False)
    return Stages([*blocks, head]) if blocks is not None else Stages([whole, head])
