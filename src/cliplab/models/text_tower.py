"""Text tower: a Hugging Face encoder (folder or hub id) with mean or CLS pooling."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cliplab.config import check_section, setting
from cliplab.errors import ConfigError
from cliplab.models.pretrained import DEFAULT_TEXT_TOWER, resolve_text_model
from cliplab.models.stages import Stage, cls_pool, hf_text_stages, mean_pool
from cliplab.models.tuning import apply_lora_spec, tuned_parts
from cliplab.utils import sha256_file, sha256_text


@dataclass
class TextTowerConfig:
    name: str = DEFAULT_TEXT_TOWER  # packaged alias, HF folder or hub id
    pooling: str = setting("mean", choices=("mean", "cls"))
    max_length: int = setting(64, min=1)
    lora: dict | None = None  # LoRA adapters (set by fine-tuning; rebuilt on load)

    def __post_init__(self) -> None:
        check_section(self, "model.text")

    def to_dict(self) -> dict:
        return asdict(self)


class TextTower(nn.Module):
    """Sentence features ``[N, hidden]`` from token embeddings. A
    :class:`~cliplab.models.base.TextFeatureTower` the ONNX backends can export."""

    onnx_exportable = True

    def __init__(self, config: TextTowerConfig | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load are noise in CLI output

        cfg = config or TextTowerConfig()
        if cfg.pooling not in ("mean", "cls"):
            raise ConfigError(f"text pooling must be 'mean' or 'cls', not {cfg.pooling!r}")
        self.config = cfg
        self.source = resolve_text_model(cfg.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.model = AutoModel.from_pretrained(self.source)
        except OSError as exc:
            raise ConfigError(f"cannot load text model {cfg.name!r}: {str(exc).splitlines()[0]}") from None
        apply_lora_spec(self.model, cfg.lora)
        self.model.eval()
        self.weights_delta = ""  # digest of fine-tuned tensors loaded on top of the weights
        folder = Path(self.source)
        weight_files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        self.weights_id = sha256_file(weight_files[0]) if weight_files else self.source

    @property
    def output_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                               return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Token counts (truncated at ``max_length``): batches of similar lengths need the least padding."""
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=True,
                                                   max_length=self.config.max_length)["input_ids"]]

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (cls_pool if self.config.pooling == "cls" else mean_pool)(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.pool(out, attention_mask)

    def stages(self) -> list[Stage]:
        return hf_text_stages(self.model, self.pool)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Tokenise and pool a list of strings on the tower's device."""
        device = next(self.model.parameters()).device
        return self(**self.tokenize(texts, device))

    def fingerprint(self) -> str:
        return sha256_text("text", self.source if not Path(self.source).is_dir() else "dir", self.weights_id,
                           self.config.pooling, str(self.config.max_length), *tuned_parts(self.config.lora, self.weights_delta))
