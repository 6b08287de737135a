"""Training curves (loss and recall on twin axes), sweep overlays and Recall@K curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cliplab.viz.figures import new_figure, save_figure, save_rows


def training_curves(rows: list[dict], out: str | Path, title: str = "training", best_epoch: int | None = None,
                    select_metric: str = "rsum", direction: str = "max") -> Path:
    """Train loss (left axis) and dev/test R@1 both ways (right axis; for runs without recall, such as captioners,
    the dev/test ``select_metric``) per epoch; the best dev epoch marked
    (``best_epoch``, else the epoch of the best dev ``select_metric``: the highest, or the lowest for
    ``direction="min"``, as the run's evaluator says).

    ``rows`` are the records of ``metrics.jsonl``. Writes ``out`` (PNG) and ``out`` with ``.csv``.
    """
    out = Path(out)
    epochs = [r["epoch"] for r in rows]
    data = []
    for r in rows:
        row = {"epoch": r["epoch"], "train_loss": r["train_loss"]}
        for split in ("dev", "test"):
            scores = r.get(split) if isinstance(r.get(split), dict) else {}
            row.update({f"{split}_{d}_r1": scores[f"{d}_r1"] for d in ("t2i", "i2t") if f"{d}_r1" in scores})
            if select_metric in scores:  # another evaluator's metric (e.g. a captioner's cider)
                row[f"{split}_{select_metric}"] = scores[select_metric]
        data.append(row)
    save_rows(data, out.with_suffix(".csv"))
    fig = new_figure(1000, 560)
    ax = fig.add_subplot(111)
    ax.plot(epochs, [r["train_loss"] for r in rows], color="black", marker="o", ms=3, label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    styles = {"dev": "-", "test": ":"}
    colours = {"t2i": "#1f77b4", "i2t": "#d62728"}
    recall = any(k.endswith("_r1") for row in data for k in row)
    for split in ("dev", "test"):
        for d in ("t2i", "i2t") if recall else (select_metric,):
            key = f"{split}_{d}_r1" if recall else f"{split}_{d}"
            if all(key in row for row in data) and data:
                label = f"{split} {'T→I' if d == 't2i' else 'I→T'} R@1" if recall else f"{split} {d}"
                ax2.plot(epochs, [row[key] for row in data], styles[split], color=colours.get(d, "#2ca02c"),
                         marker=".", label=label)
    if best_epoch is None and rows and all(isinstance(r.get("dev"), dict) and select_metric in r["dev"] for r in rows):
        pick = np.argmax if direction == "max" else np.argmin
        best_epoch = epochs[int(pick([r["dev"][select_metric] for r in rows]))]
    if best_epoch is not None and best_epoch >= 0:
        ax2.axvline(best_epoch, color="grey", ls="--", lw=1)
        ax2.annotate(f"best dev epoch {best_epoch}", (best_epoch, ax2.get_ylim()[0]), xytext=(4, 6),
                     textcoords="offset points", fontsize=8, color="grey")
    ax2.set_ylabel("R@1 (%)" if recall else select_metric)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper center", fontsize=8, ncol=3, framealpha=0.9)
    ax.set_title(title)
    fig.subplots_adjust(left=0.08, right=0.9, top=0.92, bottom=0.1)
    return save_figure(fig, out)


def sweep_overlay(curves: dict[str, list[dict]], out: str | Path, metric: str = "dev_t2i_r1",
                  title: str = "sweep") -> Path:
    """One line per run: train loss (left panel) and ``metric`` (right panel) per epoch.

    ``curves`` maps a run name to rows with ``epoch``, ``train_loss`` and the metric (``curves.csv`` rows).
    """
    out = Path(out)
    save_rows([{"run": name, **r} for name, rows in curves.items() for r in rows], out.with_suffix(".csv"))
    fig = new_figure(1200, 500)
    ax_loss, ax_metric = fig.add_subplot(121), fig.add_subplot(122)
    for name, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker=".", label=name)
        values = [r.get(metric) for r in rows]
        if all(v not in (None, "") for v in values):
            ax_metric.plot(epochs, [float(v) for v in values], marker=".", label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="train loss")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=metric)
    ax_metric.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.87, bottom=0.12, wspace=0.25)
    return save_figure(fig, out)


def recall_at_k(ranks: dict[str, tuple[np.ndarray, np.ndarray]], out: str | Path, max_k: int = 50,
                title: str = "Recall@K") -> Path:
    """Recall@K for K = 1..max_k, text→image and image→text, one line per model.

    ``ranks`` maps a model name to ``(t2i_ranks, i2t_ranks)`` (1 = best, as ``retrieval_ranks`` gives).
    """
    out = Path(out)
    ks = np.arange(1, max_k + 1)
    rows = []
    fig = new_figure(1200, 500)
    axes = fig.add_subplot(121), fig.add_subplot(122)
    for name, (t2i, i2t) in ranks.items():
        for ax, direction, r in ((axes[0], "t2i", t2i), (axes[1], "i2t", i2t)):
            r = np.asarray(r)
            recall = [(r <= k).mean() * 100 for k in ks]
            ax.plot(ks, recall, label=name)
            rows += [{"model": name, "direction": direction, "k": int(k), "recall": float(v)} for k, v in zip(ks, recall)]
    for ax, label in zip(axes, ("text → image", "image → text")):
        ax.set(xlabel="K", ylabel="Recall@K (%)", title=label, xlim=(1, max_k), ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.87, bottom=0.12, wspace=0.2)
    save_rows(rows, out.with_suffix(".csv"))
    return save_figure(fig, out)


def tradeoff_curve(rows: list[dict], out: str | Path, title: str = "WiSE-FT") -> Path:
    """In-domain vs out-of-domain metrics along the interpolation weight (one line per out-of-domain
    measure, points labelled by alpha)."""
    out = Path(out)
    ood = [c for c in ("ood_zeroshot_acc", "ood_t2i_r1", "ood_i2t_r1") if c in rows[0]]
    fig = new_figure(900, 600)
    ax = fig.add_subplot(1, 1, 1)
    x = [(r["in_t2i_r1"] + r["in_i2t_r1"]) / 2 for r in rows]
    labels = {"ood_zeroshot_acc": "zero-shot accuracy", "ood_t2i_r1": "2nd caption set T→I R@1",
              "ood_i2t_r1": "2nd caption set I→T R@1"}
    for c in ood:
        y = [r[c] for r in rows]
        ax.plot(x, y, marker="o", label=labels[c])
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(f"{r['alpha']:g}", (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("in-domain R@1 (mean of T→I and I→T)")
    ax.set_ylabel("out-of-domain")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    if ood:
        ax.legend(fontsize=8)
    save_rows(rows, out.with_suffix(".csv"))
    return save_figure(fig, out)
