"""Shared fixtures: the real offline towers (loaded once per test run), small synthetic data made on the
fly (coloured-shape images and captions naming them), and the CLI run in-process."""

from __future__ import annotations

import copy
import csv
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def pytest_unconfigure(config):
    """Freeze the objects the run leaves behind so the interpreter's exit does not garbage-collect ~850k of
    them one last time (measured 4.5-6 s of the quick tier's wall time; results and reports are already out)."""
    import gc

    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """One feature cache folder for the whole run, never the user's ``~/.cache/cliplab`` (tests that need
    their own set ``$CLIPLAB_CACHE`` again)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPLAB_CACHE", str(tmp_path_factory.mktemp("cliplab-cache")))
        yield


@pytest.fixture(scope="session")
def towers():
    """The offline default towers, loaded once per test run. Shared: tests that change a tower (adapters,
    trainable flags) take :func:`fresh_towers` instead."""
    from cliplab.models import ImageTower, TextTower

    return ImageTower(), TextTower()


@pytest.fixture()
def fresh_towers(towers):
    """Private copies of the default towers (no disk load)."""
    return copy.deepcopy(towers[0]), copy.deepcopy(towers[1])



@pytest.fixture(scope="session")
def caption_dir(tmp_path_factory) -> Path:
    """A folder ``images/`` + ``captions.csv`` (image,caption,split) with 16 images, 2-3 captions each:
    8 train, 4 dev, 4 test images; every colour-shape pair has a training image."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    rows = []
    i = 0
    for c, colour in enumerate(COLOURS):
        for shape in SHAPES:
            for rep in range(2):
                name = f"img{i:02d}.jpg"
                split = "train" if rep == 0 else ("dev" if c % 2 == 0 else "test")
                make_image(root / "images" / name, colour, shape, seed=i)
                rows.append((f"images/{name}", f"a {colour} {shape}", split))
                rows.append((f"images/{name}", f"a picture of a {colour} {shape} on a light background", split))
                if i % 2:
                    rows.append((f"images/{name}", f"{shape} coloured {colour}", split))
                i += 1
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        w.writerows(rows)
    return root


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def cli(capsys, monkeypatch, tmp_path):
    """Run ``cliplab ARGS...`` in this process (models load fast from the warm import state); returns an
    object with ``returncode``, ``stdout``, ``stderr``. ``cache=`` sets ``$CLIPLAB_CACHE``."""
    from cliplab.cli import main

    def run(*args, cache: Path | None = None, cwd: Path | None = None) -> CliResult:
        monkeypatch.setenv("CLIPLAB_CACHE", str(cache or tmp_path / "cache"))
        monkeypatch.chdir(cwd or tmp_path)
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


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


def tiny_causal_lm(tmp_path: Path, tokenizer):
    """A small random Llama-style causal LM saved with ``tokenizer`` (given EOS/PAD): the decoder of the
    captioning tests (no LM weights exist offline besides the packaged GGUF, too slow for unit tests)."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(tokenizer)
    tok.eos_token, tok.pad_token = "[SEP]", "[PAD]"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path / "tiny-lm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chromium_path():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CLIPLAB_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium not installed (make test installs Debian's chromium)")
        pytest.skip("chromium not installed; `make test` installs it")
    return path


def open_page(playwright, width: int, height: int, errors: list):
    """Debian's Chromium headless (the flags this closed network needs) and a page whose console errors and
    page errors land in ``errors``; returns ``(browser, page)``."""
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"])
    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return browser, page


@contextmanager
def live_server(app):
    """The app under uvicorn on 127.0.0.1 with the limits `cliplab serve` uses."""
    import socket
    import threading
    import time

    import uvicorn

    from cliplab.serve.app import uvicorn_limits

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_limits()))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
