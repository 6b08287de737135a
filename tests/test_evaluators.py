"""The built-in evaluators (cliplab.eval.evaluators): what they report, their directions and columns, and that
calling one gives the numbers of the functions it wraps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cliplab.errors import ConfigError
from cliplab.eval.classification import classification_metrics
from cliplab.eval.evaluators import (EVALUATORS, CaptionEvaluator, Evaluator, ProbeEvaluator, RetrievalEvaluator,
                                     ZeroShotEvaluator, evaluator_class, get_evaluator, register_evaluator)
from cliplab.eval.retrieval import retrieval_metrics


def test_directions_columns_and_metric_names():
    assert {"retrieval", "zeroshot", "probe"} <= set(EVALUATORS)
    assert RetrievalEvaluator.direction() == "max" and RetrievalEvaluator.direction("t2i_median_rank") == "min"
    assert RetrievalEvaluator.direction("i2t_mean_rank") == "min" and RetrievalEvaluator.direction("t2i_mrr") == "max"
    assert ZeroShotEvaluator.direction("macro_f1") == "max" and ProbeEvaluator.primary_metric == "accuracy"
    assert CaptionEvaluator.primary_metric == "cider" and CaptionEvaluator.label("cider") == "CIDEr-D"
    assert [k for k, _ in CaptionEvaluator.brief_columns()] == ["bleu1", "bleu4", "meteor", "rouge_l", "cider",
                                                                "clipscore", "refclipscore"]
    with pytest.raises(ConfigError, match="unknown retrieval metric 'r1'; choose one of t2i_r1"):
        RetrievalEvaluator.direction("r1")
    with pytest.raises(ConfigError, match="unknown classification metric 'rsum'"):
        evaluator_class("zeroshot").direction("rsum")
    with pytest.raises(ConfigError, match="unknown evaluator 'nope'; registered: .*retrieval"):
        get_evaluator("nope")
    with pytest.raises(ConfigError, match="train.evaluator: evaluator 'probe' does not score image-caption pairs"):
        ProbeEvaluator.check_trains("train.evaluator")

    class Broken(Evaluator):
        primary_metric, metrics = "a", ("b",)

    with pytest.raises(ConfigError, match="primary_metric 'a' must be one of its metrics"):
        register_evaluator("broken", Broken)
    assert "broken" not in EVALUATORS


def test_the_retrieval_table_is_the_evaluators_columns():
    from cliplab.eval.tables import retrieval_rows

    header, rows = retrieval_rows({"m": {k: 1.0 for k in RetrievalEvaluator.metrics}})
    assert header == ["model"] + [label for _, label in RetrievalEvaluator.columns] and len(rows[0]) == len(header)


class _Split:
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image, self.text = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
        self.caption_image = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])


class _Embedder:
    def embed(self, split: _Split):
        return split.image, split.text


def test_retrieval_evaluator_scores_what_the_model_embeds():
    split = _Split(0)
    expected = retrieval_metrics(split.image, split.text, split.caption_image).metrics
    assert RetrievalEvaluator(split)(_Embedder()) == expected
    flipped = RetrievalEvaluator(split, embed=lambda model, s: (s.image, -s.text))(None)
    assert flipped == retrieval_metrics(split.image, -split.text, split.caption_image).metrics != expected
    with pytest.raises(ConfigError, match="holds no data"):
        RetrievalEvaluator()(_Embedder())


class _ClassTexts(nn.Module):
    """Text embeddings that are one-hot on the class word (one of three)."""

    words = ("red", "green", "blue")

    def encode_text(self, texts, normalize=True):
        return torch.tensor([[float(w in t) for w in self.words] for t in texts]) + 1e-3


def test_zero_shot_and_probe_evaluators_match_the_functions_they_wrap():
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 1])
    images = torch.eye(3)[labels] + 0.05 * torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(1))
    images[0] = torch.tensor([0.0, 1.0, 0.0])  # one mistake: accuracy 7/8
    zs = ZeroShotEvaluator(images, labels, _ClassTexts.words, templates="{}")(_ClassTexts())
    assert zs["accuracy"] == pytest.approx(87.5)
    scores = images @ torch.nn.functional.normalize(_ClassTexts().encode_text(list(_ClassTexts.words)), dim=-1).T
    expected = classification_metrics(labels, scores.numpy(), _ClassTexts.words)
    assert zs["macro_f1"] == pytest.approx(expected["macro_f1"])

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = np.eye(3)[y] * 3 + rng.normal(size=(60, 3))
    probe = ProbeEvaluator((x[::2], y[::2]), (x[1::2], y[1::2]), ["a", "b", "c"])(None)
    assert probe["accuracy"] > 90 and probe["fit"]["method"] == "logistic"


def test_the_caption_evaluator_is_registered_by_the_caption_package():
    pytest.importorskip("pycocoevalcap")
    from cliplab.caption.evaluator import CaptionerEvaluator
    from cliplab.caption.metrics import cider_d

    assert EVALUATORS["caption"] is CaptionerEvaluator and issubclass(CaptionerEvaluator, CaptionEvaluator)

    class _Split:
        references = {"a": ["a red circle", "a red ball"], "b": ["a blue square", "blue box"]}

    ev = CaptionerEvaluator(_Split(), None, "cpu")
    generated = {"a": "a red circle", "b": "a green square"}
    assert ev.score(generated) == {"cider": cider_d(_Split.references, generated)[0]}
