"""Figures of an evaluated captioner: attention maps per word and best/worst galleries (``--plots``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cliplab.data.images import load_rgb
from cliplab.rundir import PLOTS


def words_and_maps(model, grid: np.ndarray, pooled: np.ndarray, caption: str, device,
                   layers: list[int] | None = None) -> tuple[list[str], np.ndarray]:
    """Words of ``caption`` and each word's attention over the visual grid (sub-word tokens averaged)."""
    ids = model.tokenizer(caption, add_special_tokens=False)["input_ids"]
    if not ids:
        return [], np.zeros((0, model.config.grid, model.config.grid))
    maps = model.attention(torch.from_numpy(grid[None]).float().to(device),
                           torch.from_numpy(pooled[None]).float().to(device), ids, layers).numpy()
    words, groups = [], []
    previous = ""
    for i in range(len(ids)):  # a word starts where the decoded text grows by a space (any tokenizer)
        text = model.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        piece, previous = text[len(previous):], text
        if not words or piece[:1].isspace():
            words.append(piece.strip())
            groups.append([i])
        else:
            words[-1] += piece.strip()
            groups[-1].append(i)
    keep = [k for k, w in enumerate(words) if w]
    return [words[k] for k in keep], np.stack([maps[groups[k]].mean(0) for k in keep])


def caption_figures(run_dir: Path, model, split, result: dict, device, n_attention: int = 4,
                    n_gallery: int = 4) -> list[Path]:
    from cliplab.viz.captions import attention_figure, caption_gallery

    plots = Path(run_dir) / PLOTS
    entries = result["captions"]
    order = sorted(range(len(entries)), key=lambda i: -entries[i]["cider"])
    best = [dict(entries[i], kind="best") for i in order[:n_gallery]]
    worst = [dict(entries[i], kind="worst") for i in order[::-1][:n_gallery]]
    root = split.dataset.image_root
    out = [caption_gallery(best + worst, lambda name: load_rgb(root / name), plots / "caption_gallery.png",
                           title=f"best and worst captions by CIDEr-D ({result['split']})")]
    index = {name: i for i, name in enumerate(split.dataset.images)}
    for k, e in enumerate(best[: n_attention // 2] + worst[: n_attention - n_attention // 2]):
        i = index[e["image"]]
        words, maps = words_and_maps(model, split.grid[i], split.pooled[i], e["generated"], device)
        out.append(attention_figure(load_rgb(root / e["image"]), words, maps, plots / f"attention_{k}.png",
                                    title=f"{e['image']}: {e['generated']}"))
    return out
