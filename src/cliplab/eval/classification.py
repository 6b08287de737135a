"""Classification metrics: accuracy, top-k, macro/per-class F1, precision, recall, confusion matrix."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """% of rows whose true class is among the k highest scores (ties broken against the model).
    Non-finite scores are refused (:class:`~cliplab.errors.NumericError`)."""
    from cliplab.eval.retrieval import check_finite

    scores = np.asarray(scores, dtype=np.float64)
    check_finite(scores, "class scores")
    y_true = np.asarray(y_true)
    true_score = scores[np.arange(len(y_true)), y_true]
    above = (scores > true_score[:, None]).sum(1)
    tied_others = (scores == true_score[:, None]).sum(1) - 1
    return float(((above + tied_others) < k).mean() * 100.0)


def classification_metrics(y_true: Sequence[int], scores: np.ndarray, class_names: Sequence[str],
                           ks: Sequence[int] = (1, 5)) -> dict:
    """All metrics as plain JSON-able values; ``scores`` is ``[N, C]`` (logits or probabilities)."""
    from cliplab.eval.retrieval import check_finite

    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    check_finite(scores, "class scores")
    y_pred = scores.argmax(1)
    labels = list(range(len(class_names)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "accuracy": float((y_pred == y_true).mean() * 100.0),
        **{f"top{k}": top_k_accuracy(y_true, scores, k) for k in ks if k <= len(class_names)},
        "macro_f1": float(f.mean() * 100.0),
        "macro_precision": float(p.mean() * 100.0),
        "macro_recall": float(r.mean() * 100.0),
        "per_class": {name: {"precision": float(p[i] * 100), "recall": float(r[i] * 100), "f1": float(f[i] * 100),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
        "n": int(len(y_true)),
    }
    return out
