"""Small synthetic data made on the fly: coloured-shape images and captions naming them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square")


def make_image(path: Path, colour: str, shape: str, size: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(200, 255, 3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    m = size // 6 + int(rng.integers(0, 4))
    box = (m, m, size - m, size - m)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    im.save(path, quality=95)


@pytest.fixture(scope="session")
def caption_dir(tmp_path_factory) -> Path:
    """A folder ``images/`` + ``captions.csv`` (image,caption) with 16 images, 2-3 captions each."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    rows = []
    i = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for rep in range(2):
                name = f"img{i:02d}.jpg"
                make_image(root / "images" / name, colour, shape, seed=i)
                rows.append((f"images/{name}", f"a {colour} {shape}"))
                rows.append((f"images/{name}", f"a picture of a {colour} {shape} on a light background"))
                if i % 2:
                    rows.append((f"images/{name}", f"{shape} coloured {colour}"))
                i += 1
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return root


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
