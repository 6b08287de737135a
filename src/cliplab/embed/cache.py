"""On-disk feature cache: computed once per (tower, weights, preprocessing, item list), resumable.

The one store for everything computed from frozen weights: pooled tower features, final embeddings
and the cached frozen-prefix activations of tower tuning. Each entry is a folder ``<root>/<kind>-<key>/``
holding chunk files written atomically as they are computed, under a file lock (a second process
waits, then reuses the result); an interrupted extraction picks up at the first missing chunk. When
every chunk is there they are merged into ``features.npy`` (memory-mapped on read) and ``valid.npy``.

Items are fixed-shape (``[N, ...]``) or ragged (item i is ``[L_i, ...]``, e.g. the token activations of
a caption): ragged entries store the rows of all items back to back plus ``offsets.npy`` (``N + 1``).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from cliplab.utils import atomic_write, default_cache_dir, fsync_dir, sha256_text, write_json, write_npy

ComputeChunk = Callable[[int, int], tuple[np.ndarray | list[np.ndarray], np.ndarray, list[str]]]


@dataclass
class CachedFeatures:
    """Features ``[N, ...]`` for N items; ``valid[i]`` is False where item i failed (``errors`` says why).
    Ragged entries: item i is ``features[offsets[i]:offsets[i + 1]]``."""

    features: np.ndarray
    valid: np.ndarray
    errors: dict[int, str]
    path: Path
    reused: bool
    offsets: np.ndarray | None = None

    def item(self, i: int) -> np.ndarray:
        return self.features[i] if self.offsets is None else self.features[self.offsets[i]:self.offsets[i + 1]]


class FeatureCache:
    """A folder of cached feature matrices keyed by content."""

    def __init__(self, root: str | Path | None = None, chunk_size: int = 512, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"feature dtype must be float32 or float16, not {dtype!r}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.chunk_size = chunk_size
        self.dtype = dtype

    def key(self, tower_fingerprint: str, items: Sequence[str], extra: str = "") -> str:
        """Content key: tower (weights + preprocessing), the item list and the stored dtype."""
        dtype = "" if self.dtype == "float32" else self.dtype
        return sha256_text(tower_fingerprint, extra + dtype, *items)[:32]

    def entry_dir(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def get_or_compute(self, kind: str, key: str, n_items: int, compute: ComputeChunk, *,
                       desc: str = "", meta: dict | None = None, progress: bool = True,
                       chunk_size: int | None = None, dtype: str | None = None, ragged: bool = False,
                       run_chunks: Callable[[list[tuple[int, int]]], Iterable[tuple]] | None = None,
                       item_keys: Sequence[str] | None = None) -> CachedFeatures:
        """Return cached features, computing missing chunks with ``compute(start, stop)``.

        ``compute`` returns ``(features [stop-start, ...], valid [stop-start], error messages)``; for
        ``ragged`` entries ``features`` is a list of ``stop-start`` arrays ``[L_i, ...]``. ``dtype``
        overrides the cache's storage dtype for this entry. ``run_chunks(missing spans)``, when given,
        computes the missing chunks elsewhere (e.g. on a Ray cluster) and yields ``(start, stop, features,
        valid, errors)`` in any order; each chunk is written once, atomically, as it arrives.

        ``item_keys`` (one content key per item, e.g. path + size + mtime) makes the chunks content-defined
        and shared across entries (:func:`content_defined_spans`): an interrupted computation whose item list
        then changes (one photo added) recomputes only the chunks whose items changed.
        """
        dtype = dtype or self.dtype
        if dtype not in ("float32", "float16"):
            raise ValueError(f"feature dtype must be float32 or float16, not {dtype!r}")
        folder = self.entry_dir(kind, key)
        done = self._load_complete(folder, n_items)
        if done is not None:
            return done
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock")):  # a second process waits, then reuses the result
            done = self._load_complete(folder, n_items)
            if done is not None:
                return done
            if run_chunks is None:
                run_chunks = lambda spans: ((a, b, *compute(a, b)) for a, b in spans)  # noqa: E731
            self._compute(folder, kind, key, n_items, run_chunks, desc, meta, progress,
                          chunk_size or self.chunk_size, dtype, ragged, item_keys)
        return self._load(folder, reused=False)

    def adopt(self, kind: str, old_key: str, new_key: str, n_items: int) -> bool:
        """Rename a complete entry stored under ``old_key`` (an earlier key scheme for the same items) to
        ``new_key``, unless ``new_key`` exists; False when there was nothing to adopt (never raises)."""
        old, new = self.entry_dir(kind, old_key), self.entry_dir(kind, new_key)
        if old_key == new_key or new.exists() or not old.is_dir():
            return False
        try:
            with FileLock(str(old / ".lock"), timeout=0):
                if self._load_complete(old, n_items) is None:
                    return False
                os.rename(old, new)
        except (OSError, Timeout):
            return False
        fsync_dir(self.root)
        return True

    @classmethod
    def _load_complete(cls, folder: Path, n_items: int) -> CachedFeatures | None:
        """The merged entry when it is complete and readable; a damaged one (a file cut short, a count that
        does not match) is removed so that it is computed again, never a permanent failure."""
        if not ((folder / "features.npy").is_file() and (folder / "valid.npy").is_file()):
            return None
        try:
            out = cls._load(folder, reused=True)
            rows = len(out.features) if out.offsets is None else int(out.offsets[-1])
            if len(out.valid) == n_items and len(out.features) == rows and \
                    (out.offsets is None or len(out.offsets) == n_items + 1):
                return out
        except (OSError, ValueError, EOFError):
            pass
        for name in ("valid.npy", "features.npy", "offsets.npy", "errors.json"):  # valid.npy first: not complete
            (folder / name).unlink(missing_ok=True)
        return None

    @staticmethod
    def _chunk_done(path: Path, n: int) -> bool:
        """Whether a chunk file is there and whole (its item count read back); a damaged one is removed."""
        if not path.is_file():
            return False
        try:
            with np.load(path) as z:
                if len(z["valid"]) == n and "features" in z.files:
                    json.loads(str(z["errors_local" if "errors_local" in z.files else "errors"]))
                    return True
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            pass
        path.unlink(missing_ok=True)
        return False

    def _chunk_paths(self, folder: Path, kind: str, spans: list[tuple[int, int]], dtype: str, ragged: bool,
                     item_keys: Sequence[str] | None, namespace: str) -> list[Path]:
        """Positional chunk files inside the entry, or content-named ones in ``<root>/<kind>-chunks/``."""
        if item_keys is None:
            return [folder / f"chunk-{a:010d}-{b:010d}.npz" for a, b in spans]
        shared = self.root / f"{kind}-chunks"
        return [shared / f"part-{sha256_text(namespace, dtype, str(ragged), *item_keys[a:b])[:32]}.npz"
                for a, b in spans]

    def _compute(self, folder: Path, kind: str, key: str, n_items: int, run_chunks, desc: str,
                 meta: dict | None, progress: bool, chunk_size: int, dtype: str, ragged: bool,
                 item_keys: Sequence[str] | None) -> None:
        write_json(folder / "meta.json", {"kind": kind, "key": key, "n_items": n_items, "dtype": dtype,
                                          "ragged": ragged, "chunk_size": chunk_size, **(meta or {})})
        if item_keys is not None and len(item_keys) != n_items:
            raise ValueError(f"{len(item_keys)} item keys for {n_items} items")
        spans = (content_defined_spans(item_keys, chunk_size) if item_keys is not None else
                 [(s, min(s + chunk_size, n_items)) for s in range(0, n_items, chunk_size)])
        chunk_paths = self._chunk_paths(folder, kind, spans, dtype, ragged, item_keys,
                                        str((meta or {}).get("tower", "")))
        path_of = dict(zip(spans, chunk_paths))
        missing = [(a, b) for (a, b), p in zip(spans, chunk_paths) if not self._chunk_done(p, b - a)]
        have = n_items - sum(b - a for a, b in missing)
        expected = set(missing)
        with tqdm(total=n_items, initial=have, desc=desc or kind, unit="item", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start, stop, feats, valid, errors in run_chunks(missing):
                if (start, stop) not in expected:
                    raise ValueError(f"chunk ({start}, {stop}) was not asked for, or came twice")
                expected.discard((start, stop))
                if len(valid) != stop - start:
                    raise ValueError(f"compute({start}, {stop}) returned {len(valid)} items")
                local = [f"{int(m.partition(chr(9))[0]) - start}\t{m.partition(chr(9))[2]}" for m in errors]
                payload = {"valid": np.asarray(valid, dtype=bool), "errors_local": np.asarray(json.dumps(local))}
                if ragged:
                    payload["lengths"] = np.asarray([len(f) for f in feats], dtype=np.int64)
                    payload["features"] = (np.concatenate([np.asarray(f, dtype=dtype) for f in feats])
                                           if len(feats) else np.zeros((0,), dtype))
                else:
                    payload["features"] = np.asarray(feats, dtype=dtype)
                atomic_write(path_of[(start, stop)], lambda p: _save_npz(p, payload))
                bar.update(stop - start)
        if expected:
            raise ValueError(f"{len(expected)} chunks were not computed, e.g. {sorted(expected)[0]}")
        self._merge(folder, chunk_paths, n_items, dtype, ragged)

    def _merge(self, folder: Path, chunk_paths: list[Path], n_items: int, dtype: str, ragged: bool) -> None:
        """Stream chunks into one memory-mappable ``features.npy`` (never all in RAM at once)."""
        rest: tuple[int, ...] = (0,)
        rows = n_items
        lengths = []
        for i, path in enumerate(chunk_paths):
            with np.load(path) as z:
                if i == 0:
                    rest = tuple(z["features"].shape[1:])
                if ragged:
                    lengths.append(z["lengths"])
        if ragged:
            lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
            rows = int(offsets[-1])
        valid = np.zeros(n_items, dtype=bool)
        errors: dict[int, str] = {}

        def write_features(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *rest))
            item, row = 0, 0
            for path in chunk_paths:
                with np.load(path) as z:
                    n, m = len(z["valid"]), len(z["features"])
                    out[row:row + m] = z["features"]
                    valid[item:item + n] = z["valid"]
                    local = "errors_local" in z.files  # indices within the chunk (older chunks: global)
                    for msg in json.loads(str(z["errors_local" if local else "errors"])):
                        idx, _, text = msg.partition("\t")
                        errors[int(idx) + (item if local else 0)] = text
                item, row = item + n, row + m
            out.flush()
            del out

        atomic_write(folder / "features.npy", write_features)
        if ragged:
            write_npy(folder / "offsets.npy", offsets)
        write_json(folder / "errors.json", {str(k): v for k, v in sorted(errors.items())})
        write_npy(folder / "valid.npy", valid)  # written last: marks the entry complete
        for path in chunk_paths:
            path.unlink()

    @staticmethod
    def _load(folder: Path, reused: bool) -> CachedFeatures:
        features = np.load(folder / "features.npy", mmap_mode="r")
        valid = np.load(folder / "valid.npy")
        err_path = folder / "errors.json"
        errors = {int(k): v for k, v in json.loads(err_path.read_text()).items()} if err_path.is_file() else {}
        offsets = np.load(folder / "offsets.npy") if (folder / "offsets.npy").is_file() else None
        return CachedFeatures(features, valid, errors, folder, reused, offsets)


def content_defined_spans(keys: Sequence[str], target: int) -> list[tuple[int, int]]:
    """Split items into chunks that end after an item whose key hashes to 0 modulo ``target`` (chunks of
    ``target`` items on average, at most ``2 * target``): inserting or removing one item changes only the
    chunk it falls in, so chunks named by their items' keys are found again after the list changes."""
    spans, start = [], 0
    for i, key in enumerate(keys):
        if i + 1 - start >= 2 * target or int(sha256_text(key)[:12], 16) % target == 0 or i == len(keys) - 1:
            spans.append((start, i + 1))
            start = i + 1
    return spans


def _save_npz(path: Path, payload: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **payload)
