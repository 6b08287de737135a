"""Image captioning: visual tokens from a frozen image tower, a mapping network into a pretrained causal LM's
input space, parameter-efficient tuning (prefix, LoRA, adapters, full), decoding, metrics and baselines."""

from cliplab.caption.model import Captioner, CaptionerConfig
from cliplab.caption.train import CaptionRunConfig, evaluate_captioner, train_captioner

__all__ = ["Captioner", "CaptionerConfig", "CaptionRunConfig", "evaluate_captioner", "train_captioner"]
