"""A model side (image or text) as a sequence of stages, so training can cache its frozen prefix.

Boundary ``i`` is the input of stage ``i``: boundary 0 is the raw input (pixels, a tokenizer batch),
boundary ``len(stages)`` the side's unnormalised embedding. When only the last stages train, the
activations at the first trainable boundary are computed once and cached; each epoch then runs only
the trainable suffix (``Stages.run(x, start=boundary)``).

Text activations after the embedding stage are ``(hidden [B, T, H], attention_mask [B, T])``,
right-padded, so a batch of cached captions can be re-padded to its own longest caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Stage:
    name: str
    modules: list[nn.Module]  # whose parameters belong to the stage (used to find what trains)
    fn: Callable[[Any], Any]
    is_block: bool = True  # counts towards ``last_n`` (stems, embeddings and pooling do not)


class Stages:
    """Ordered stages of one model side."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i: int) -> Stage:
        return self.stages[i]

    def parameters(self, start: int = 0, end: int | None = None):
        for stage in self.stages[start:end]:
            for m in stage.modules:
                yield from m.parameters()

    def first_trainable(self) -> int:
        """Index of the first stage with a trainable parameter (``len(self)`` when nothing trains)."""
        for i, stage in enumerate(self.stages):
            if any(p.requires_grad for m in stage.modules for p in m.parameters()):
                return i
        return len(self.stages)

    def run(self, x: Any, start: int = 0, end: int | None = None) -> Any:
        for stage in self.stages[start:end]:
            x = stage.fn(x)
        return x

    def block_indices(self, end: int | None = None) -> list[int]:
        """Stages (before ``end``) that count as blocks for ``last_n``."""
        end = len(self.stages) if end is None else end
        return [i for i in range(end) if self.stages[i].is_block]


def _seq(*modules: nn.Module) -> Callable[[Any], Any]:
    def fn(x):
        for m in modules:
            x = m(x)
        return x

    return fn


def timm_image_stages(model: nn.Module) -> list[Stage]:
    """timm EfficientNet / MobileNet-style nets (``conv_stem, bn1, blocks, conv_head, bn2``): stem, each
    block, head conv + pooling; ViT-style nets (``patch_embed, blocks, norm``): embed, each block, norm + pool.
    Other architectures are one stage (they train whole or not at all)."""
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        stages = [Stage("stem", [model.conv_stem, model.bn1], _seq(model.conv_stem, model.bn1), is_block=False)]
        for si, stage in enumerate(model.blocks):
            for bi, block in enumerate(stage):
                stages.append(Stage(f"blocks.{si}.{bi}", [block], block))
        stages.append(Stage("head", [model.conv_head, model.bn2],
                            lambda x: model.forward_head(model.bn2(model.conv_head(x)), pre_logits=True)))
        return stages
    if all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm")):
        def embed(x):
            x = model._pos_embed(model.patch_embed(x))
            return model.norm_pre(model.patch_drop(x))

        extra = [getattr(model, a) for a in ("cls_token", "pos_embed", "reg_token") if isinstance(getattr(model, a, None), nn.Parameter)]
        holder = ParamHolder(extra)
        stages = [Stage("embed", [model.patch_embed, holder, model.norm_pre], embed, is_block=False)]
        stages += [Stage(f"blocks.{i}", [b], b) for i, b in enumerate(model.blocks)]
        stages.append(Stage("norm", [model.norm], lambda x: model.forward_head(model.norm(x), pre_logits=True),
                            is_block=False))
        return stages
    return [Stage("tower", [model], lambda x: model.forward_head(model.forward_features(x), pre_logits=True))]


class ParamHolder(nn.Module):
    """Exposes loose parameters (a ViT's cls token, a CLIP projection matrix) as a stage module.
    Not registered in the model, so they are not stored twice."""

    def __init__(self, params: list[nn.Parameter], owner: nn.Module | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_loose", list(params))
        object.__setattr__(self, "_owner", owner)  # whose modules LoRA may adapt

    def modules(self):  # noqa: D102
        yield self
        if self._owner is not None:
            yield from self._owner.modules()

    def parameters(self, recurse: bool = True):  # noqa: D102
        yield from self._loose

    def named_parameters(self, *args, **kwargs):  # noqa: D102
        for i, p in enumerate(self._loose):
            yield str(i), p


def bidirectional_mask(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor):
    """The attention mask an HF encoder layer expects, built the way the model itself builds it."""
    try:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
    except ImportError:  # transformers < 4.56
        return model.get_extended_attention_mask(mask, mask.shape, dtype=hidden.dtype)


def hf_text_stages(model: nn.Module, pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[Stage]:
    """BERT-style encoders (``embeddings`` + ``encoder.layer``): embeddings, each layer, pooling. MPNet's
    relative position bias (one table in the encoder, shared by every layer) is computed per layer call from
    the sequence length, as its encoder does, and trains with the embeddings stage. Other encoders are one
    stage over the whole model."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not hasattr(model, "embeddings") or layers is None:
        def whole(tokens):
            out = model(**tokens).last_hidden_state
            return pool(out, tokens["attention_mask"])

        return [Stage("encoder", [model], whole)]

    def embed(tokens):
        kwargs = {k: tokens[k] for k in ("token_type_ids",) if k in tokens}
        return model.embeddings(input_ids=tokens["input_ids"], **kwargs), tokens["attention_mask"]

    encoder = model.encoder
    relative = getattr(encoder, "relative_attention_bias", None)  # MPNet

    def layer_fn(layer):
        def fn(state):
            hidden, mask = state
            extra = {"position_bias": encoder.compute_position_bias(hidden)} if relative is not None else {}
            out = layer(hidden, bidirectional_mask(model, hidden, mask), **extra)
            return (out[0] if isinstance(out, tuple) else out), mask

        return fn

    shared = [relative] if relative is not None else []
    stages = [Stage("embeddings", [model.embeddings, *shared], embed, is_block=False)]
    stages += [Stage(f"layer.{i}", [layer], layer_fn(layer)) for i, layer in enumerate(layers)]
    stages.append(Stage("pool", [], lambda state: pool(*state), is_block=False))
    return stages


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]
