"""Captions for image files (``cliplab caption generate``): a trained captioner over any images on disk.

The visual tokens come from the same feature cache as training and evaluation (keyed by the image tower and
the file), so captioning a folder twice embeds it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cliplab import rundir
from cliplab.caption.model import Captioner
from cliplab.caption.train import CaptionRunConfig, CaptionSplit, DecodeConfig, generate_captions, load_split
from cliplab.caption.visual import caption_image_tower, tower_weights_id, visual_features
from cliplab.data.captions import CaptionDataset
from cliplab.data.images import ImageFiles, load_rgb
from cliplab.embed.cache import FeatureCache
from cliplab.errors import ConfigError
from cliplab.utils import resolve_device


def check_image_files(images: Sequence[str | Path]) -> list[Path]:
    """The files as paths; a missing or undecodable one is a one-line error naming it (before any model loads)."""
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"image not found: {p}")
        load_rgb(p)
    return paths


def caption_files(run: str | Path, images: Sequence[str | Path], *, beam: int = 3, max_new_tokens: int = 30,
                  rerank_k: int = 0, device="auto", cache_dir: str | Path | None = None,
                  progress: bool = False) -> dict[str, str]:
    """image path (as given) -> one generated caption, by the captioner in ``run`` (a caption run folder or its
    ``best/``); ``rerank_k`` > 0 re-ranks the beam's candidates against the captions of the ``rerank_k`` most
    similar training images of the run (consensus re-ranking; needs the run folder)."""
    if beam < 1:
        raise ConfigError("--beam must be >= 1")
    if rerank_k < 0:
        raise ConfigError("--rerank-k must be >= 0")
    paths = check_image_files(images)
    run, dev = Path(run), resolve_device(device)
    model = Captioner.load(run).to(dev)
    tower = caption_image_tower(model.config.image, model.config.image_model)
    if model.image_weights and tower_weights_id(tower) != model.image_weights:
        raise ConfigError(f"{run}: its image tower ({model.config.image_model or model.config.image['arch']}) now "
                          "has other weights than the captioner was trained with")
    cache = FeatureCache(cache_dir)
    feats = visual_features(tower, ImageFiles(paths), model.config.grid, cache=cache, device=dev, progress=progress,
                            desc="images")
    files = CaptionDataset(Path.cwd(), [str(p) for p in paths], [], np.zeros(0, dtype=np.int64), name="files")
    train = _training_split(run, tower, dev) if rerank_k else None
    return generate_captions(model, CaptionSplit(files, feats.grid, feats.pooled, tower_weights_id(tower)),
                             DecodeConfig(beam=beam, max_new_tokens=max_new_tokens, rerank_k=rerank_k), dev,
                             train=train, progress=progress)


def _training_split(run: Path, tower, device) -> CaptionSplit:
    """The run's training split (features cached, or in its bundle): the consensus for re-ranking."""
    run_dir = run.parent if run.name == rundir.BEST else run
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(f"--rerank-k needs the run folder (with {rundir.CONFIG}), not {run}")
    cfg = CaptionRunConfig.from_run(run_dir)
    return load_split(cfg, cfg.data.train_split, FeatureCache(cfg.data.cache_dir), device, progress=False,
                      image_tower=tower)
