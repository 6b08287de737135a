"""Zero-shot classification refined by self-training on unlabelled images of the target domain.

The zero-shot classifier labels a pool of unlabelled images; the images it is surest about, the same
number for every class (so a class the prompts favour cannot take over), train a logistic regression
on frozen image features; that classifier re-labels the pool and the next round takes a larger share
of each class, up to ``fractions[-1]`` (curriculum pseudo-labelling in the spirit of UPL, Huang et al.
2022, and ReCLIP, Hu et al. 2024). No label of the pool is ever read: :func:`self_train` takes
features and zero-shot scores only. The fitted classifier then scores new images inductively.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cliplab.errors import ConfigError
from cliplab.eval.probe import logistic_regression, power_normalize
from cliplab.eval.retrieval import check_finite

SELECTION_MODES = ("balanced", "proportional")  # per-class cap: fraction x pool/classes, or x the class's predictions
LOG_FLOOR = float(np.log(1e-12))  # score of a class no pseudo-label named (finite: non-finite scores are refused)


@dataclass
class SelfTrainingConfig:
    """Fixed settings: the pool has no labels, so nothing here is chosen on it.

    ``fractions``: share of each class's pseudo-labelled images used per round (highest probability first,
    ``fraction x pool / classes`` per class with ``selection="balanced"``, which assumes roughly balanced
    classes; ``fraction x`` the class's own predictions with ``"proportional"``, which keeps the predicted
    class balance, for unbalanced pools); ``c``: the logistic regression's inverse regularisation.
    Defaults chosen on a CIFAR-10 dev protocol (adapt on half of the labelled train subset, score the other
    half); see BENCHMARKS.md.
    """

    fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    c: float = 0.002
    power_norm: bool = True
    max_iter: int = 500
    seed: int = 0
    selection: str = "balanced"

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_MODES:
            raise ConfigError(f"self-training selection must be one of {', '.join(SELECTION_MODES)}, not "
                              f"{self.selection!r}")
        self.fractions = tuple(float(f) for f in self.fractions)
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"self-training fractions must be in (0, 1], not {list(self.fractions)}")
        if not self.c > 0:
            raise ConfigError(f"self-training C must be > 0, not {self.c}")


@dataclass
class SelfTrainedClassifier:
    """Logistic regression fitted on pseudo-labels; :meth:`scores` gives ``[N, C]`` log-probabilities."""

    n_classes: int
    scaler: StandardScaler
    model: LogisticRegression
    config: SelfTrainingConfig
    rounds: list[dict] = field(default_factory=list)

    def _prepare(self, features: np.ndarray) -> np.ndarray:
        x = power_normalize(features) if self.config.power_norm else np.asarray(features, dtype=np.float32)
        return self.scaler.transform(x)

    def scores(self, features: np.ndarray) -> np.ndarray:
        return _class_log_proba(self.model, self._prepare(features), self.n_classes)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features).argmax(1)

    def summary(self) -> dict:
        return {"config": asdict(self.config), "rounds": self.rounds}


def capped_pseudo_labels(probabilities: np.ndarray, per_class) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels): for each class, up to ``per_class`` (one number, or one per class) images predicted
    as it, most probable first."""
    pred = probabilities.argmax(1)
    caps = np.broadcast_to(np.asarray(per_class), (probabilities.shape[1],))
    idx, lab = [], []
    for c in range(probabilities.shape[1]):
        cand = np.flatnonzero(pred == c)
        cand = cand[np.argsort(-probabilities[cand, c], kind="stable")][:int(caps[c])]
        idx.append(cand)
        lab.append(np.full(len(cand), c))
    return np.concatenate(idx), np.concatenate(lab)


def _softmax(log_scores: np.ndarray) -> np.ndarray:
    e = np.exp(log_scores - log_scores.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _class_log_proba(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((len(x), n_classes), LOG_FLOOR, dtype=np.float64)
    out[:, model.classes_] = np.maximum(model.predict_log_proba(x), LOG_FLOOR)
    return out


def self_train(features: np.ndarray, zeroshot_probabilities: np.ndarray,
               config: SelfTrainingConfig | None = None, log=None) -> SelfTrainedClassifier:
    """Fit a classifier on ``features`` of an unlabelled pool from its zero-shot class probabilities.

    ``zeroshot_probabilities`` is ``[N, C]`` (rows sum to 1). Each round records how many pseudo-labels each
    class got and how many pool predictions changed (unsupervised diagnostics: no label is read).
    """
    cfg = config or SelfTrainingConfig()
    x = np.asarray(features, dtype=np.float32)
    p = np.asarray(zeroshot_probabilities, dtype=np.float64)
    if x.ndim != 2 or p.ndim != 2 or len(x) != len(p):
        raise ConfigError(f"self-training: features {x.shape} and zero-shot probabilities {p.shape} must be "
                          "[N, d] and [N, C] for the same N images")
    check_finite(x, "self-training features")
    check_finite(p, "self-training zero-shot probabilities")
    n, n_classes = p.shape
    if n < 2 * n_classes:
        raise ConfigError(f"self-training needs at least 2 unlabelled images per class: {n} images, {n_classes} "
                          "classes")
    if cfg.power_norm:
        x = power_normalize(x)
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    rounds: list[dict] = []
    clf = None
    for r, fraction in enumerate(cfg.fractions):
        if cfg.selection == "balanced":
            per_class = max(1, int(round(fraction * n / n_classes)))
        else:  # the surest share of each class's own predictions: keeps the pool's predicted class balance
            per_class = np.maximum(1, np.round(fraction * np.bincount(p.argmax(1), minlength=n_classes))).astype(int)
        idx, lab = capped_pseudo_labels(p, per_class)
        if len(np.unique(lab)) < 2:
            raise ConfigError(f"self-training round {r}: the pool's pseudo-labels name fewer than 2 classes; the "
                              "zero-shot classifier is too one-sided for this pool")
        clf = logistic_regression(xs[idx], lab, cfg.c, cfg.max_iter, cfg.seed)
        log_q = _class_log_proba(clf, xs, n_classes)
        q = _softmax(log_q)
        counts = np.bincount(lab, minlength=n_classes)
        row = {"round": r, "fraction": fraction, "per_class_cap": np.asarray(per_class).tolist(),
               "n_pseudo_labels": int(len(idx)),
               "pseudo_labels_per_class": counts.tolist(),
               "pool_predictions_changed": float((q.argmax(1) != p.argmax(1)).mean() * 100)}
        rounds.append(row)
        if log:
            cap = f"up to {per_class} per class" if np.ndim(per_class) == 0 else f"{fraction:.0%} of each class's"
            log(f"self-training round {r + 1}/{len(cfg.fractions)}: {len(idx)} pseudo-labels ({cap}), "
                f"{row['pool_predictions_changed']:.1f}% of pool predictions changed")
        p = q
    missing = [c for c in range(n_classes) if c not in set(clf.classes_.tolist())]
    if missing:
        rounds[-1]["classes_without_pseudo_labels"] = missing
    return SelfTrainedClassifier(n_classes, scaler, clf, cfg, rounds)
