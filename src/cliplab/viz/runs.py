"""The figures of each kind of run, written to ``RUN_DIR/plots/`` (``--plots`` on train, eval, zeroshot, probe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cliplab.data.captions import CaptionDataset
from cliplab.rundir import CONFIG, CURVES, best_epoch, plot_file, read_csv_rows, read_json, read_metrics
from cliplab.viz.classification import confusion_matrix_plot, top5_bars
from cliplab.viz.curves import recall_at_k, sweep_overlay, training_curves
from cliplab.viz.galleries import image_to_text_gallery, text_to_image_gallery
from cliplab.viz.maps import class_map, modality_map


def run_selection(run_dir: str | Path) -> tuple[str, str] | None:
    """The dev metric that selects a training run's best epoch and its direction (``max`` / ``min``), from the
    run's recorded config and its evaluator; None when the evaluator is not registered in this process."""
    from cliplab.errors import ConfigError
    from cliplab.eval.evaluators import CaptionEvaluator, evaluator_class

    path = Path(run_dir) / CONFIG
    config = read_json(path) if path.is_file() else {}
    train = config.get("train", {})
    try:
        evaluator = CaptionEvaluator if config.get("kind") == "caption" else \
            evaluator_class(train.get("evaluator", "retrieval"))
        metric = train.get("select_metric") or evaluator.primary_metric
        return metric, evaluator.direction(metric)
    except ConfigError:
        return None


def plot_training(run_dir: str | Path) -> list[Path]:
    """Loss and dev/test R@1 per epoch from the run's metrics; the dev-selected epoch marked."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    metric, direction = run_selection(run_dir) or ("", "max")
    return [training_curves(rows, plot_file(run_dir, "curves"), title=f"training: {run_dir.name}",
                            best_epoch=best_epoch(run_dir), select_metric=metric, direction=direction)]


def plot_retrieval(out_dir: str | Path, dataset: CaptionDataset, spaces: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   *, map_methods: tuple[str, ...] = ("tsne", "pca"), max_map_images: int = 200,
                   seed: int = 0) -> list[Path]:
    """Recall@K curves of every model; embedding maps of every space (first = before, last = after
    training); galleries (best successes, worst failures) of the last model."""
    from cliplab.eval.retrieval import retrieval_ranks

    ranks = {name: retrieval_ranks(img, txt, dataset.caption_image) for name, (img, txt) in spaces.items()}
    out = [recall_at_k(ranks, plot_file(out_dir, "recall_at_k"), title=f"Recall@K: {dataset.name}")]
    np_spaces = {name: (np.asarray(img, dtype=np.float32), np.asarray(txt, dtype=np.float32))
                 for name, (img, txt) in spaces.items()}
    for method in map_methods:
        out.append(modality_map(np_spaces, dataset.caption_image, plot_file(out_dir, "map_{}", method), method=method,
                                max_images=max_map_images, seed=seed))
    name = list(spaces)[-1]
    img, txt = spaces[name]
    out.append(image_to_text_gallery(dataset, img, txt, plot_file(out_dir, "gallery_i2t"), title=f"image → text ({name})"))
    out.append(text_to_image_gallery(dataset, img, txt, plot_file(out_dir, "gallery_t2i"), title=f"text → image ({name})"))
    return out


def plot_zeroshot(out_dir: str | Path, result: dict, images=None, labels=None) -> list[Path]:
    """Confusion matrix of the best prompt variant and top-5 bars of the chosen images."""
    best_key = max(result["results"], key=lambda k: result["results"][k]["accuracy"])
    best = result["results"][best_key]
    out = [confusion_matrix_plot(np.array(best["confusion"]), best["class_names"], plot_file(out_dir, "confusion_{}", "zeroshot"),
                                 title=f"zero-shot, {best_key}")]
    if images is not None and result.get("top5"):
        names = best["class_names"]
        picks = result["top5"]["images"]
        probs = np.zeros((len(picks), len(names)))
        for r, item in enumerate(picks):
            for c, p in zip(item["classes"], item["probabilities"]):
                probs[r, names.index(c)] = p
        shown = [images.load(item["index"]) for item in picks]
        truth = [int(labels[item["index"]]) for item in picks] if labels is not None else None
        out.append(top5_bars(shown, probs, names, plot_file(out_dir, "zeroshot_top5"), truth,
                             title=f"zero-shot top-5 ({result['top5']['variant']})"))
    return out


def plot_probe(out_dir: str | Path, summary: dict, test_features: np.ndarray | None = None,
               test_labels: np.ndarray | None = None, seed: int = 0) -> list[Path]:
    """Confusion matrices of each probe and of zero-shot; a t-SNE of the test features by class."""
    out = []
    for name, r in summary["results"].items():
        out.append(confusion_matrix_plot(np.array(r["confusion"]), r["class_names"],
                                         plot_file(out_dir, "confusion_{}", name.replace(":", "_")), title=name))
    if test_features is not None and test_labels is not None:
        names = next(iter(summary["results"].values()))["class_names"]
        out.append(class_map(test_features, test_labels, names, plot_file(out_dir, "map_classes_tsne"), seed=seed))
    return out


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """Overlays of every run's train loss and dev/test R@1 from the sweep's curves."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / CURVES
    if not path.is_file():
        return []
    curves: dict[str, list[dict]] = {}
    for row in read_csv_rows(path):
        curves.setdefault(row["run"], []).append({**row, "epoch": int(row["epoch"])})
    return [sweep_overlay(curves, plot_file(sweep_dir, "overlay_{}", m), metric=m, title=f"sweep: {m}")
            for m in ("dev_t2i_r1", "test_t2i_r1", "test_i2t_r1")
            if all(r.get(m) not in (None, "") for rows in curves.values() for r in rows)]
