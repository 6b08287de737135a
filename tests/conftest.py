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
def labelled_splits(tmp_path) -> Path:
    """Class-per-folder train/test trees of coloured shapes (one class per colour)."""
    root = tmp_path / "shapes"
    for split, n in (("train", 5), ("test", 3)):
        for c in COLOURS:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                make_image(root / split / c / f"{i}.jpg", c, "circle" if i % 2 else "square", seed=i + 10 * n)
    return root


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def tiny_open_clip(tmp_path: Path):
    """A small random open_clip CLIP saved in open_clip's hub layout; returns (model, tokenizer, folder)."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    out = tmp_path / "oc"  # the layout open_clip publishes on the HF hub
    out.mkdir()
    save_file(model.state_dict(), str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}))
    return model, tokenizer, out




def tiny_hf_clip(tmp_path: Path, tokenizer):
    """A small random Hugging Face CLIPModel saved with ``tokenizer``; returns (model, folder)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "max_position_embeddings": 32,
                                  "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},
                     vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2},
                     projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    out = tmp_path / "hf"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, out
