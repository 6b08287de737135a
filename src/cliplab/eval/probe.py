"""Linear probes on frozen image features.

(a) scikit-learn logistic regression on standardised features, its inverse regularisation C chosen on
a validation split held out of the training set (the CLIP paper's protocol: a log-spaced sweep, then
a finer search around the best value), refit on the whole training set;
(b) a small torch linear classifier with its own trainer (epochs, LR, weight decay, early stopping on
validation accuracy), so the two can be compared.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cliplab.errors import ConfigError

VAL_FRACTION = 0.2  # share of each class of the training set held out to choose hyperparameters


def check_probe_training_set(labels: np.ndarray, class_names: list[str], val_fraction: float = VAL_FRACTION) -> None:
    """Every class needs an image to fit on and one to validate on; checked before features are computed."""
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    small = [f"{class_names[c]} ({n})" for c, n in enumerate(counts) if n < 2]
    if small:
        raise ConfigError(f"probe: these classes have fewer than 2 training images, so none is left to choose the "
                          f"regularisation on: {', '.join(small[:6])}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"validation fraction must be in (0, 1), not {val_fraction}")


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index arrays."""
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must be in (0, 1), not {fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def power_normalize(features: np.ndarray) -> np.ndarray:
    """Signed square root: damps the few very large activations of pooled ReLU-type features."""
    x = np.asarray(features, dtype=np.float32)
    return np.sign(x) * np.sqrt(np.abs(x))


@dataclass
class ProbeFit:
    """A fitted probe: predicts class scores for raw features."""

    method: str
    scaler: StandardScaler
    model: object
    hyperparameters: dict
    val_accuracy: float
    search: list[dict]
    power_norm: bool = False

    def scores(self, features: np.ndarray) -> np.ndarray:
        x = power_normalize(features) if self.power_norm else np.asarray(features, dtype=np.float32)
        x = self.scaler.transform(x)
        if self.method == "logistic":
            return self.model.predict_log_proba(x)
        with torch.inference_mode():
            return torch.log_softmax(self.model(torch.from_numpy(x.astype(np.float32))), -1).numpy()

    def summary(self) -> dict:
        return {"method": self.method, "hyperparameters": self.hyperparameters, "val_accuracy": self.val_accuracy,
                "search": self.search}


def logistic_regression(x, y, c: float, max_iter: int, seed: int) -> LogisticRegression:
    """sklearn's logistic regression fitted quietly (convergence warnings muted: the probe's C search visits
    weakly regularised settings on purpose)."""
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _probe_inputs(features: np.ndarray, train_views: Sequence[np.ndarray] | None,
                  power_norm: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """(scored features, fitted views) as float32, power-normalised on request; the views default to the
    features, and every view must have their shape."""
    prep = power_normalize if power_norm else (lambda f: np.asarray(f, dtype=np.float32))
    features = prep(features)
    views = [prep(v) for v in train_views] if train_views else [features]
    if any(v.shape != features.shape for v in views):
        raise ConfigError(f"probe: every training view must have the features' shape {features.shape}, not "
                          f"{[v.shape for v in views]}")
    return features, views


def fit_logistic_probe(features: np.ndarray, labels: np.ndarray, *, val_fraction: float = VAL_FRACTION, seed: int = 0,
                       c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
                       refine_steps: int = 4, max_iter: int = 1000, power_norm: bool = False,
                       train_views: Sequence[np.ndarray] | None = None) -> ProbeFit:
    """Logistic regression with C picked on a held-out validation split, then refit on all ``features``.

    ``power_norm`` applies a signed square root before standardising. ``train_views``: other views of the
    same images (row i of each is image i, e.g. the image and its mirror), fitted on as separate samples
    instead of ``features``; the validation split is drawn by image (no view of a validation image is
    fitted on) and scored on ``features``, the representation the test images get.
    """
    labels = np.asarray(labels)
    features, views = _probe_inputs(features, train_views, power_norm)
    tr, va = validation_split(labels, val_fraction, seed)
    fit_x = np.concatenate([v[tr] for v in views])
    fit_y = np.tile(labels[tr], len(views))
    scaler = StandardScaler().fit(fit_x)
    xtr, xva = scaler.transform(fit_x), scaler.transform(features[va])
    search = []

    def val_acc(c: float) -> float:
        for row in search:
            if np.isclose(row["C"], c):
                return row["val_accuracy"]
        acc = float((logistic_regression(xtr, fit_y, c, max_iter, seed).predict(xva) == labels[va]).mean() * 100)
        search.append({"C": float(c), "val_accuracy": acc})
        return acc

    accs = [val_acc(c) for c in c_grid]
    best = int(np.argmax(accs))
    lo = np.log10(c_grid[max(best - 1, 0)])
    hi = np.log10(c_grid[min(best + 1, len(c_grid) - 1)])
    for _ in range(refine_steps):  # bisect the log-C interval around the best value
        mid_lo, mid_hi = (2 * lo + hi) / 3, (lo + 2 * hi) / 3
        if val_acc(10 ** mid_lo) >= val_acc(10 ** mid_hi):
            hi = mid_hi
        else:
            lo = mid_lo
    best_row = max(search, key=lambda r: (r["val_accuracy"], -abs(np.log10(r["C"]))))
    all_x = np.concatenate(views)
    full_scaler = StandardScaler().fit(all_x)
    model = logistic_regression(full_scaler.transform(all_x), np.tile(labels, len(views)), best_row["C"], max_iter, seed)
    return ProbeFit("logistic", full_scaler, model, {"C": best_row["C"], "max_iter": max_iter, "power_norm": power_norm,
                                                     "train_views": len(views) if train_views else 0},
                    best_row["val_accuracy"], sorted(search, key=lambda r: r["C"]), power_norm)


def cross_validated_accuracy(features: np.ndarray, labels: np.ndarray, c: float, *, folds: int = 5, seed: int = 0,
                             max_iter: int = 1000, power_norm: bool = False,
                             train_views: Sequence[np.ndarray] | None = None) -> list[float]:
    """Accuracy (%) of the logistic probe at a fixed ``c`` on each fold of a stratified k-fold split by image: fitted
    on the other folds (on every view in ``train_views`` when given, as :func:`fit_logistic_probe`), scored on the
    fold's ``features``. Every image is scored once, so comparing feature sets this way is far less noisy than on
    one validation split."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    features, views = _probe_inputs(features, train_views, power_norm)
    accs = []
    for fit_idx, val_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        x = np.concatenate([v[fit_idx] for v in views])
        scaler = StandardScaler().fit(x)
        clf = logistic_regression(scaler.transform(x), np.tile(labels[fit_idx], len(views)), c, max_iter, seed)
        accs.append(float((clf.predict(scaler.transform(features[val_idx])) == labels[val_idx]).mean() * 100))
    return accs


@dataclass
class TorchProbeConfig:
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    patience: int = 10
    label_smoothing: float = 0.0
    val_fraction: float = VAL_FRACTION
    seed: int = 0
    power_norm: bool = False


def fit_torch_probe(features: np.ndarray, labels: np.ndarray, cfg: TorchProbeConfig | None = None) -> ProbeFit:
    """A linear layer trained with AdamW + cosine LR; the epoch with the best validation accuracy is kept."""
    cfg = cfg or TorchProbeConfig()
    labels = np.asarray(labels)
    features = power_normalize(features) if cfg.power_norm else np.asarray(features, dtype=np.float32)
    tr, va = validation_split(labels, cfg.val_fraction, cfg.seed)
    scaler = StandardScaler().fit(features[tr])
    xtr = torch.from_numpy(scaler.transform(features[tr]).astype(np.float32))
    xva = torch.from_numpy(scaler.transform(features[va]).astype(np.float32))
    ytr, yva = torch.from_numpy(labels[tr]), torch.from_numpy(labels[va])
    n_classes = int(labels.max()) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = torch.nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-len(xtr) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    best = (-1.0, 0, None)
    history, bad = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(cfg.batch_size):
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            acc = float((model(xva).argmax(-1) == yva).float().mean() * 100)
        history.append({"epoch": epoch, "val_accuracy": acc, "train_loss": loss.item()})
        if acc > best[0]:
            best, bad = (acc, epoch, {k: v.clone() for k, v in model.state_dict().items()}), 0
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                break
    model.load_state_dict(best[2])
    model.eval()
    return ProbeFit("torch_linear", scaler, model, {**asdict(cfg), "best_epoch": best[1]}, best[0], history,
                    cfg.power_norm)


def probe_vs_zeroshot(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                      test_labels: np.ndarray, class_names: list[str], *, methods=("logistic", "torch"),
                      zeroshot_scores: np.ndarray | None = None, seed: int = 0, power_norm: bool = False,
                      torch_config: TorchProbeConfig | None = None,
                      train_views: Sequence[np.ndarray] | None = None) -> dict:
    """Fit the chosen probes and score them beside zero-shot on the same test images (``train_views``: see
    :func:`fit_logistic_probe`; logistic only)."""
    from cliplab.eval.classification import classification_metrics

    if train_views and "torch" in methods:
        raise ConfigError("training on several views of each image is implemented for the logistic probe only")
    out = {}
    for method in methods:
        if method == "logistic":
            fit = fit_logistic_probe(train_features, train_labels, seed=seed, power_norm=power_norm,
                                     train_views=train_views)
        elif method == "torch":
            fit = fit_torch_probe(train_features, train_labels,
                                  torch_config or TorchProbeConfig(seed=seed, power_norm=power_norm))
        else:
            raise ConfigError(f"probe method must be logistic or torch, not {method!r}")
        out[f"probe:{method}"] = {**classification_metrics(test_labels, fit.scores(test_features), class_names),
                                  "fit": fit.summary()}
    if zeroshot_scores is not None:
        out["zeroshot"] = classification_metrics(test_labels, zeroshot_scores, class_names)
    return out
