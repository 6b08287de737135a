"""Embedding maps: t-SNE / PCA / UMAP of image and caption embeddings together, or of labelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cliplab.errors import ConfigError
from cliplab.viz.figures import MODALITY_COLOURS, new_figure, save_figure, save_json


def reduce_2d(x: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates of the rows of ``x`` by ``tsne`` or ``pca`` (scikit-learn) or ``umap`` (umap-learn)."""
    x = np.asarray(x, dtype=np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) / 3)))
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("method 'umap' needs the umap-learn package (pip install umap-learn)") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ConfigError(f"map method must be tsne, pca or umap, not {method!r}")


def _sample_pairs(caption_image: np.ndarray, max_images: int, seed: int):
    """Up to ``max_images`` images, each with one of its captions."""
    rng = np.random.default_rng(seed)
    owners = np.asarray(caption_image)
    candidates = np.unique(owners)
    images = np.sort(rng.choice(candidates, size=min(max_images, len(candidates)), replace=False))
    captions = np.array([rng.choice(np.flatnonzero(owners == i)) for i in images])
    return images, captions


def modality_map(spaces: dict[str, tuple[np.ndarray, np.ndarray]], caption_image: np.ndarray, out: str | Path,
                 method: str = "tsne", max_images: int = 200, seed: int = 0, title: str | None = None) -> Path:
    """Images and captions of each model's space in one panel per model (e.g. before vs after training),
    coloured by modality, matched pairs joined by a line. The same images and captions in every panel."""
    out = Path(out)
    images, captions = _sample_pairs(caption_image, max_images, seed)
    fig = new_figure(600 * len(spaces), 600)
    data = {"method": method, "images": images.tolist(), "captions": captions.tolist(), "panels": {}}
    for k, (name, (img, txt)) in enumerate(spaces.items(), 1):
        xy = reduce_2d(np.concatenate([np.asarray(img)[images], np.asarray(txt)[captions]]), method, seed)
        pi, pt = xy[: len(images)], xy[len(images):]
        ax = fig.add_subplot(1, len(spaces), k)
        for a, b in zip(pi, pt):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="grey", lw=0.4, alpha=0.5)
        ax.scatter(pi[:, 0], pi[:, 1], s=12, c=MODALITY_COLOURS["image"], label="image")
        ax.scatter(pt[:, 0], pt[:, 1], s=12, c=MODALITY_COLOURS["caption"], marker="x", label="caption")
        # matched-pair distance relative to the distance between random image-caption pairs (scale-free)
        shuffled = pt[np.random.default_rng(seed).permutation(len(pt))]
        gap = float(np.linalg.norm(pi - pt, axis=1).mean() / max(np.linalg.norm(pi - shuffled, axis=1).mean(), 1e-9))
        ax.set_title(f"{name}\nmatched / random pair distance {gap:.2f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="upper right")
        data["panels"][name] = {"image_xy": pi.round(4).tolist(), "caption_xy": pt.round(4).tolist(),
                                "pair_distance_ratio": gap}
    fig.suptitle(title or f"{method.upper()} of image and caption embeddings ({len(images)} pairs)")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.85, bottom=0.03, wspace=0.05)
    save_json(data, out.with_suffix(".json"))
    return save_figure(fig, out)


def class_map(features: np.ndarray, labels: np.ndarray, class_names: list[str], out: str | Path,
              method: str = "tsne", max_points: int = 1000, seed: int = 0, title: str | None = None) -> Path:
    """Labelled images in 2-D, coloured by class."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    idx = np.sort(rng.choice(len(labels), size=min(max_points, len(labels)), replace=False))
    xy = reduce_2d(np.asarray(features)[idx], method, seed)
    fig = new_figure(800, 700)
    ax = fig.add_subplot(111)
    cmap = __import__("matplotlib").colormaps["tab20" if len(class_names) > 10 else "tab10"]
    for c, name in enumerate(class_names):
        sel = labels[idx] == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(c % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(class_names) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(title or f"{method.upper()} of image features by class ({len(idx)} images)")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.94, bottom=0.02)
    save_json({"method": method, "index": idx.tolist(), "label": labels[idx].tolist(), "xy": xy.round(4).tolist(),
               "class_names": list(class_names)}, out.with_suffix(".json"))
    return save_figure(fig, out)
