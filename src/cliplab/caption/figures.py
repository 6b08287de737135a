"""Figures of an evaluated captioner: attention maps per word and best/worst galleries (``--plots``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cliplab.data.images import load_rgb
from cliplab.errors import ConfigError
from cliplab.rundir import plot_file


def layer_scores(per_layer: np.ndarray, mask_sink: bool = True) -> np.ndarray:
    """How informative each layer's maps ``[L, T, g, g]`` are: the share of attention on the grid (without the
    sink cell) times how much the words' renormalised maps differ from their mean (total variation)."""
    flat = per_layer.reshape(per_layer.shape[0], per_layer.shape[1], -1)[:, :, 1 if mask_sink else 0:]
    share = flat.sum(-1)
    norm = flat / np.maximum(share[..., None], 1e-12)
    specific = 0.5 * np.abs(norm - norm.mean(1, keepdims=True)).sum(-1)
    return share.mean(-1) * specific.mean(-1)


def words_and_maps(model, grid: np.ndarray, pooled: np.ndarray, caption: str, device,
                   layers: list[int] | str | None = "auto", mask_sink: bool = True
                   ) -> tuple[list[str], np.ndarray, list[int]]:
    """Words of ``caption``, each word's attention over the visual grid (sub-word tokens averaged) and the
    layers averaged.

    The first prefix position (grid cell 0, 0) is the LM's attention sink (Xiao et al. 2023): in a trained
    SmolLM2 captioner it takes 41-77% of the attention of 16 of the 30 layers whatever the image shows. With
    ``mask_sink`` that cell is NaN and each word's map is renormalised over the other cells.
    ``layers="auto"`` averages the eighth of the layers (at least one) with the best ``layer_scores``: much
    attention on the grid and maps that differ from word to word; ``None`` averages all layers."""
    ids = model.tokenizer(caption, add_special_tokens=False)["input_ids"]
    if not ids:
        return [], np.zeros((0, model.config.grid, model.config.grid)), []
    per_layer = model.attention(torch.from_numpy(grid[None]).float().to(device),
                                torch.from_numpy(pooled[None]).float().to(device), ids,
                                None if layers == "auto" else layers, per_layer=True).numpy()  # [L, T, g, g]
    if layers == "auto":
        k = max(1, len(per_layer) // 8)
        chosen = sorted(np.argsort(-layer_scores(per_layer, mask_sink), kind="stable")[:k].tolist())
        per_layer = per_layer[chosen]
    else:
        chosen = list(range(len(per_layer))) if layers is None else list(layers)
    maps = per_layer.mean(0)
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
    out = np.stack([maps[groups[k]].mean(0) for k in keep]).astype(np.float64)
    if mask_sink and out.shape[1] * out.shape[2] > 1:
        out[:, 0, 0] = np.nan
        out /= np.maximum(np.nansum(out, axis=(1, 2), keepdims=True), 1e-12)
    return [words[k] for k in keep], out, chosen


def best_and_worst(entries: list[dict], n_best: int, n_worst: int) -> tuple[list[dict], list[dict]]:
    """The ``n_best`` highest and the ``n_worst`` lowest caption entries by CIDEr-D (worst first)."""
    order = sorted(range(len(entries)), key=lambda i: -entries[i]["cider"])
    return [entries[i] for i in order[:n_best]], [entries[i] for i in order[::-1][:n_worst]]


def gallery_figure(run_dir: Path, split, result: dict, n: int = 4) -> Path:
    """The ``n`` best and ``n`` worst captions of an evaluation by CIDEr-D, with their images."""
    from cliplab.viz.captions import caption_gallery

    top, bottom = best_and_worst(result["captions"], n, n)
    best = [dict(e, kind="best") for e in top]
    worst = [dict(e, kind="worst") for e in bottom]
    root = split.dataset.image_root
    return caption_gallery(best + worst, lambda name: load_rgb(root / name), plot_file(run_dir, "caption_gallery"),
                           title=f"best and worst captions by CIDEr-D ({result['split']})")


def attention_figures(run_dir: Path, model, split, result: dict, device, n: int = 4,
                      images: list[str] | None = None) -> list[Path]:
    """Attention maps per word of the generated captions of ``images`` (names in the split; default: the
    ``n // 2`` best and the rest worst by CIDEr-D)."""
    from cliplab.viz.captions import attention_figure

    entries = result["captions"]
    if images is None:
        top, bottom = best_and_worst(entries, n // 2, n - n // 2)
        picked = top + bottom
    else:
        by_name = {e["image"]: e for e in entries}
        unknown = [name for name in images if name not in by_name]
        if unknown:
            raise ConfigError(f"not in the evaluated {result['split']} split: {', '.join(map(str, unknown[:3]))}")
        picked = [by_name[name] for name in images]
    root, index, out = split.dataset.image_root, {name: i for i, name in enumerate(split.dataset.images)}, []
    for k, e in enumerate(picked):
        i = index[e["image"]]
        words, maps, layers = words_and_maps(model, split.grid[i], split.pooled[i], e["generated"], device)
        out.append(attention_figure(load_rgb(root / e["image"]), words, maps, plot_file(run_dir, "attention_{}", str(k)),
                                    title=f"{e['image']}: {e['generated']}\nLM layers {', '.join(map(str, layers))} "
                                          "(most word-specific attention on the grid), heads averaged; grey: the first prefix "
                                          "position, the LM's attention sink, masked"))
    return out


def caption_figures(run_dir: Path, model, split, result: dict, device, n_attention: int = 4,
                    n_gallery: int = 4) -> list[Path]:
    """``--plots`` of ``cliplab caption eval``: the gallery, then attention maps of the best and worst."""
    return [gallery_figure(run_dir, split, result, n_gallery),
            *attention_figures(run_dir, model, split, result, device, n_attention)]
