"""Captioning figures: where each generated word looked (attention over the visual grid, upsampled on the
image), and galleries of images with their generated caption, references and per-image CIDEr."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from cliplab.viz.figures import new_figure, save_figure, save_json


def attention_figure(image: Image.Image, words: list[str], maps: np.ndarray, out: str | Path,
                     title: str = "") -> Path:
    """One panel per word: the image with that word's attention map (``maps [W, g, g]``) upsampled over it."""
    out = Path(out)
    n = len(words) + 1
    cols = min(6, n)
    rows = -(-n // cols)
    head = 28 + 16 * max(1, len((title or "").splitlines()))  # room for the title lines above the panels
    fig = new_figure(170 * cols, 190 * rows + head)
    img = np.asarray(image.convert("RGB").resize((224, 224)))
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(img)
    ax.set_title("image", fontsize=9)
    ax.set_axis_off()
    from matplotlib.patches import Rectangle

    maps = np.asarray(maps, dtype=np.float64)
    peak = float(np.nanmax(maps)) if maps.size and np.isfinite(maps).any() else 1.0
    for i, (word, m) in enumerate(zip(words, maps), 2):
        ax = fig.add_subplot(rows, cols, i)
        ax.imshow(img)
        masked = ~np.isfinite(m)  # cells left out of the map (e.g. an attention sink): grey, hatched
        filled = np.where(masked, np.nanmean(m) if (~masked).any() else 0.0, m)
        up = np.asarray(Image.fromarray((255 * filled / max(peak, 1e-12)).astype(np.uint8)).resize((224, 224),
                                                                                                     Image.BILINEAR))
        ax.imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=255)
        cell_h, cell_w = 224 / m.shape[0], 224 / m.shape[1]
        for r, c in zip(*np.nonzero(masked)):
            ax.add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, facecolor="0.6",
                                   edgecolor="0.3", hatch="//", alpha=0.9))
        ax.set_title(word, fontsize=10)
        ax.set_axis_off()
    fig.suptitle("\n".join(textwrap.shorten(line, 150) for line in (title or " ".join(words)).splitlines()),
                 fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (head + 8) / (190 * rows + head), wspace=0.05, hspace=0.2)
    save_json({"words": words, "maps": np.where(np.isfinite(maps), maps.round(5), None).tolist(), "title": title},
              out.with_suffix(".json"))
    return save_figure(fig, out)


def caption_gallery(entries: list[dict], load, out: str | Path, title: str = "captions") -> Path:
    """Rows of image | generated caption (+ per-image CIDEr) | references; ``entries`` carry ``image``,
    ``generated``, ``references``, ``cider`` and an optional ``kind`` (best/worst)."""
    out = Path(out)
    rows = max(1, len(entries))
    fig = new_figure(1100, 170 * rows + 50)
    grid = fig.add_gridspec(rows, 2, width_ratios=[1, 5], left=0.01, right=0.99, bottom=0.02,
                            top=1 - 40 / (170 * rows + 50), hspace=0.25, wspace=0.03)
    for r, e in enumerate(entries):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(np.asarray(load(e["image"]).convert("RGB").resize((160, 160))))
        ax.set_axis_off()
        if e.get("kind"):
            ax.set_title(e["kind"], fontsize=8, color="#2ca02c" if e["kind"] == "best" else "#d62728")
        ax = fig.add_subplot(grid[r, 1])
        ax.set_axis_off()
        ax.text(0, 0.95, f"generated: {textwrap.shorten(e['generated'], 110)}   (CIDEr-D {e['cider']:.1f})",
                fontsize=9, va="top", weight="bold", transform=ax.transAxes)
        for k, ref in enumerate(e["references"][:5]):
            ax.text(0, 0.75 - 0.16 * k, f"ref {k + 1}: {textwrap.shorten(ref, 120)}", fontsize=8, color="#444",
                    va="top", transform=ax.transAxes)
    fig.suptitle(title, y=0.995, fontsize=11)
    save_json(entries, out.with_suffix(".json"))
    return save_figure(fig, out)
