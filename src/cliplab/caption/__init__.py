"""Image captioning: visual tokens from a frozen image tower, a mapping network into a pretrained causal LM's
input space, parameter-efficient tuning (prefix, LoRA, adapters, full), decoding, metrics and baselines."""

from cliplab.caption.model import Captioner, CaptionerConfig
from cliplab.caption.train import CaptionRunConfig, evaluate_captioner, train_captioner

from cliplab.utils import make_module_callable

__all__ = ["Captioner", "CaptionerConfig", "CaptionRunConfig", "evaluate_captioner", "train_captioner", "evaluate",
           "generate"]


def evaluate(run, **options):
    """``cliplab caption eval``: the notebook API's call (:func:`cliplab.api.caption_evaluate`)."""
    from cliplab.api import caption_evaluate

    return caption_evaluate(run, **options)


def generate(run, images, **options) -> dict[str, str]:
    """``cliplab caption generate``: image path -> caption (:func:`cliplab.caption.files.caption_files`)."""
    from cliplab.caption.files import caption_files

    return caption_files(run, images, **options)


def _api_caption_train():
    from cliplab.api import caption_train

    return caption_train


make_module_callable("cliplab.caption.train", _api_caption_train)  # ``cliplab.caption.train(config, ...)``
