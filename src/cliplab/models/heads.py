"""Projection heads mapping tower features into the shared space."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cliplab.config import check_section, setting
from cliplab.errors import ConfigError


@dataclass
class HeadConfig:
    kind: str = setting("mlp", choices=("linear", "mlp"))
    embed_dim: int = setting(512, min=1)
    hidden_dim: int = setting(1024, min=1)
    dropout: float = 0.1
    input_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_section(self, "model.head")
        for name in ("dropout", "input_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"model.head.{name} must be in [0, 1), not {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class ProjectionHead(nn.Module):
    """``linear``: one matrix. ``mlp``: Linear-GELU-Dropout-Linear with a residual linear path and LayerNorm."""

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.kind not in ("linear", "mlp"):
            raise ConfigError(f"head kind must be 'linear' or 'mlp', not {cfg.kind!r}")
        self.kind = cfg.kind
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.proj = nn.Linear(in_dim, cfg.embed_dim)
        if cfg.kind == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, cfg.hidden_dim),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden_dim, cfg.embed_dim),
            )
            self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(x)
        if self.kind == "linear":
            return self.proj(x)
        return self.norm(self.proj(x) + self.mlp(x))
