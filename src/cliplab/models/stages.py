"""A model side (image or text) as a sequence of stages, so training can cache its frozen prefix.

Boundary ``i`` is the input of stage ``i``: boundary 0 is the raw input (pixels, a tokenizer batch),
boundary ``len(stages)`` the side's unnormalised embedding. When only the last stages train, the
activations at the first trainable boundary are computed once and cached; each epoch then runs only
the trainable suffix (``Stages.run(x, start=boundary)``).

Text activations after the embedding stage are ``(hidden [B, T, H], attention_mask [B, T])``,
right-padded, so a batch of cached captions can be re-padded to its own longest caption. CLIP text towers
(causal attention, pooled at the end-of-text token) keep only the tokens up to each caption's end-of-text
token: positions before it never attend to later ones, so trimming a batch to its longest caption gives the
same embeddings as open_clip's fixed 77-token context.

Gradient checkpointing (:func:`set_grad_checkpointing`) marks a tower's block modules; :meth:`Stages.run`
then recomputes each marked block's activations in the backward pass instead of keeping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_ATTR = "_cliplab_grad_checkpointing"  # set on a block's modules by set_grad_checkpointing

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
            x = checkpoint(stage.fn, x, use_reentrant=False) if _checkpointed(stage) else stage.fn(x)
        return x

    def block_indices(self, end: int | None = None) -> list[int]:
        """Stages (before ``end``) that count as blocks for ``last_n``."""
        end = len(self.stages) if end is None else end
        return [i for i in range(end) if self.stages[i].is_block]


def _checkpointed(stage: Stage) -> bool:
    """Whether a block recomputes its activations in backward: marked, gradients on, and not a layer that
    checkpoints itself (a Hugging Face layer after ``gradient_checkpointing_enable``, in training mode)."""
    if not (stage.is_block and torch.is_grad_enabled()):
        return False
    marked = any(getattr(m, CHECKPOINT_ATTR, False) for m in stage.modules)
    return marked and not any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in stage.modules)


def set_grad_checkpointing(stages: Stages, enable: bool = True) -> int:
    """Mark (or unmark) the block stages of a tower for gradient checkpointing; returns the blocks marked.
    A tower that is one stage is left alone (checkpointing the whole tower as one unit saves nothing), and so
    are blocks with batch norm (the recompute would update their running statistics a second time)."""
    blocks = stages.block_indices()
    if len(blocks) < 2:
        return 0
    marked = 0
    for i in blocks:
        if any(isinstance(sub, nn.modules.batchnorm._BatchNorm) for m in stages[i].modules for sub in m.modules()):
            continue
        for m in stages[i].modules:
            setattr(m, CHECKPOINT_ATTR, enable)
        marked += 1
    return marked


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


# -- CLIP transformers (open_clip and Hugging Face): residual blocks as stages
def _covers(stages: list[Stage], root: nn.Module, names: list[str]) -> bool:
    """Whether every named parameter of a side (``names``, relative to ``root``) belongs to one of its stages
    (else the side stays one stage). By name: PEFT's adapter of an ``nn.MultiheadAttention`` re-creates the
    Parameter objects of its frozen weights whenever its modules are listed."""
    where = {id(m): n for n, m in root.named_modules()}
    loose = {id(p): n for n, p in root.named_parameters()}
    owned: set[str] = set()
    for stage in stages:
        for m in stage.modules:
            if isinstance(m, ParamHolder):
                owned |= {loose.get(id(p), "") for p in m.parameters()}
            elif id(m) in where:
                prefix = where[id(m)] + "." if where[id(m)] else ""
                owned |= {prefix + n for n, _ in m.named_parameters()}
    return set(names) <= owned


def _end_mask(ends: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Length of a batch trimmed to its longest caption, and the mask of the tokens up to each end token."""
    length = int(ends.max()) + 1 if len(ends) else 1
    return length, (torch.arange(length, device=ends.device)[None] <= ends[:, None]).long()


def _pool_end(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each caption's activation at its last kept token (its end-of-text token)."""
    return hidden[torch.arange(len(hidden), device=hidden.device), mask.sum(1) - 1]


def _batch_first(transformer: nn.Module, block: nn.Module) -> Callable[..., torch.Tensor]:
    """``block`` called on batch-first activations, whatever layout its transformer uses."""
    if getattr(transformer, "batch_first", True):
        return block
    return lambda x, **kw: block(x.transpose(0, 1), **kw).transpose(0, 1)


def open_clip_text_stages(model: nn.Module) -> list[Stage] | None:
    """An open_clip ``CLIP`` text side without its projection: token + position embeddings, each residual
    block of ``transformer.resblocks``, final norm + end-of-text pooling. Batches are trimmed to their longest
    caption (causal mask and position embeddings sliced to it). ``None`` when the text transformer is not
    causal or not pooled at its end-of-text token (its outputs then depend on the padding)."""
    tr = getattr(model, "transformer", None)
    pool = getattr(model, "text_pool_type", "argmax")
    if (getattr(tr, "resblocks", None) is None or getattr(model, "attn_mask", None) is None
            or pool not in ("argmax", "eos") or not all(hasattr(model, a) for a in ("token_embedding", "ln_final"))):
        return None

    def embed(tokens: torch.Tensor):
        eos = getattr(model, "text_eos_id", None)
        ends = tokens.argmax(-1) if pool == "argmax" else (tokens == eos).int().argmax(-1)
        length, mask = _end_mask(ends)
        dtype = tr.get_cast_dtype() if hasattr(tr, "get_cast_dtype") else model.positional_embedding.dtype
        x = model.token_embedding(tokens[:, :length]).to(dtype) + model.positional_embedding[:length].to(dtype)
        return x, mask

    def block_fn(block: nn.Module):
        call = _batch_first(tr, block)

        def fn(state):
            x, mask = state
            return call(x, attn_mask=model.attn_mask[:x.shape[1], :x.shape[1]]), mask

        return fn

    stages = [Stage("embed", [model.token_embedding, ParamHolder([model.positional_embedding])], embed, is_block=False)]
    stages += [Stage(f"resblocks.{i}", [b], block_fn(b)) for i, b in enumerate(tr.resblocks)]
    stages.append(Stage("ln_final", [model.ln_final], lambda s: _pool_end(model.ln_final(s[0]), s[1]), is_block=False))
    text = [n for n, _ in model.named_parameters() if not n.startswith(("visual.", "logit_", "text_projection"))]
    return stages if _covers(stages, model, text) else None


def open_clip_vision_stages(visual: nn.Module) -> list[Stage] | None:
    """An open_clip ``VisionTransformer`` without its projection: patch + class + position embeddings and
    ``ln_pre``, each residual block, pooling + ``ln_post``. ``None`` for other vision towers (timm, ResNet)."""
    tr = getattr(visual, "transformer", None)
    if getattr(tr, "resblocks", None) is None or not all(hasattr(visual, a) for a in ("_embeds", "_pool", "conv1")):
        return None
    loose = [getattr(visual, a) for a in ("class_embedding", "positional_embedding")
             if isinstance(getattr(visual, a, None), nn.Parameter)]
    embed_modules = [visual.conv1, ParamHolder(loose)]
    embed_modules += [m for m in (getattr(visual, "ln_pre", None),) if m is not None]
    pool_modules = [getattr(visual, a) for a in ("ln_post", "attn_pool", "attn_pool_contrastive")
                    if isinstance(getattr(visual, a, None), nn.Module)]
    stages = [Stage("embed", embed_modules, visual._embeds, is_block=False)]
    stages += [Stage(f"resblocks.{i}", [b], _batch_first(tr, b)) for i, b in enumerate(tr.resblocks)]
    stages.append(Stage("pool", pool_modules, lambda x: visual._pool(x)[0], is_block=False))
    params = [n for n, _ in visual.named_parameters() if n != "proj"]
    return stages if _covers(stages, visual, params) else None


def _hf_layer_call(layer: nn.Module) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """An HF CLIP encoder layer called with one additive mask (transformers 4.x layers take a separate causal
    mask as their third argument)."""
    import inspect

    legacy = "causal_attention_mask" in inspect.signature(layer.forward).parameters

    def call(hidden, mask4d):
        out = layer(hidden, None, mask4d) if legacy else layer(hidden, mask4d)
        return out[0] if isinstance(out, tuple) else out

    return call


def causal_padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive ``[B, 1, T, T]`` mask of causal attention over the kept tokens (HF's convention)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def hf_clip_text_stages(text_model: nn.Module) -> list[Stage] | None:
    """An HF CLIP text model (``embeddings``, ``encoder.layers``, ``final_layer_norm``): embeddings, each
    layer, final norm + pooling at the end-of-text token (the model's own rule: the highest token id for
    configs with ``eos_token_id`` 2, else the first ``eos_token_id``). Batches are trimmed to the longest
    caption up to its end token."""
    layers = getattr(getattr(text_model, "encoder", None), "layers", None)
    if layers is None or not all(hasattr(text_model, a) for a in ("embeddings", "final_layer_norm")):
        return None
    eos = getattr(text_model, "eos_token_id", None)
    eos = getattr(getattr(text_model, "config", None), "eos_token_id", None) if eos is None else eos

    def embed(tokens: dict):
        ids = tokens["input_ids"]
        ends = ids.int().argmax(-1) if eos == 2 else (ids.int() == eos).int().argmax(-1)
        length, mask = _end_mask(ends)
        return text_model.embeddings(input_ids=ids[:, :length]), mask

    def layer_fn(layer: nn.Module):
        call = _hf_layer_call(layer)
        return lambda s: (call(s[0], causal_padding_mask(s[1], s[0].dtype)), s[1])

    norm = text_model.final_layer_norm
    stages = [Stage("embeddings", [text_model.embeddings], embed, is_block=False)]
    stages += [Stage(f"layers.{i}", [layer], layer_fn(layer)) for i, layer in enumerate(layers)]
    stages.append(Stage("final_layer_norm", [norm], lambda s: _pool_end(norm(s[0]), s[1]), is_block=False))
    return stages if _covers(stages, text_model, [n for n, _ in text_model.named_parameters()]) else None


def hf_clip_vision_stages(vision_model: nn.Module) -> list[Stage] | None:
    """An HF CLIP vision model: embeddings + ``pre_layrnorm``, each layer, class token + ``post_layernorm``."""
    vm = vision_model
    layers = getattr(getattr(vm, "encoder", None), "layers", None)
    if layers is None or not all(hasattr(vm, a) for a in ("embeddings", "pre_layrnorm", "post_layernorm")):
        return None

    def layer_fn(layer: nn.Module):
        call = _hf_layer_call(layer)
        return lambda x: call(x, None)

    stages = [Stage("embeddings", [vm.embeddings, vm.pre_layrnorm], lambda px: vm.pre_layrnorm(vm.embeddings(px)),
                    is_block=False)]
    stages += [Stage(f"layers.{i}", [layer], layer_fn(layer)) for i, layer in enumerate(layers)]
    stages.append(Stage("post_layernorm", [vm.post_layernorm], lambda x: vm.post_layernorm(x[:, 0]), is_block=False))
    return stages if _covers(stages, vm, [n for n, _ in vm.named_parameters()]) else None
