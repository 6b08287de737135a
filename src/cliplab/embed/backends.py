"""Inference backends for frozen towers: ONNX Runtime on CPU, torch eager (channels-last) as the fallback,
CUDA with autocast when a GPU is present.

ONNX exports are made once per tower fingerprint and kept in ``<cache>/onnx/``; the batch axis (and
the sequence axis for text) is dynamic. fp32 ONNX features match torch eager within 1e-4 (tested), so
they share cache entries with torch; dynamic int8 quantisation (never on by default) changes the
features and gets its own cache key.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cliplab.errors import ConfigError
from cliplab.utils import atomic_write, default_cache_dir, sha256_text

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


def onnxruntime_available() -> bool:
    from cliplab.extras import available

    return available("onnxruntime") and available("onnx")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: torch on CUDA (with autocast), ONNX Runtime on CPU when installed, else torch eager."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "torch" if device.type == "cuda" or not onnxruntime_available() else "onnx"
    if backend.startswith("onnx") and not onnxruntime_available():
        from cliplab.extras import require

        require("onnxruntime", f"backend {backend!r}")
        require("onnx", f"backend {backend!r}")
    return backend


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, quantize: bool,
            copy_module: bool = True) -> Path:
    """Export to ONNX atomically (and quantise dynamically to int8 if asked). ``copy_module=False`` traces the
    module itself (for wrappers that call their parts through closures, which a deep copy would not follow)."""
    if path.is_file():
        return path
    import warnings

    fp32 = path.with_name(path.name.replace("-int8", "")) if quantize else path

    def export(tmp: Path) -> None:
        # export a copy: tracing can leave the original (e.g. a transformers model) in a changed state
        target = copy.deepcopy(module) if copy_module else module
        modes = {m: m.training for m in target.modules()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(target.eval(), args, str(tmp), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
        finally:
            for m, training in modes.items():
                m.train(training)

    if not fp32.is_file():
        atomic_write(fp32, export)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        atomic_write(path, lambda tmp: quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8))
    return path


class OnnxTensorFunction:
    """A module with one tensor input and one tensor output (batch axis dynamic), exported to ``path`` once
    and run by ONNX Runtime: ``f(np.ndarray) -> np.ndarray``."""

    def __init__(self, module: nn.Module, example: torch.Tensor, path: Path, quantize: bool = False,
                 threads: int | None = None, copy_module: bool = True) -> None:
        _export(module, (example,), path, ["input"], ["output"], {"input": {0: "batch"}, "output": {0: "batch"}},
                quantize, copy_module)
        self.path = path
        self.session = _session(path, threads)
        self._input = self.session.get_inputs()[0].name  # exports before this class named it "pixel_values"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]


class OnnxImageTower(nn.Module):
    """An :class:`~cliplab.models.ImageTower` executed by ONNX Runtime (same transform, same features)."""

    def __init__(self, tower: nn.Module, cache_dir: str | Path | None = None, quantize: bool = False,
                 threads: int | None = None) -> None:
        super().__init__()
        self._tower_fp = tower.fingerprint()
        self.quantize = quantize
        self.image_size = tower.image_size
        self._transform = tower.transform()
        self.output_dim = tower.output_dim
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = folder / "onnx" / f"image-{self._tower_fp[:24]}{'-int8' if quantize else ''}.onnx"
        self._run = OnnxTensorFunction(tower, torch.zeros(2, 3, self.image_size, self.image_size), path, quantize,
                                       threads)
        self.onnx_path = path

    def transform(self):
        return self._transform

    def fingerprint(self) -> str:
        return sha256_text(self._tower_fp, "int8") if self.quantize else self._tower_fp

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(images.detach().cpu().numpy()))


class _TextEncoderCore(nn.Module):
    """token ids -> last hidden state (what gets exported)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OnnxTextTower(nn.Module):
    """A :class:`~cliplab.models.TextTower` whose transformer runs in ONNX Runtime; pooling as the tower's.

    Small transformer batches use cores better side by side than split across cores, so by default the
    session runs single-threaded and :meth:`encode_batches` keeps one batch in flight per core
    (tokenising stays on the calling thread: fast tokenizers are not safe to share between threads).
    """

    def __init__(self, tower: nn.Module, cache_dir: str | Path | None = None, quantize: bool = False,
                 threads: int | None = None, concurrency: int | None = None) -> None:
        super().__init__()
        self.tower = tower
        self.quantize = quantize
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._fp = tower.fingerprint()
        path = folder / "onnx" / f"text-{self._fp[:24]}{'-int8' if quantize else ''}.onnx"
        sample = tower.tokenize(["an example caption for export", "two"])
        _export(_TextEncoderCore(tower.model), (sample["input_ids"], sample["attention_mask"]), path,
                ["input_ids", "attention_mask"], ["last_hidden_state"],
                {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                 "last_hidden_state": {0: "batch", 1: "seq"}}, quantize)
        self.onnx_path = path
        cores = threads or (os.cpu_count() or 1)
        self.concurrency = max(1, min(concurrency or cores, cores))
        self.session = _session(path, max(1, cores // self.concurrency))
        self.output_dim = tower.output_dim

    def fingerprint(self) -> str:
        return sha256_text(self._fp, "int8") if self.quantize else self._fp

    def _tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tower.tokenize(list(texts))
        return batch["input_ids"].numpy().astype(np.int64), batch["attention_mask"].numpy().astype(np.int64)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        hidden = torch.from_numpy(self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
        return self.tower.pool(hidden, torch.from_numpy(mask))

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self._run(*self._tokens(texts))

    def encode_batches(self, batches: Iterable[list[str]]) -> Iterator[torch.Tensor]:
        """Pooled features of each batch, in order, with ``concurrency`` batches running at once."""
        if self.concurrency == 1:
            yield from map(self.encode, batches)
            return
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending: deque = deque()
            for texts in batches:
                pending.append(pool.submit(self._run, *self._tokens(texts)))
                if len(pending) > self.concurrency:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
