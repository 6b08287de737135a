"""Confusion matrices and zero-shot top-5 class probabilities beside the image."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from cliplab.viz.figures import new_figure, save_figure, save_json


def confusion_matrix_plot(cm: np.ndarray, class_names: Sequence[str], out: str | Path, title: str = "confusion",
                          normalize: bool = True) -> Path:
    """Rows: true class, columns: predicted; row-normalised percentages when ``normalize``."""
    out = Path(out)
    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) * 100 if normalize else cm
    n = len(class_names)
    size = int(np.clip(60 * n + 200, 500, 1400))
    fig = new_figure(size, size)
    ax = fig.add_subplot(111)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=100 if normalize else None)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{shown[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > shown.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of true class" if normalize else "count")
    acc = np.trace(cm) / max(cm.sum(), 1) * 100
    ax.set_title(f"{title} (accuracy {acc:.1f}%)")
    fig.subplots_adjust(left=0.18, right=0.95, top=0.93, bottom=0.18)
    save_json({"class_names": list(class_names), "confusion": cm.astype(int).tolist()}, out.with_suffix(".json"))
    return save_figure(fig, out)


def top5_bars(images: Sequence[Image.Image], probs: np.ndarray, class_names: Sequence[str], out: str | Path,
              true_labels: Sequence[int] | None = None, title: str = "zero-shot top-5") -> Path:
    """One row per image: the image, and a bar chart of its 5 most probable classes (true class in green)."""
    out = Path(out)
    probs = np.asarray(probs)
    n = len(images)
    fig = new_figure(900, 180 * n + 60)
    rows = []
    for r, (img, p) in enumerate(zip(images, probs)):
        top = np.argsort(-p)[:5]
        pos = list(range(len(top)))[::-1]
        ax_img = fig.add_subplot(n, 2, 2 * r + 1)
        ax_img.imshow(img)
        ax_img.set_axis_off()
        truth = true_labels[r] if true_labels is not None else None
        if truth is not None:
            ax_img.set_title(f"true: {class_names[truth]}", fontsize=9)
        ax = fig.add_subplot(n, 2, 2 * r + 2)
        colours = ["#2ca02c" if c == truth else "#1f77b4" for c in top]
        ax.barh(pos, p[top] * 100, color=colours)
        ax.set_yticks(pos, [class_names[c] for c in top], fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("probability (%)", fontsize=8)
        rows.append({"true": class_names[truth] if truth is not None else None,
                     "top5": [{"class": class_names[c], "probability": float(p[c])} for c in top]})
    fig.suptitle(title)
    fig.subplots_adjust(left=0.02, right=0.97, top=1 - 50 / (180 * n + 60), bottom=0.05, hspace=0.5, wspace=0.35)
    save_json(rows, out.with_suffix(".json"))
    return save_figure(fig, out)
