"""Evaluators (sentence-transformers' idea): one place that says what a family of metrics computes, which metric
selects a model and whether higher is better, and the columns of its tables.

An :class:`Evaluator` holds the data it scores (a dev split, a labelled set, ...) and is called with a model:
``evaluator(model) -> {metric: value}``. Its class describes its metrics without any data, so that selection,
sweeps, ensemble search, curves, reports and tables read them from here: ``primary_metric``,
``greater_is_better`` (of the primary metric), :meth:`~Evaluator.direction` (``max`` / ``min`` for any of its
metrics: a retrieval median rank is lower-better), ``columns`` ((key, label) pairs in table order) and
``brief`` (the keys of compact tables).

The registry: :func:`register_evaluator` (``name -> class``), :data:`EVALUATORS`, :func:`get_evaluator`
(``name, **kwargs -> instance``). A training run's ``train.evaluator`` names one that scores image-caption
pairs (``scores_pairs``). Captioning metrics live in :mod:`cliplab.caption` (a higher layer): here is only
what a caption evaluator reports (:class:`CaptionEvaluator`); :mod:`cliplab.caption.evaluator` registers the
one that decodes and scores a captioner.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from cliplab.errors import ConfigError
from cliplab.eval.retrieval import DEFAULT_KS, retrieval_metrics

Embed = Callable[[Any, Any], Any]  # (model, data) -> the model's embeddings of the data


class Evaluator:
    """Scores a model on the data it holds; the class attributes describe its metrics (see the module)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # what its metrics are called in messages ("unknown retrieval metric ...")
    primary_metric: ClassVar[str] = ""
    greater_is_better: ClassVar[bool] = True  # of the primary metric
    metrics: ClassVar[tuple[str, ...]] = ()  # every metric that may select (train.select_metric, --metric)
    lower_is_better: ClassVar[tuple[str, ...]] = ()  # of ``metrics``, those where lower is better
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()  # (key, label) of its tables, in order
    brief: ClassVar[tuple[str, ...]] = ()  # the keys of compact tables
    scores_pairs: ClassVar[bool] = False  # scores a dev split of image-caption pairs: can select a training run

    def __call__(self, model: Any) -> dict:
        """The metrics of ``model`` on this evaluator's data."""
        raise NotImplementedError

    @classmethod
    def check_metric(cls, metric: str) -> str:
        """``metric`` when it is one of this evaluator's; else a ConfigError listing them."""
        if metric not in cls.metrics:
            raise ConfigError(f"unknown {cls.family or cls.name} metric {metric!r}; choose one of "
                              f"{', '.join(cls.metrics)}")
        return metric

    @classmethod
    def direction(cls, metric: str | None = None) -> str:
        """``max`` (higher is better) or ``min`` for ``metric`` (default: the primary metric)."""
        metric = cls.check_metric(metric or cls.primary_metric)
        if metric == cls.primary_metric:
            return "max" if cls.greater_is_better else "min"
        return "min" if metric in cls.lower_is_better else "max"

    @classmethod
    def best(cls, values: Sequence[float], metric: str | None = None) -> int:
        """The index of the best of ``values`` of ``metric`` (the first of equals)."""
        pick = np.argmax if cls.direction(metric) == "max" else np.argmin
        return int(pick(np.asarray(values, dtype=np.float64)))

    @classmethod
    def label(cls, key: str) -> str:
        """The column label of a metric key (the key itself when it has no column)."""
        return dict(cls.columns).get(key, key)

    @classmethod
    def brief_columns(cls) -> list[tuple[str, str]]:
        """(key, label) of the compact table's columns."""
        return [(k, cls.label(k)) for k in cls.brief]

    @classmethod
    def check_trains(cls, where: str) -> None:
        """Refuse an evaluator that cannot score the dev image-caption pairs of a training run."""
        if not cls.scores_pairs:
            raise ConfigError(f"{where}: evaluator {cls.name!r} does not score image-caption pairs, so it cannot "
                              f"select a training run; choose one that does: "
                              f"{', '.join(n for n, c in EVALUATORS.items() if c.scores_pairs)}")


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(name: str, cls: type[Evaluator]) -> type[Evaluator]:
    """Make ``cls`` available as ``name`` (``train.evaluator: NAME``); returns it (usable as a decorator's
    body). A name registered again is replaced."""
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        raise TypeError(f"an evaluator is an Evaluator subclass, not {cls!r}")
    if not cls.primary_metric or cls.primary_metric not in cls.metrics:
        raise ConfigError(f"evaluator {name!r}: primary_metric {cls.primary_metric!r} must be one of its metrics")
    EVALUATORS[name] = cls
    return cls


def unregister_evaluator(name: str) -> None:
    EVALUATORS.pop(name, None)


def evaluator_class(name: str) -> type[Evaluator]:
    """The evaluator class registered as ``name``; an unknown name is a ConfigError listing them."""
    if name not in EVALUATORS:
        raise ConfigError(f"unknown evaluator {name!r}; registered: {', '.join(sorted(EVALUATORS))}")
    return EVALUATORS[name]


def get_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """An instance of the evaluator registered as ``name``, holding the data in ``kwargs``."""
    return evaluator_class(name)(**kwargs)


_RANKS = tuple(f"{d}_{s}" for d in ("t2i", "i2t") for s in ("median_rank", "mean_rank"))


class RetrievalEvaluator(Evaluator):
    """Image-text retrieval (Recall@K both ways, MRR, median / mean rank, R-sum) on image-caption pairs.

    ``data``: anything with ``caption_image`` (each caption's image index), e.g. a training run's split inputs
    or a ``CaptionDataset``. Calling it embeds ``data`` with ``embed(model, data)`` (default:
    ``model.embed(data)``, as :class:`~cliplab.train.trainer.Trainer` does) and scores the embeddings
    (:meth:`score` scores embeddings computed elsewhere)."""

    name = family = "retrieval"
    primary_metric = "rsum"
    metrics = tuple(f"{d}_r{k}" for d in ("t2i", "i2t") for k in DEFAULT_KS) + ("t2i_mrr", "i2t_mrr", "rsum") + _RANKS
    lower_is_better = _RANKS
    columns = (("t2i_r1", "T→I R@1"), ("t2i_r5", "R@5"), ("t2i_r10", "R@10"), ("i2t_r1", "I→T R@1"),
               ("i2t_r5", "R@5"), ("i2t_r10", "R@10"), ("t2i_mrr", "T→I MRR"), ("i2t_mrr", "I→T MRR"),
               ("t2i_median_rank", "T→I med"), ("i2t_median_rank", "I→T med"))
    brief = ("t2i_r1", "i2t_r1")
    scores_pairs = True

    def __init__(self, data: Any = None, *, embed: Embed | None = None, ks: Sequence[int] = DEFAULT_KS,
                 device: str | torch.device = "cpu") -> None:
        self.data, self.embed, self.ks, self.device = data, embed, tuple(ks), device

    def __call__(self, model: Any) -> dict:
        if self.data is None:
            raise ConfigError(f"the {self.name} evaluator holds no data to score (give data=)")
        img, txt = self.embed(model, self.data) if self.embed else model.embed(self.data)
        return self.score(img, txt, self.data.caption_image)

    def score(self, image_emb: Any, text_emb: Any, caption_image: Any) -> dict:
        """The metrics of embeddings (``caption_image``: each caption's image index)."""
        return retrieval_metrics(image_emb, text_emb, caption_image, ks=self.ks, device=self.device).metrics


class ClassificationEvaluator(Evaluator):
    """What classification evaluators report (accuracy, top-5, macro precision / recall / F1, all in %)."""

    family = "classification"
    primary_metric = "accuracy"
    metrics = ("accuracy", "top5", "macro_f1", "macro_precision", "macro_recall")
    columns = (("accuracy", "accuracy"), ("top5", "top-5"), ("macro_f1", "macro-F1"), ("macro_precision", "macro-P"),
               ("macro_recall", "macro-R"))
    brief = ("accuracy", "top5", "macro_f1")

    def __init__(self, labels: Sequence[int], class_names: Sequence[str]) -> None:
        self.labels, self.class_names = np.asarray(labels), list(class_names)

    def score(self, scores: Any) -> dict:
        """The metrics of class scores ``[N, C]`` (also per class and the confusion matrix)."""
        from cliplab.eval.classification import classification_metrics

        return classification_metrics(self.labels, np.asarray(scores), self.class_names)


class ZeroShotEvaluator(ClassificationEvaluator):
    """Zero-shot classification from class-name prompts (:class:`~cliplab.eval.zeroshot.ZeroShotClassifier`).

    ``images``: image embeddings ``[N, d]``, or what ``embed(model, images)`` turns into them."""

    name = "zeroshot"

    def __init__(self, images: Any, labels: Sequence[int], class_names: Sequence[str], *,
                 templates: str | Sequence[str] = "photo", similarity: str = "cosine",
                 embed: Embed | None = None) -> None:
        super().__init__(labels, class_names)
        self.images, self.templates, self.similarity, self.embed = images, templates, similarity, embed

    @torch.inference_mode()
    def __call__(self, model: Any) -> dict:
        from cliplab.eval.zeroshot import ZeroShotClassifier

        emb = self.embed(model, self.images) if self.embed else self.images
        clf = ZeroShotClassifier(model, self.class_names, self.templates, self.similarity)
        return self.score(clf.scores(torch.as_tensor(emb)).cpu().numpy())


class ProbeEvaluator(ClassificationEvaluator):
    """A linear probe (``logistic`` or ``torch``) fitted on ``train`` features and scored on ``test`` ones.

    ``train`` / ``test``: ``(features, labels)``, features ``[N, d]`` or what ``embed(model, features)``
    turns into them."""

    name = "probe"

    def __init__(self, train: tuple[Any, Sequence[int]], test: tuple[Any, Sequence[int]], class_names: Sequence[str],
                 *, method: str = "logistic", seed: int = 0, power_norm: bool = False,
                 embed: Embed | None = None) -> None:
        super().__init__(test[1], class_names)
        self.train, self.test, self.method, self.seed, self.power_norm = train, test, method, seed, power_norm
        self.embed = embed

    def __call__(self, model: Any) -> dict:
        from cliplab.eval.probe import probe_vs_zeroshot

        features = [self.embed(model, x) if self.embed else x for x in (self.train[0], self.test[0])]
        out = probe_vs_zeroshot(np.asarray(features[0]), np.asarray(self.train[1]), np.asarray(features[1]),
                                self.labels, self.class_names, methods=(self.method,), seed=self.seed,
                                power_norm=self.power_norm)
        return out[f"probe:{self.method}"]


class CaptionEvaluator(Evaluator):
    """What a caption evaluator reports (x100; CLIPScore with a cliplab model). Scoring needs
    :mod:`cliplab.caption` (a higher layer): :class:`cliplab.caption.evaluator.CaptionerEvaluator` does it and
    is registered as ``caption``."""

    name = family = "caption"
    primary_metric = "cider"
    metrics = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "clipscore", "refclipscore")
    columns = (("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"), ("meteor", "METEOR"),
               ("rouge_l", "ROUGE-L"), ("cider", "CIDEr-D"), ("clipscore", "CLIPScore*"),
               ("refclipscore", "RefCLIPScore*"))
    brief = ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "clipscore", "refclipscore")


for _cls in (RetrievalEvaluator, ZeroShotEvaluator, ProbeEvaluator):
    register_evaluator(_cls.name, _cls)
