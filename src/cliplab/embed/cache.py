"""On-disk feature cache: computed once per (tower, weights, preprocessing, item list), resumable.

Each entry is a folder ``<root>/<kind>-<key>/`` holding chunk files written atomically as they are
computed; an interrupted extraction picks up at the first missing chunk. When every chunk is there
they are merged into ``features.npy`` (memory-mapped on read) and ``valid.npy``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from cliplab.utils import atomic_write, default_cache_dir, sha256_text, write_json

ComputeChunk = Callable[[int, int], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass
class CachedFeatures:
    """Features ``[N, D]`` for N items; ``valid[i]`` is False where item i failed (``errors`` says why)."""

    features: np.ndarray
    valid: np.ndarray
    errors: dict[int, str]
    path: Path
    reused: bool


class FeatureCache:
    """A folder of cached feature matrices keyed by content."""

    def __init__(self, root: str | Path | None = None, chunk_size: int = 512) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.chunk_size = chunk_size

    @staticmethod
    def key(tower_fingerprint: str, items: Sequence[str], extra: str = "") -> str:
        return sha256_text(tower_fingerprint, extra, *items)[:32]

    def entry_dir(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def get_or_compute(self, kind: str, key: str, n_items: int, compute: ComputeChunk, *,
                       desc: str = "", meta: dict | None = None, progress: bool = True) -> CachedFeatures:
        """Return cached features, computing missing chunks with ``compute(start, stop)``.

        ``compute`` returns ``(features [stop-start, D], valid [stop-start], error messages)``.
        """
        folder = self.entry_dir(kind, key)
        if self._complete(folder):
            return self._load(folder, reused=True)
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock")):  # a second process waits, then reuses the result
            if self._complete(folder):
                return self._load(folder, reused=True)
            self._compute(folder, kind, key, n_items, compute, desc, meta, progress)
        return self._load(folder, reused=False)

    @staticmethod
    def _complete(folder: Path) -> bool:
        return (folder / "features.npy").is_file() and (folder / "valid.npy").is_file()

    def _compute(self, folder: Path, kind: str, key: str, n_items: int, compute: ComputeChunk, desc: str,
                 meta: dict | None, progress: bool) -> None:
        write_json(folder / "meta.json", {"kind": kind, "key": key, "n_items": n_items,
                                          "chunk_size": self.chunk_size, **(meta or {})})
        starts = list(range(0, n_items, self.chunk_size))
        chunk_paths = [folder / f"chunk-{i:06d}.npz" for i in range(len(starts))]
        have = sum(min(self.chunk_size, n_items - s) for s, p in zip(starts, chunk_paths) if p.is_file())
        with tqdm(total=n_items, initial=have, desc=desc or kind, unit="item", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start, path in zip(starts, chunk_paths):
                if path.is_file():
                    continue
                stop = min(start + self.chunk_size, n_items)
                feats, valid, errors = compute(start, stop)
                payload = {"features": np.asarray(feats, dtype=np.float32), "valid": np.asarray(valid, dtype=bool),
                           "errors": np.asarray(json.dumps(errors))}
                atomic_write(path, lambda p: _save_npz(p, payload))
                bar.update(stop - start)
        self._merge(folder, chunk_paths)

    def _merge(self, folder: Path, chunk_paths: list[Path]) -> None:
        feats, valid, errors = [], [], {}
        for path in chunk_paths:
            with np.load(path) as z:
                feats.append(z["features"])
                valid.append(z["valid"])
                for msg in json.loads(str(z["errors"])):
                    idx, _, text = msg.partition("\t")
                    errors[int(idx)] = text
        features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        atomic_write(folder / "features.npy", lambda p: _save_npy(p, features))
        write_json(folder / "errors.json", {str(k): v for k, v in sorted(errors.items())})
        atomic_write(folder / "valid.npy", lambda p: _save_npy(p, np.concatenate(valid) if valid else np.zeros(0, bool)))
        for path in chunk_paths:
            path.unlink()

    @staticmethod
    def _load(folder: Path, reused: bool) -> CachedFeatures:
        features = np.load(folder / "features.npy", mmap_mode="r")
        valid = np.load(folder / "valid.npy")
        err_path = folder / "errors.json"
        errors = {int(k): v for k, v in json.loads(err_path.read_text()).items()} if err_path.is_file() else {}
        return CachedFeatures(features, valid, errors, folder, reused)

    def clear(self) -> None:
        if self.root.is_dir():
            shutil.rmtree(self.root)


def _save_npz(path: Path, payload: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **payload)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)
