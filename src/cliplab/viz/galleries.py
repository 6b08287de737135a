"""Retrieval galleries: an image with its top-3 captions, a caption with its top-3 images; the best
successes and the worst failures are picked automatically from the ranks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from cliplab.data.captions import CaptionDataset
from cliplab.data.images import load_rgb
from cliplab.errors import DataError
from cliplab.eval.retrieval import first_correct_rank
from cliplab.viz.figures import new_figure, save_figure, save_json

OK, BAD = "#2ca02c", "#d62728"


def _thumb(path, size: int = 160):
    try:
        im = load_rgb(path, draft_size=size)
    except DataError:
        return np.full((size, size, 3), 200, dtype=np.uint8)
    im.thumbnail((size, size))
    return np.asarray(im)


def ranks_of(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Rank of the first correct item of each query row, by eval's rule (ties against the model)."""
    return first_correct_rank(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                              torch.as_tensor(np.asarray(correct, dtype=bool))).numpy()


def pick_examples(scores: np.ndarray, correct: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Best successes (a correct item at rank 1, by margin over the best wrong one) and worst failures
    (highest rank of the first correct item) among the query rows of ``scores``."""
    s = np.asarray(scores, dtype=np.float64)
    best_correct = np.where(correct, s, -np.inf).max(1)
    best_wrong = np.where(correct, -np.inf, s).max(1)
    rank = ranks_of(s, correct)
    margin = best_correct - best_wrong
    successes = [int(i) for i in np.argsort(-margin) if rank[i] == 1][:n]
    failures = [int(i) for i in np.argsort(-rank, kind="stable") if rank[i] > 1][:n]
    return successes, failures


def _gallery_queries(scores: np.ndarray, correct: np.ndarray, n: int) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The gallery rows, ``("success" | "failure", query)`` (best successes first), and every query's rank."""
    successes, failures = pick_examples(scores, correct, n)
    queries = [("success", i) for i in successes] + [("failure", i) for i in failures]
    return queries, ranks_of(scores, correct)


def image_to_text_gallery(dataset: CaptionDataset, image_emb: torch.Tensor, text_emb: torch.Tensor,
                          out: str | Path, n: int = 3, title: str = "image → text") -> Path:
    """Rows: queries (best successes, then worst failures); each an image and its top-3 captions,
    ✓ green where the caption belongs to the image."""
    out = Path(out)
    scores = (torch.as_tensor(image_emb).float() @ torch.as_tensor(text_emb).float().T).numpy()
    owner = np.asarray(dataset.caption_image)
    correct = owner[None, :] == np.arange(len(scores))[:, None]
    queries, ranks = _gallery_queries(scores, correct, n)
    paths = dataset.image_paths()
    rows_n = max(1, len(queries))
    fig = new_figure(1100, 180 * rows_n + 50)
    grid = fig.add_gridspec(rows_n, 2, width_ratios=[1, 5], left=0.01, right=0.99, bottom=0.02,
                            top=1 - 40 / (180 * rows_n + 50), hspace=0.25, wspace=0.03)
    data = []
    for r, (kind, i) in enumerate(queries):
        top = np.argsort(-scores[i])[:3]
        first_ok = int(ranks[i])
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(_thumb(paths[i]))
        ax.set_axis_off()
        ax.set_title(kind, fontsize=8, color=OK if kind == "success" else BAD)
        ax = fig.add_subplot(grid[r, 1])
        ax.set_axis_off()
        ax.text(0, 0.95, f"{Path(paths[i]).name}: first correct caption at rank {first_ok}", fontsize=8,
                color="grey", va="top", transform=ax.transAxes)
        rows = []
        for k, c in enumerate(top):
            ok = bool(correct[i, c])
            line = textwrap.shorten(dataset.captions[c], 110)
            ax.text(0, 0.72 - 0.25 * k, f"{'✓' if ok else '✗'} {k + 1}. {line}  ({scores[i, c]:.3f})", fontsize=9,
                    color=OK if ok else BAD, va="top", transform=ax.transAxes)
            rows.append({"caption": dataset.captions[c], "score": float(scores[i, c]), "correct": ok})
        data.append({"kind": kind, "image": str(paths[i]), "first_correct_rank": first_ok, "top3": rows})
    fig.suptitle(title, y=0.995, fontsize=11)
    save_json(data, out.with_suffix(".json"))
    return save_figure(fig, out)


def text_to_image_gallery(dataset: CaptionDataset, image_emb: torch.Tensor, text_emb: torch.Tensor,
                          out: str | Path, n: int = 3, title: str = "text → image") -> Path:
    """Rows: caption queries (best successes, then worst failures), each with its top-3 images; the
    matching image framed green, others red."""
    out = Path(out)
    scores = (torch.as_tensor(text_emb).float() @ torch.as_tensor(image_emb).float().T).numpy()
    owner = np.asarray(dataset.caption_image)
    correct = np.arange(scores.shape[1])[None, :] == owner[:, None]
    queries, ranks = _gallery_queries(scores, correct, n)
    paths = dataset.image_paths()
    rows_n = max(1, len(queries))
    fig = new_figure(1000, 200 * rows_n + 50)
    data = []
    for r, (kind, q) in enumerate(queries):
        top = np.argsort(-scores[q])[:3]
        rank = int(ranks[q])
        ax = fig.add_subplot(rows_n, 4, 4 * r + 1)
        ax.set_axis_off()
        ax.text(0, 0.5, textwrap.fill(dataset.captions[q], 32) + f"\n\n{kind}: correct image at rank {rank}",
                fontsize=8, va="center", color=OK if kind == "success" else BAD, transform=ax.transAxes)
        items = []
        for k, i in enumerate(top):
            ok = bool(correct[q, i])
            ax = fig.add_subplot(rows_n, 4, 4 * r + 2 + k)
            ax.imshow(_thumb(paths[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(OK if ok else BAD)
                spine.set_linewidth(4)
            ax.set_title(f"{k + 1}. {scores[q, i]:.3f}{' ✓' if ok else ''}", fontsize=8)
            items.append({"image": str(paths[i]), "score": float(scores[q, i]), "correct": ok})
        data.append({"kind": kind, "caption": dataset.captions[q], "correct_rank": rank, "top3": items})
    fig.suptitle(title, y=1 - 8 / (200 * rows_n + 50), va="top")
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 45 / (200 * rows_n + 50), bottom=0.02, hspace=0.3)
    save_json(data, out.with_suffix(".json"))
    return save_figure(fig, out)
