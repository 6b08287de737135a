"""Small shared helpers: atomic writes, hashing, seeding, devices."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


TEMP_MARK = ".cliplab-"  # temp files are ``.<name>.cliplab-<random>.tmp``: recognisably cliplab's own


def temp_name_pattern(name_regex: str) -> "re.Pattern[str]":
    """The names :func:`atomic_write` gives its temp files for files named by ``name_regex`` (so a clean-up
    after a killed writer removes only cliplab's own temp files)."""
    return re.compile(r"\.(?:" + name_regex + ")" + re.escape(TEMP_MARK) + r"[0-9a-f]{16}\.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or unlink in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(tmp_path)`` then rename it into place, durably: the temp file is
    fsynced before the rename and the folder after it, so after a crash or power loss ``path`` holds the
    old or the new content, never an empty or half file. The file gets the umask's mode (like ``open``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}{TEMP_MARK}{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask
    try:
        write(tmp_path)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    return atomic_write(path, lambda p: p.write_text(text + "\n", encoding="utf-8"))


def write_npy(path: str | Path, arr: np.ndarray) -> Path:
    """Save an array as ``.npy``, atomically and durably."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    return atomic_write(path, save)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def sha256_tensor(t) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_state(state: dict) -> str:
    """Digest of named tensors (order-independent): identifies fine-tuned weights in cache keys."""
    return sha256_text(*(f"{k}:{sha256_tensor(state[k])}" for k in sorted(state)))


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """The one mixed-precision policy (extraction and training): bf16 on CUDA where supported, else fp16;
    None (full precision) on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: str | torch.device, enabled: bool = True):
    """``torch.autocast`` under :func:`autocast_dtype`, or a no-op context."""
    import contextlib

    dtype = autocast_dtype(device) if enabled else None
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def default_cache_dir() -> Path:
    """Feature cache root: ``$CLIPLAB_CACHE`` or ``~/.cache/cliplab``."""
    env = os.environ.get("CLIPLAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "cliplab"


def make_module_callable(name: str, target: Callable[[], Callable]) -> None:
    """Let ``module(...)`` run ``target()(...)``: the notebook API's verbs that are also package names
    (``cliplab.train(...)``, ``cliplab.caption.train(...)``); ``target`` is looked up on each call (no cycles)."""
    import types

    module = sys.modules[name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return target()(*args, **kwargs)

    module.__class__ = CallableModule
