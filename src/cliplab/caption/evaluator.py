"""The caption evaluator, registered as ``caption``: decodes a split with a captioner and scores the captions
against the split's references. What it reports (metrics, the primary one, columns) is
:class:`cliplab.eval.evaluators.CaptionEvaluator`; the metrics themselves are :mod:`cliplab.caption.metrics`."""

from __future__ import annotations

from typing import Any

from cliplab.caption.metrics import caption_metrics, cider_d
from cliplab.eval.evaluators import CaptionEvaluator, register_evaluator


class CaptionerEvaluator(CaptionEvaluator):
    """Captions of ``split`` (a ``CaptionSplit``) decoded with ``decode`` (``beam`` overrides its beam width),
    scored against ``references`` (default: the split's). ``full=False`` computes CIDEr-D only (the quick,
    Java-free dev selection); ``full=True`` every metric :func:`caption_metrics` gives with ``tokenizer``.
    The result also holds one generated ``example``."""

    def __init__(self, split: Any, decode: Any, device: Any, *, references: dict[str, list[str]] | None = None,
                 beam: int | None = 1, tokenizer: str = "simple", full: bool = False) -> None:
        self.split, self.decode, self.device, self.beam = split, decode, device, beam
        self.references = references if references is not None else split.references
        self.tokenizer, self.full = tokenizer, full

    def __call__(self, model: Any) -> dict:
        from cliplab.caption.train import generate_captions

        generated = generate_captions(model, self.split, self.decode, self.device, beam=self.beam)
        return {**self.score(generated), "example": next(iter(generated.values()))}

    def score(self, generated: dict[str, str]) -> dict:
        """The metrics of generated captions (image name -> caption)."""
        if not self.full:
            return {"cider": cider_d(self.references, generated, tokenizer=self.tokenizer)[0]}
        metrics = caption_metrics(self.references, generated, tokenizer=self.tokenizer,
                                  meteor=self.tokenizer == "ptb")
        return {k: v for k, v in metrics.items() if k != "per_image_cider"}


register_evaluator("caption", CaptionerEvaluator)
