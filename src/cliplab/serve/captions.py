"""Captions written at index time (``cliplab index PHOTOS --captioner RUN``): one generated caption per photo,
stored in the index, shown with each result and searched as words (keyword and hybrid modes).

Decoding is greedy (:meth:`~cliplab.caption.model.Captioner.greedy`: batched, ended captions leave the
batch). Captions are keyed by the photo's content hash and the captioner: a photo seen before (same bytes,
same captioner) is never captioned again, whatever its name. While a build runs, each finished chunk's
captions are appended to ``cliplab-work/captions-<captioner>.jsonl`` (flushed and fsynced), so a killed
build resumes with them, like the embeddings; the visual tokens of the chunk being captioned pass through
``cliplab-work/captions-tokens/`` (removed with the work folder).

Precision (``--caption-precision``): on CPU, ``auto`` decodes with int8 linear layers
(:mod:`cliplab.caption.quantize`: SmoothQuant scales, then int8 with each token's activations at its own
scale; ~1.3x the images/s; Flickr8k test CIDEr-D 16.2 vs 17.1, see BENCHMARKS.md) when it can be calibrated:
greedy decoding of the caption run's first :data:`CALIBRATION_IMAGES` training images records the activation
maxima, once per captioner, kept in ``default_cache_dir()/caption-int8/`` (later builds need neither the images
nor the time).
Otherwise, on a GPU and for LMs it does not know, float32. The precision is part of the captioner's identity,
so captions written in one are never reused by the other; all happens before any photo is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cliplab import rundir
from cliplab.errors import CliplabError, ConfigError
from cliplab.embed.cache import FeatureCache
from cliplab.utils import atomic_write, default_cache_dir, fsync_dir, sha256_file, sha256_text

# greedy decoding, as ``cliplab caption generate --beam 1``: part of the captioner's identity in an index
DECODE = {"beam": 1, "max_new_tokens": 30, "no_repeat_ngram": 3}
SCRATCH = "captions-tokens"  # visual tokens of the chunk being captioned, in the work folder
NO_CAPTIONER = "none"  # ``--captioner none``: stop captioning (the index's captions are dropped)
PRECISIONS = ("auto", "float32", "int8")
CALIBRATION_IMAGES = 128  # the caption run's first training images, for int8's activation maxima


def captioner_folder(run: str | Path) -> Path:
    """The folder holding a caption run's selected captioner (:meth:`Captioner.folder`), named as ``--captioner``."""
    from cliplab.caption.model import Captioner

    try:
        return Captioner.folder(run)
    except ConfigError:
        raise ConfigError(f"--captioner {run}: not a caption run (no {rundir.CAPTIONER_CONFIG} and "
                          f"{rundir.CAPTIONER_WEIGHTS}); train one with `cliplab caption train`") from None


def captioner_id(run: str | Path, precision: str = "float32") -> str:
    """What a stored caption depends on: the captioner's config and tuned weights, the decoding and the
    precision (int8: with its smoothing and calibration)."""
    from cliplab.caption.quantize import SMOOTHING_ALPHA

    folder = captioner_folder(run)
    decode = dict(DECODE)
    if precision == "int8":  # float32 ids stay those of indexes written before int8 existed
        import torch

        decode["int8"] = {"scheme": "smoothquant-per-token-v2", "alpha": SMOOTHING_ALPHA,
                          "calibration": f"train:{CALIBRATION_IMAGES}", "engine": torch.backends.quantized.engine}
    return sha256_text((folder / rundir.CAPTIONER_CONFIG).read_text(encoding="utf-8"),
                       sha256_file(folder / rundir.CAPTIONER_WEIGHTS), json.dumps(decode, sort_keys=True))


def calibration_images(run: str | Path) -> list[Path]:
    """The first :data:`CALIBRATION_IMAGES` training images of the caption run behind ``--captioner`` (from its
    ``config.json``); a one-line ConfigError when the run has no config or they cannot be read."""
    from cliplab.caption.train import CaptionRunConfig
    from cliplab.data.captions import load_caption_dataset

    folder = captioner_folder(run)
    config_path = next((p / rundir.CONFIG for p in (folder, folder.parent) if (p / rundir.CONFIG).is_file()), None)
    if config_path is None:
        raise ConfigError(f"--captioner {run}: no caption run config.json beside it, so no training images to "
                          "calibrate int8 decoding with")
    data = CaptionRunConfig.from_run(config_path.parent).data
    try:
        ds = load_caption_dataset(data.path, data.train_split, image_root=data.image_root, on_error="raise")
    except (OSError, ValueError, CliplabError) as exc:
        raise ConfigError(f"--captioner {run}: its training data {data.path} cannot be read for int8 calibration "
                          f"({exc})") from None
    paths = ds.image_paths()[:CALIBRATION_IMAGES]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise ConfigError(f"--captioner {run}: its training images are not here for int8 calibration "
                          f"({missing[0] if missing else data.path})")
    return paths


class PhotoCaptioner:
    """A trained captioner over photo files: ``captions(paths, keys, journal)`` -> key -> caption. Decoding runs
    ``batch_size`` photos at a time (on a 2-core CPU 512 decodes ~1.5x as many images/s as 64: bigger matrix
    products; see ``bench/index_captions.py``); LoRA adapters are folded into the LM (the same captions).
    ``precision``: see the module docstring; :attr:`precision` is the one used."""

    def __init__(self, run: str | Path, device: str = "cpu", batch_size: int = 512, precision: str = "auto",
                 log: Callable[[str], None] = print) -> None:
        from cliplab.caption.model import Captioner
        from cliplab.caption.visual import caption_image_tower, tower_weights_id

        if precision not in PRECISIONS:
            raise ConfigError(f"caption precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.run = Path(run).resolve()
        self.model = Captioner.load(self.run).to(device).eval().merge_for_inference()
        self.tower = caption_image_tower(self.model.config.image, self.model.config.image_model)
        if self.model.image_weights and tower_weights_id(self.tower) != self.model.image_weights:
            raise ConfigError(f"--captioner {run}: its image tower now has other weights than the captioner was "
                              "trained with")
        self.device, self.batch_size = device, batch_size
        self.precision = "float32"
        if precision != "float32":
            self._try_int8(run, precision == "int8", log)
        self.id = captioner_id(self.run, self.precision)

    def _try_int8(self, run: str | Path, required: bool, log: Callable[[str], None]) -> None:
        """Switch to int8 decoding now, before any photo is read (the calibration maxima from the cache, else
        measured once on the run's training images); ``required`` (int8 asked for): a failure is a one-line
        error, else (auto) the captions stay float32, said in one log line."""
        from cliplab.caption.model import Captioner
        from cliplab.caption.quantize import check_int8_kernels, quantize_int8, smoothable

        touched = False
        try:
            if str(self.device) != "cpu" or not smoothable(self.model.lm):
                raise ConfigError(f"--caption-precision int8 needs the CPU and a Llama-style LM "
                                  f"(device {self.device}, {type(self.model.lm).__name__})")
            check_int8_kernels()  # before the calibration: no time spent or file kept where int8 cannot run
            maxima = self._maxima(captioner_id(self.run, "int8"), run)
            touched = True
            quantize_int8(self.model, maxima)
            self.precision = "int8"
        except ConfigError as exc:
            if required:
                raise
            log(f"captions in float32: {exc}")
            if touched:  # the smoothing may have begun: a clean float LM
                self.model = Captioner.load(self.run).to(self.device).eval().merge_for_inference()

    def _maxima(self, int8_id: str, run: str | Path) -> dict:
        """The calibration activation maxima: from the cache (keyed by the int8 captioner id), else by greedy
        decoding of the run's first training images (:func:`calibration_images`; kept in the cache after)."""
        import tempfile

        import safetensors.torch
        import torch

        from cliplab.caption.quantize import activation_maxima, maxima_keys
        from cliplab.caption.visual import visual_features
        from cliplab.data.images import ImageFiles

        path = default_cache_dir() / "caption-int8" / f"{int8_id[:32]}.safetensors"
        want = maxima_keys(self.model.lm)
        try:
            kept = safetensors.torch.load(path.read_bytes())
            if set(kept) != want or not all(v.ndim == 1 and bool(torch.isfinite(v).all()) for v in kept.values()):
                raise ValueError("not this captioner's calibration")
            return kept
        except FileNotFoundError:
            pass
        except Exception as exc:  # damaged or foreign: computed again, the file left alone
            import warnings

            warnings.warn(f"{path}: {exc}; calibrating again", stacklevel=2)
            path = None
        images = calibration_images(run)
        try:
            with tempfile.TemporaryDirectory(prefix="cliplab-calibration-") as tmp:
                feats = visual_features(self.tower, ImageFiles(images), self.model.config.grid,
                                        cache=FeatureCache(tmp), device=self.device, progress=False)
            grid = torch.from_numpy(np.ascontiguousarray(feats.grid, dtype=np.float32))
            pooled = torch.from_numpy(np.ascontiguousarray(feats.pooled, dtype=np.float32))
            maxima = activation_maxima(self.model, grid, pooled, max_new_tokens=DECODE["max_new_tokens"])
        except Exception as exc:  # an unreadable training image, non-finite activations: one line, before work
            raise ConfigError(f"--captioner {run}: int8 calibration on its training images failed: {exc}") from None
        if path is not None:
            data = safetensors.torch.save(maxima, metadata={"captioner_id": int8_id, "images": str(len(images))})
            try:
                atomic_write(path, lambda tmp: tmp.write_bytes(data))
            except OSError as exc:
                import warnings

                warnings.warn(f"could not keep the int8 calibration in {path}: {exc}", stacklevel=2)
        return maxima

    def captions(self, paths: Sequence[Path], keys: Sequence[str], journal: Path, *, max_pixels: int,
                 formats: tuple[str, ...], progress: bool = True, chunk: int = 512,
                 log: Callable[[str], None] = print) -> dict[str, str]:
        """key -> caption of each photo (``keys``: content hashes; a repeated key is captioned once). Captions
        in ``journal`` (an interrupted build's) are reused; new ones are appended to it chunk by chunk. A photo
        that cannot be read now gets no caption."""
        from tqdm.auto import tqdm

        done = read_journal(journal)
        todo: dict[str, Path] = {}
        for path, key in zip(paths, keys):
            if key not in done:
                todo.setdefault(key, Path(path))
        found = {k: done[k] for k in keys if k in done}
        if done and todo:
            log(f"captions: {len(found)} from the interrupted build, {len(todo)} to write")
        items = list(todo.items())
        bar = tqdm(total=len(items), desc="captioning photos", unit="img", disable=not progress or not items,
                   dynamic_ncols=True)
        scratch = FeatureCache(Path(journal).parent / SCRATCH)  # inside the build's marked work folder
        for s in range(0, len(items), chunk):
            part = items[s:s + chunk]
            new = self._caption_files([p for _, p in part], max_pixels, formats, scratch)
            written = {key: new[i] for i, (key, _) in enumerate(part) if i in new}
            append_journal(journal, written)
            found.update(written)
            bar.update(len(part))
        bar.close()
        return found

    def _caption_files(self, paths: list[Path], max_pixels: int, formats: tuple[str, ...],
                       scratch: FeatureCache) -> dict[int, str]:
        """position -> caption for the readable ones of ``paths`` (visual tokens in one tower pass, then greedy).
        The tokens pass through ``scratch`` and are dropped after (its ONNX export is kept for the next call)."""
        import torch

        from cliplab.caption.visual import visual_features
        from cliplab.data.images import ImageFiles

        try:
            feats = visual_features(self.tower, ImageFiles(paths, max_pixels=max_pixels, formats=formats),
                                    self.model.config.grid, cache=scratch, device=self.device, progress=False,
                                    on_error="skip")
        finally:
            for entry in scratch.root.glob("image-*"):  # this chunk's tokens: needed once
                shutil.rmtree(entry, ignore_errors=True)
        good = np.flatnonzero(feats.valid)
        out: dict[int, str] = {}
        for s in range(0, len(good), self.batch_size):
            rows = good[s:s + self.batch_size]
            grid = torch.from_numpy(np.ascontiguousarray(feats.grid[rows], dtype=np.float32)).to(self.device)
            pooled = torch.from_numpy(np.ascontiguousarray(feats.pooled[rows], dtype=np.float32)).to(self.device)
            ids = self.model.generate(grid, pooled, **DECODE)  # greedy (batched, see Captioner.greedy)
            out.update({int(r): self.model.decode(x) for r, x in zip(rows, ids)})
        return out


def read_journal(path: Path) -> dict[str, str]:
    """key -> caption from a captions journal (a torn last line, from a killed build, is ignored)."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
            out[str(record["key"])] = str(record["caption"])
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            continue
    return out


def append_journal(path: Path, captions: dict[str, str]) -> None:
    """Append captions to the journal, durably (flush + fsync) before the build goes on."""
    if not captions:
        return
    text = "".join(json.dumps({"key": k, "caption": v}) + "\n" for k, v in captions.items())  # ASCII only
    new = not Path(path).exists()
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # after a torn last line (a killed build), start a new one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(Path(path).parent)
