"""Small shared helpers: atomic writes, hashing, seeding, devices."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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


def temp_sibling(path: str | Path) -> Path:
    """A fresh temp name beside ``path`` (``.<name>.cliplab-<random>.tmp``, see :func:`temp_name_pattern`)."""
    path = Path(path)
    return path.parent / f".{path.name}{TEMP_MARK}{secrets.token_hex(8)}.tmp"


def fsync_file(path: str | Path) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(tmp_path)`` then rename it into place, durably: the temp file is
    fsynced before the rename and the folder after it, so after a crash or power loss ``path`` holds the
    old or the new content, never an empty or half file. The file gets the umask's mode (like ``open``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_sibling(path)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask
    try:
        write(tmp_path)
        fsync_file(tmp_path)
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


def read_json_or_none(path: str | Path) -> Any:
    """A JSON file's content, or None when it is missing, unreadable or not JSON (for recognising files)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def marked_folder_state(folder: str | Path, marker: str, fmt: str, own: Callable[[str], bool]) -> str | None:
    """How far a folder is cliplab's by its marker file (JSON ``{"format": fmt}``): ``missing``, ``foreign``
    (not a folder), ``marked``, ``empty`` (nothing but names ``own`` accepts), or None: it holds other files
    and the caller decides (an older folder of its kind, or a user's)."""
    folder = Path(folder)
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "foreign"
    found = read_json_or_none(folder / marker)
    if isinstance(found, dict) and found.get("format") == fmt:
        return "marked"
    return "empty" if all(own(p.name) for p in folder.iterdir()) else None


def refuse_foreign_file(path: str | Path, is_own: Callable[[Path], bool], option: str) -> None:
    """Before any work: an existing ``path`` may be replaced only when ``is_own`` recognises it as a file
    cliplab wrote (by its marker); anything else is a one-line :class:`~cliplab.errors.DataError`."""
    from cliplab.errors import DataError

    path = Path(path)
    if path.is_symlink() or path.exists() and (not path.is_file() or not is_own(path)):
        raise DataError(f"{option} {path} exists and is not a file cliplab wrote; nothing was written. Give a new "
                        "file name (cliplab replaces only its own files)")


@contextmanager
def exclusive_lock(path: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock file (flock: released by the kernel even on kill -9) for one writer; a second
    one is refused at once with ``busy`` (a one-line :class:`~cliplab.errors.DataError`), never left waiting."""
    from filelock import FileLock, Timeout

    from cliplab.errors import DataError

    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DataError(busy) from None
    try:
        yield
    finally:
        lock.release()


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


_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}
DIGEST_TABLE = "file-digests.sqlite"  # in the cache root: one row per file path


def file_stat_key(path: str | Path) -> tuple[str, int, int, int]:
    """``(resolved path, size, mtime_ns, inode)``: what must not change for a remembered digest to hold."""
    path = Path(path)
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def hash_file(path: str | Path) -> tuple[tuple[str, int, int, int], str]:
    """``(stat key, SHA-256 of the bytes)`` read now (no memo): what a worker process computes."""
    key = file_stat_key(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return key, h.hexdigest()


def _digest_table(create: bool):
    """The persistent digest table (SQLite in the cache root), or None when it cannot be used."""
    import sqlite3

    path = default_cache_dir() / DIGEST_TABLE
    try:
        if not path.is_file() and not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=5)
        con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "inode INTEGER, sha256 TEXT)")
        return con
    except (OSError, sqlite3.Error):
        return None


def remember_sha256(pairs: list[tuple[tuple[str, int, int, int], str]]) -> None:
    """Record digests computed elsewhere (e.g. by the image feed's workers while decoding), in this process
    and in the persistent table; a table that cannot be written is skipped (it is only a memo)."""
    import sqlite3

    fresh = [(k, d) for k, d in pairs if _FILE_HASHES.get(k) != d]
    _FILE_HASHES.update(fresh)
    if not fresh:
        return
    con = _digest_table(create=True)
    if con is None:
        return
    try:
        with con:
            con.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", [(*k, d) for k, d in fresh])
    except sqlite3.Error:
        pass
    finally:
        con.close()


def sha256_files(paths, compute: Callable | None = None) -> list[str | None]:
    """SHA-256 of each file's bytes (None where it is missing or unreadable): the one content digest of files
    (feature-cache keys of images, the photo index's content hash, weight files). Remembered per path + size +
    mtime + inode in this process and in a table in the cache root, so unchanged files are not read again;
    the others are hashed through ``compute`` (a ``map``-like call, e.g. a process pool's; default: here)."""
    import sqlite3

    keys: list[tuple | None] = []
    for p in paths:
        try:
            keys.append(file_stat_key(p))
        except OSError:
            keys.append(None)
    unknown = [k for k in keys if k is not None and k not in _FILE_HASHES]
    con = _digest_table(create=False) if unknown else None
    if con is not None:
        try:
            for s in range(0, len(unknown), 500):
                part = {k[0]: k for k in unknown[s:s + 500]}
                rows = con.execute(f"SELECT * FROM digests WHERE path IN ({','.join('?' * len(part))})", list(part))
                for path, size, mtime, inode, digest in rows:
                    if part.get(path) == (path, size, mtime, inode):
                        _FILE_HASHES[part[path]] = digest
        except sqlite3.Error:
            pass
        finally:
            con.close()
    todo = list(dict.fromkeys(k[0] for k in keys if k is not None and k not in _FILE_HASHES))
    if todo:
        remember_sha256([r for r in (compute or map)(_hash_or_none, todo) if r is not None])
    return [_FILE_HASHES.get(k) if k is not None else None for k in keys]


def _hash_or_none(path: str):
    try:
        return hash_file(path)
    except OSError:
        return None


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes (see :func:`sha256_files`; raises ``OSError`` when it cannot be read)."""
    digest = sha256_files([path])[0]
    if digest is None:
        file_stat_key(path)  # the missing file's own error
        raise OSError(f"cannot read {path}")
    return digest


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
