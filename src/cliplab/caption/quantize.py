"""Int8 decoding on CPU for a Llama-style captioner LM: SmoothQuant's scale migration, then int8 linear layers
(int8 weights per output channel; each activation row quantised with its own scale).

Plain dynamic int8 wrote other, worse captions (dev CIDEr-D 17.5 -> 13.6 on 256 images, per-tensor weights 8.3):
a few input channels of the LM's linear layers carry activations 10-100x the rest, so one int8 step per tensor
is too coarse for everything else. :func:`smooth` moves that range into the weights, exactly in float arithmetic: each
input channel ``j`` of q/k/v (and gate/up, and down) is divided by ``s_j = max|x_j|^a / max|w_j|^(1-a)`` in the
RMSNorm weight (the up projection for down) and multiplied back into the linear weights (Xiao et al. 2023,
SmoothQuant). The maxima ``max|x_j|`` come from greedy decoding of calibration images (:func:`activation_maxima`;
``cliplab index`` uses the caption run's first training images, :mod:`cliplab.serve.captions`); ``a`` was chosen
on Flickr8k dev CIDEr-D (``bench/caption_int8.py``, BENCHMARKS.md).

Activations are quantised per row (per token, :class:`RowInt8Linear`), not with one scale per call: with a
scale taken from each call's whole batch, an image's caption depended on the other images decoded beside it
(125 of 512 captions stayed the same when the prefill was sliced differently; per row: 510-512 of 512 across
batch sizes, the rest flipped by float rounding elsewhere in the model). One fixed scale per layer from
calibration was tried too: the first prefix position's few huge activations set it, and dev CIDEr-D fell to
8.8-12.5.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from cliplab.errors import ConfigError

SMOOTHING_ALPHA = 0.7  # chosen on Flickr8k dev CIDEr-D among 0.5-0.8 (bench/caption_int8.py)
NORM_FED = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def _linear(module: nn.Module) -> nn.Linear:
    """The plain linear layer of a (merged) PEFT LoRA wrapper, or the layer itself."""
    return getattr(module, "base_layer", module)


MEASURED = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # one input per norm-fed group, and down's


ACTIVATION_ZERO_POINT, ACTIVATION_LEVELS = 64, 63  # fbgemm's 7-bit activations (no int16 overflow on AVX2)


class RowInt8Linear(nn.Module):
    """A linear layer with int8 weights (symmetric, per output channel) whose input rows are each quantised to
    7 bits at their own scale (their largest ``|value|``), run by fbgemm: a row's output does not depend on the
    other rows of the batch. Float in, float out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(1) / 127).clamp(min=1e-8).double()
        with warnings.catch_warnings():  # torch's "quantized tensors are deprecated": fbgemm's kernels need them
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scales, torch.zeros(len(weight), dtype=torch.long), 0,
                                                 torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float()
        peak = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows / peak, 1.0 / ACTIVATION_LEVELS, ACTIVATION_ZERO_POINT, self._packed).mul_(peak)
        return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_int8_kernels() -> None:
    """Nothing, or a ConfigError: unless :class:`RowInt8Linear` runs here: its kernel is fbgemm's (PyTorch's ``x86`` and
    ``fbgemm`` quantized engines, AVX2 CPUs); ``qnnpack`` (ARM) and ``onednn`` have none."""
    engine = torch.backends.quantized.engine
    try:
        probe = RowInt8Linear(nn.Linear(8, 4))
        with torch.inference_mode():
            ok = bool(torch.isfinite(probe(torch.randn(2, 8))).all())
    except RuntimeError as exc:
        raise ConfigError(f"int8 decoding needs fbgemm's int8 kernels (quantized engine x86 or fbgemm on an AVX2 "
                          f"CPU; this one: {engine}): {str(exc).splitlines()[0]}") from None
    if not ok:
        raise ConfigError(f"int8 decoding: the {engine} int8 kernels gave non-finite outputs")


def maxima_keys(lm: nn.Module) -> set[str]:
    """The names :func:`activation_maxima` returns (and :func:`smooth` reads) for ``lm``'s blocks."""
    return {f"{i}.{name}" for i in range(len(lm.model.layers)) for name in MEASURED}


@torch.no_grad()
def _gain_is_weight(norm: nn.Module) -> bool:
    """Whether the norm's output is proportional to its weight (Llama's ``x_hat * w``; not Gemma's
    ``x_hat * (1 + w)``), so dividing the weight divides the output."""
    import copy

    twice = copy.deepcopy(norm)
    twice.weight.mul_(2)
    x = torch.randn(2, norm.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(norm.weight)
    return bool(torch.allclose(twice(x), 2 * norm(x), rtol=1e-4, atol=1e-5))


def smoothable(lm: nn.Module) -> bool:
    """Whether ``lm`` has the Llama block layout :func:`smooth` works on: RMSNorm (output proportional to its
    weight) -> q/k/v, RMSNorm -> gate/up, then down, and no other norm between (Gemma 2/3 have more)."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if not layers:
        return False
    try:
        for layer in layers:
            if hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm"):
                return False
            for norm, names in NORM_FED:
                for name in (*names, "mlp.down_proj"):
                    if not isinstance(_linear(layer.get_submodule(name)), nn.Linear):
                        return False
        return all(_gain_is_weight(layers[0].get_submodule(norm)) for norm, _ in NORM_FED)
    except (AttributeError, TypeError, RuntimeError):
        return False


def _unmerged_lora(lm: nn.Module) -> bool:
    return any(hasattr(m, "base_layer") and not getattr(m, "merged", True) for m in lm.modules())


@torch.inference_mode()
def activation_maxima(model, grid: torch.Tensor, pooled: torch.Tensor, *, max_new_tokens: int = 30,
                      batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Per input channel, the largest ``|activation|`` entering each linear layer of the LM's blocks while
    ``model`` (a :class:`~cliplab.caption.model.Captioner`, float) greedily captions the calibration images."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    hooks = []
    for i, layer in enumerate(model.lm.model.layers):
        for name in MEASURED:
            hooks.append(_linear(layer.get_submodule(name)).register_forward_hook(record(f"{i}.{name}")))
    try:
        for s in range(0, len(grid), batch_size):
            model.greedy(grid[s:s + batch_size], pooled[s:s + batch_size], max_new_tokens=max_new_tokens)
    finally:
        for h in hooks:
            h.remove()
    if not torch.isfinite(torch.stack([v.max() for v in maxima.values()])).all():
        raise ValueError("calibration activations are not finite")
    return {k: v.cpu() for k, v in maxima.items()}


def _scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.cat([w.abs() for w in weights]).amax(0).float().clamp(min=1e-5)
    return (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth(lm: nn.Module, maxima: dict[str, torch.Tensor], alpha: float = SMOOTHING_ALPHA) -> None:
    """Migrate activation range into the weights of every block (the float model's outputs are unchanged up to
    rounding): RMSNorm weight / s and q,k,v (gate,up) columns * s; up rows / s and down columns * s."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must be in [0, 1], not {alpha}")
    for i, layer in enumerate(lm.model.layers):
        for norm, names in NORM_FED:
            linears = [_linear(layer.get_submodule(n)) for n in names]
            s = _scales(maxima[f"{i}.{names[0]}"], [m.weight for m in linears], alpha)
            layer.get_submodule(norm).weight.div_(s.to(layer.get_submodule(norm).weight.dtype))
            for m in linears:
                m.weight.mul_(s.to(m.weight.dtype))
        up, down = _linear(layer.mlp.up_proj), _linear(layer.mlp.down_proj)
        s = _scales(maxima[f"{i}.mlp.down_proj"], [down.weight], alpha)
        up.weight.div_(s.to(up.weight.dtype)[:, None])
        if up.bias is not None:
            up.bias.div_(s.to(up.bias.dtype))
        down.weight.mul_(s.to(down.weight.dtype))


def quantize_int8(model, maxima: dict[str, torch.Tensor], alpha: float = SMOOTHING_ALPHA):
    """Make ``model`` (a float :class:`~cliplab.caption.model.Captioner` on CPU, LoRA merged) decode with int8
    linear layers: :func:`smooth`, then every ``nn.Linear`` of the LM (the vocabulary head too) becomes a
    :class:`RowInt8Linear`. For decoding only (it cannot be trained or saved after)."""
    lm = model.lm
    if next(lm.parameters()).device.type != "cpu":
        raise ConfigError("int8 decoding runs on CPU only (fbgemm's int8 kernels); use float32 on a GPU")
    if not smoothable(lm):
        raise ConfigError(f"int8 decoding needs a Llama-style LM (RMSNorm, q/k/v, gate/up/down); "
                          f"{type(lm).__name__} is not one")
    if _unmerged_lora(lm):
        raise ConfigError("fold the LoRA adapters in first (Captioner.merge_for_inference)")
    if set(maxima) != maxima_keys(lm):
        raise ConfigError("int8 calibration maxima do not match this LM's layers; calibrate again")
    check_int8_kernels()
    if getattr(lm.config, "tie_word_embeddings", False):  # the head is swapped below; the embedding stays float
        lm.config.tie_word_embeddings = False
    probe = torch.randn(1, 8, lm.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = lm(inputs_embeds=probe.to(lm.dtype)).logits.float()
    smooth(lm, maxima, alpha)
    with torch.inference_mode():
        after = lm(inputs_embeds=probe.to(lm.dtype)).logits.float()
    if not bool(((after - before).abs().max() <= 1e-3 * (1 + before.abs().max())).item()):
        raise ConfigError(f"int8 smoothing changed {type(lm).__name__}'s float outputs: this LM's blocks are not "
                          "the layout it assumes; use float32")
    for name, module in list(lm.named_modules()):
        if type(module) is nn.Linear and not _is_lora_part(name):
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent), child, RowInt8Linear(module))
    model._merged = True
    model.int8 = True
    return model


def _is_lora_part(name: str) -> bool:
    """A merged PEFT adapter's own matrices (``lora_A``/``lora_B``): unused once merged, left as they are."""
    return ".lora_A." in f".{name}." or ".lora_B." in f".{name}."
