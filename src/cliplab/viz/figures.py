"""Shared plotting helpers: headless matplotlib, fixed pixel sizes, atomic PNG + data files."""

from __future__ import annotations

import contextlib
import csv
import io
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from cliplab.extras import require

matplotlib = require("matplotlib")

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend; everything else is headless
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from cliplab.utils import atomic_write, write_json, write_text  # noqa: E402

DPI = 100
MODALITY_COLOURS = {"image": "#1f77b4", "caption": "#ff7f0e"}


def new_figure(width_px: int, height_px: int, **kwargs):
    """A figure of exactly ``width_px`` x ``height_px`` pixels once saved."""
    return plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, **kwargs)


_captured = threading.local()


@contextlib.contextmanager
def capture_figures() -> Iterator[list]:
    """Collect the figures saved inside the block (the notebook API returns them; the files are written too).
    They are closed for pyplot, so a notebook shows each once, where it is returned."""
    previous = getattr(_captured, "figures", None)
    _captured.figures = figures = []
    try:
        yield figures
    finally:
        _captured.figures = previous


def save_figure(fig, path: str | Path) -> Path:
    """Write a PNG atomically (fixed size: no tight bounding box) and close the figure."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    if getattr(_captured, "figures", None) is not None:
        _captured.figures.append(fig)
    atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))
    return path


def save_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The data behind a figure as CSV."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def save_json(obj: Any, path: str | Path) -> Path:
    return write_json(path, obj)


def shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
