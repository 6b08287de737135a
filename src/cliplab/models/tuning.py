"""What trains in a tower: nothing, its last N blocks, all of it, or LoRA adapters (PEFT).

``apply_tower_tuning`` works on the :class:`~cliplab.models.stages.Stages` of a side (the last stage, the
projection head, is handled by ``train.trainable``). LoRA adapters are injected with
``peft.inject_adapter_in_model`` into the tower's own modules, so the stage structure (and the cached
frozen prefix in front of the first adapted block) is unchanged; the adapter settings are recorded in
the tower's config so a saved model rebuilds them on load. Adapters go exactly on the named modules (an
open_clip text side, whose root is the whole CLIP, never adapts the vision tower's namesakes).

Default targets, by the first suffix set found in the tuned blocks: ``query``/``value`` (BERT-style),
``q_proj``/``v_proj`` (HF CLIP), ``qkv`` (timm ViT), ``conv_pw``/``conv_pwl`` (timm inverted residuals),
``attn`` (open_clip: a fused ``nn.MultiheadAttention``; PEFT adapts its q/k/v input projection and its output
projection together, merging the adapter into the weights around each call and taking it out after, so the
frozen weights change by float rounding at each call; saved models rebuild them from the base file). The output
projection of an ``nn.MultiheadAttention`` is never a target on its own: the attention uses its weight without
calling it, so an adapter there would do nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from cliplab.config import load_section, setting
from cliplab.errors import ConfigError
from cliplab.models.stages import Stages, set_grad_checkpointing

TUNING_MODES = ("frozen", "last_n", "full", "lora")

# module-name suffixes tried in order when lora_targets is not given
DEFAULT_LORA_TARGETS = (
    ("query", "value"),  # BERT / MiniLM / RoBERTa
    ("q_proj", "v_proj"),  # HF CLIP, many HF encoders
    ("qkv",),  # timm ViT
    ("conv_pw", "conv_pwl"),  # timm EfficientNet / MobileNet inverted residuals
    ("attn",),  # open_clip: fused nn.MultiheadAttention (PEFT: q/k/v in_proj + out_proj)
)


@dataclass
class TowerTuning:
    """``mode``: frozen | last_n | full | lora. ``last_n``: blocks that train (last_n mode) or receive
    adapters (lora; 0 = every block). ``grad_checkpointing``: recompute the tower's block activations in
    the backward pass instead of keeping them (less memory, ~1/3 more compute)."""

    mode: str = setting("frozen", choices=TUNING_MODES)
    last_n: int = setting(0, min=0)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None
    extra: dict = field(default_factory=dict)  # other peft.LoraConfig arguments
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.mode not in TUNING_MODES:
            raise ConfigError(f"tower tuning mode must be one of {', '.join(TUNING_MODES)}, not {self.mode!r}")
        if self.last_n < 0:
            raise ConfigError("tower tuning last_n must be >= 0")
        if self.mode == "last_n" and self.last_n == 0:
            raise ConfigError("tower tuning mode last_n needs last_n >= 1")
        if self.grad_checkpointing and self.mode == "frozen":
            raise ConfigError("tower tuning grad_checkpointing needs a tuned tower (mode last_n, full or lora)")

    @classmethod
    def from_any(cls, value: "TowerTuning | dict | str | None", where: str) -> "TowerTuning":
        if isinstance(value, TowerTuning):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return load_section(cls, {"mode": value}, where)
        return load_section(cls, value, where)

    def to_dict(self) -> dict:
        return asdict(self)


def _selected_stages(stages: Stages, n_blocks: int) -> list[int]:
    """Tower stages (the last stage, the head, excluded) that a tuning with ``n_blocks`` touches."""
    blocks = stages.block_indices(len(stages) - 1)
    if not blocks:
        return list(range(len(stages) - 1))
    if n_blocks > len(blocks):
        raise ConfigError(f"last_n={n_blocks} but the tower has only {len(blocks)} blocks")
    return blocks[-n_blocks:] if n_blocks else list(range(len(stages) - 1))


def _mha_supported() -> bool:
    """Whether the installed PEFT adapts ``nn.MultiheadAttention`` (peft >= 0.14)."""
    try:
        from peft.tuners.lora import layer
    except ImportError:
        return False
    return hasattr(layer, "MultiheadAttention")


def _adaptable(root: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``root`` that can take a LoRA adapter: Linear / Conv2d layers (not the output projection of
    an ``nn.MultiheadAttention``, whose forward the attention never calls) and, with a PEFT that supports it,
    ``nn.MultiheadAttention`` itself."""
    mha = {n: m for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)}
    unused = {id(m.out_proj) for m in mha.values()}
    out = {n: m for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in unused}
    if _mha_supported():
        out.update({n: m for n, m in mha.items() if m._qkv_same_embed_dim})
    return out


def lora_target_names(root: nn.Module, stages: Stages, tuning: TowerTuning) -> list[str]:
    """Full module names (relative to ``root``) of the layers that get adapters."""
    chosen = {id(m) for i in _selected_stages(stages, tuning.last_n) for sm in stages[i].modules for m in sm.modules()}
    candidates = [(name, m) for name, m in _adaptable(root).items() if id(m) in chosen and name]
    suffix_sets = [tuple(tuning.lora_targets)] if tuning.lora_targets else DEFAULT_LORA_TARGETS
    for suffixes in suffix_sets:
        names = [n for n, _ in candidates if n.split(".")[-1] in suffixes]
        if names:
            return names
    unused = {f"{n}.out_proj" for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)}
    hint = ""
    if any(n.split(".")[-1] in (tuning.lora_targets or ()) for n in unused):
        hint = ("; the out_proj of an nn.MultiheadAttention is used without calling it (an adapter there would do "
                "nothing): target the attention module itself")
    raise ConfigError(f"no LoRA target layers ({', '.join(tuning.lora_targets or ['defaults'])}) in the tuned blocks; "
                      f"set lora_targets to module names of Linear/Conv2d layers{hint}")


def describe_lora_targets(root: nn.Module, names: list[str]) -> str:
    """The adapted layers in a line, e.g. ``12 x attn (nn.MultiheadAttention: q/k/v in_proj + out_proj)``."""
    from collections import Counter

    kinds = {}
    for name in names:
        module = root.get_submodule(name)
        module = getattr(module, "base_layer", module)  # already wrapped by PEFT
        kind = ("nn.MultiheadAttention: q/k/v in_proj + out_proj, PEFT's fused form"
                if isinstance(module, nn.MultiheadAttention) else type(module).__name__)
        kinds[name.split(".")[-1]] = kind
    counts = Counter(n.split(".")[-1] for n in names)
    return ", ".join(f"{counts[s]} x {s} ({kinds[s]})" for s in sorted(counts))


def inject_lora(root: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, extra: dict | None = None) -> None:
    """Add LoRA adapters (PEFT) to exactly the named layers of ``root`` (full names), in place; PEFT freezes
    every other parameter of ``root``."""
    import re

    from cliplab.extras import require

    peft = require("peft")
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    exact = "|".join(re.escape(t) for t in targets)  # a string is full-matched; a list would match suffixes
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=exact, **(extra or {}))
    inject_adapter_in_model(cfg, root)


def lora_spec(targets: list[str], tuning: TowerTuning) -> dict:
    """What a tower config records so the adapters are rebuilt when a saved model loads."""
    return {"targets": list(targets), "r": tuning.lora_r, "alpha": tuning.lora_alpha,
            "dropout": tuning.lora_dropout, "extra": dict(tuning.extra)}


def apply_lora_spec(root: nn.Module, spec: dict | None) -> None:
    if spec:
        inject_lora(root, spec["targets"], spec["r"], spec["alpha"], spec["dropout"], spec.get("extra"))


def is_lora_param(name: str) -> bool:
    return "lora_" in name


def apply_tower_tuning(root: nn.Module, stages: Stages, tuning: TowerTuning) -> dict | None:
    """Set ``requires_grad`` on a tower's parameters (the tower stages are frozen first; the last stage, the
    projection, is left alone) and mark its blocks for gradient checkpointing if asked; returns the LoRA spec,
    if any. ``root`` names the modules for PEFT."""
    for p in stages.parameters(0, len(stages) - 1):
        p.requires_grad_(False)
    spec = None
    if tuning.mode == "lora":
        spec = _tune_lora(root, stages, tuning)
    elif tuning.mode in ("last_n", "full"):
        n_blocks = tuning.last_n if tuning.mode == "last_n" else 0
        for i in _selected_stages(stages, n_blocks):
            for m in stages[i].modules:
                for p in m.parameters():
                    p.requires_grad_(True)
    if tuning.grad_checkpointing:
        set_grad_checkpointing(stages)
    return spec


def _tune_lora(root: nn.Module, stages: Stages, tuning: TowerTuning) -> dict | None:
    tower = {id(p) for p in stages.parameters(0, len(stages) - 1)}
    existing = [p for n, p in root.named_parameters() if is_lora_param(n) and id(p) in tower]
    if existing:  # a model saved with adapters: train those again (this tower's only)
        for p in existing:
            p.requires_grad_(True)
        return None
    targets = lora_target_names(root, stages, tuning)
    # PEFT freezes all of root: for an open_clip text side (root: the whole CLIP) that would include the
    # projections and the temperature, so the other parameters get their setting back
    trains = [(p, p.requires_grad) for p in root.parameters()]
    inject_lora(root, targets, tuning.lora_r, tuning.lora_alpha, tuning.lora_dropout, tuning.extra)
    for p, flag in trains:
        p.requires_grad_(flag)
    adapted = tuple(t + "." for t in targets)
    for name, p in root.named_parameters():
        if is_lora_param(name) and name.startswith(adapted):
            p.requires_grad_(True)
    return lora_spec(targets, tuning)


def count_parameters(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def tuned_parts(lora: dict | None, weights_delta: str) -> list[str]:
    """Fingerprint parts of a fine-tuned tower (none for an untouched one, so its cache keys never change)."""
    return ([repr(sorted(lora.items()))] if lora else []) + ([weights_delta] if weights_delta else [])
