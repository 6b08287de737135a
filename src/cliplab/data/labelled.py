"""Labelled image datasets for zero-shot classification and linear probes.

Readers: class-per-folder trees (``root/<class>/*.jpg``, or ``root/<split>/<class>/*.jpg``), CIFAR-10/100
python pickles and a CSV of ``image,label`` (optional ``split`` column). Class names come from
folders/labels or a user file, and can be renamed by a mapping (``automobile`` -> ``car``) for nicer prompts.

Splits are never invented silently: asking for a split a dataset does not have is an error. A dataset
without splits can be divided with :meth:`LabelledImages.stratified_split` (deterministic, seeded,
stratified), which is what ``cliplab probe`` does, recording the protocol.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

from cliplab.data.images import ImageArrays, ImageFiles, ImageSet
from cliplab.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class LabelledImages:
    """Images with integer labels indexing ``class_names``."""

    images: ImageSet
    labels: np.ndarray
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def renamed(self, mapping: Mapping[str, str]) -> "LabelledImages":
        """Same data, class names replaced where ``mapping`` has them (unknown keys are an error)."""
        unknown = set(mapping) - set(self.class_names)
        if unknown:
            raise DataError(f"class rename: unknown class(es) {', '.join(sorted(unknown))}; "
                            f"classes are {', '.join(self.class_names)}")
        return LabelledImages(self.images, self.labels, [mapping.get(c, c) for c in self.class_names], self.name)

    def few_shot(self, k: int, seed: int = 0) -> "LabelledImages":
        """At most ``k`` examples per class, chosen at random but reproducibly."""
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(self.labels == c))[:k]
                                       for c in range(len(self.class_names))]))
        return self.subset(keep, f"{self.name}/{k}-shot")

    def subset(self, index: np.ndarray | int, name: str | None = None, seed: int = 0) -> "LabelledImages":
        """The images at ``index``; an int ``n`` takes a reproducible random sample of n images stratified by
        class (``round(n / classes)`` each, at most all of a class), in dataset order."""
        if isinstance(index, (int, np.integer)):
            per_class = max(1, round(int(index) / len(self.class_names)))
            rng = np.random.default_rng(seed)
            index = np.sort(np.concatenate([rng.permutation(np.flatnonzero(self.labels == c))[:per_class]
                                            for c in range(len(self.class_names))]))
            name = name or f"{self.name}[{len(index)}]"
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.images, ImageFiles):
            images: ImageSet = ImageFiles([self.images.paths[i] for i in index])
        elif isinstance(self.images, ImageArrays):
            # same source: item ids stay those of the original set; the cache key hashes the subset's pixels
            images = ImageArrays(self.images.arrays[index], self.images.source, [self.images.indices[i] for i in index])
        else:
            raise TypeError(f"cannot subset {type(self.images).__name__}")
        return LabelledImages(images, self.labels[index], self.class_names, name or self.name)

    def stratified_split(self, test_fraction: float, seed: int = 0) -> tuple["LabelledImages", "LabelledImages"]:
        """A deterministic held-out split: ``round(test_fraction * n_c)`` random images of each class c
        (at least one, and at least one left for training) go to test."""
        if not 0 < test_fraction < 1:
            raise DataError(f"test fraction must be in (0, 1), not {test_fraction}")
        rng = np.random.default_rng(seed)
        train, test = [], []
        for c, name in enumerate(self.class_names):
            idx = rng.permutation(np.flatnonzero(self.labels == c))
            if len(idx) < 2:
                raise DataError(f"{self.name}: class {name!r} has {len(idx)} image(s); a held-out split needs "
                                "at least 2 per class")
            n_test = min(len(idx) - 1, max(1, int(round(test_fraction * len(idx)))))
            test.append(idx[:n_test])
            train.append(idx[n_test:])
        tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
        return (self.subset(tr, f"{self.name}[held-out train]"), self.subset(te, f"{self.name}[held-out test]"))


def assert_disjoint(train: LabelledImages, test: LabelledImages) -> None:
    """Train and test must not share an image (by identity: resolved path, or source + index)."""
    shared = set(train.images.item_ids()) & set(test.images.item_ids())
    if shared:
        example = sorted(shared)[0]
        raise DataError(f"{len(shared)} image(s) are in both the training and the test set (e.g. {example}); "
                        "a probe must be scored on held-out images")


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class names file not found: {path}")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def read_image_folder(root: str | Path, class_names: list[str] | None = None) -> LabelledImages:
    """``root/<class>/<image>``; classes sorted by folder name unless ``class_names`` fixes the order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root}: no class sub-folders")
    names = class_names or folders
    missing = [c for c in names if c not in folders]
    if missing:
        raise DataError(f"{root}: no folder for class(es) {', '.join(missing)}")
    paths, labels = [], []
    for label, cls in enumerate(names):
        files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root}: no images found")
    return LabelledImages(ImageFiles(paths), np.asarray(labels), list(names), root.name)


def read_labelled_csv(path: str | Path, image_root: str | Path | None = None, class_names: list[str] | None = None,
                      image_column: str = "image", label_column: str = "label",
                      split: str | None = None) -> LabelledImages:
    """CSV of ``image,label`` (labels are class names, or indices into ``class_names``), optionally with a
    ``split`` column; ``split`` keeps the rows of one split (an error when the file has no such split)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for col in (image_column, label_column):
            if col not in (reader.fieldnames or []):
                raise DataError(f"{path}: missing column {col!r}")
        has_split = "split" in (reader.fieldnames or [])
        for row in reader:
            rows.append((reader.line_num, row[image_column].strip(), row[label_column].strip(),
                         (row.get("split") or "").strip() if has_split else None))
    names = list(class_names) if class_names else sorted({label for _, _, label, _ in rows})
    if split not in (None, "all"):
        found = sorted({s for *_, s in rows if s})
        if split not in found:
            raise DataError(f"{path}: no split {split!r} " + (f"(splits: {', '.join(found)})" if found else
                                                              "(no split column)"))
        rows = [r for r in rows if r[3] == split]
    index = {c: i for i, c in enumerate(names)}
    paths, labels = [], []
    for line, image, label, _ in rows:
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and class_names and int(label) < len(names):
            labels.append(int(label))
        else:
            raise DataError(f"{path}:{line}: unknown class {label!r}")
        if not (root / image).is_file():
            raise DataError(f"{path}:{line}: image not found: {root / image}")
        paths.append(root / image)
    return LabelledImages(ImageFiles(paths), np.asarray(labels), names,
                          path.stem if split in (None, "all") else f"{path.stem}/{split}")


def read_cifar(root: str | Path, split: str = "test") -> LabelledImages:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) pickles."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"CIFAR split must be train or test, not {split!r}")
    if (root / "batches.meta").is_file():
        files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        meta, label_key, names_key = root / "batches.meta", b"labels", b"label_names"
    elif (root / "meta").is_file():
        files, meta, label_key, names_key = [split], root / "meta", b"fine_labels", b"fine_label_names"
    else:
        raise DataError(f"{root}: not a CIFAR python folder (no batches.meta or meta)")
    names = [n.decode() for n in _unpickle(meta)[names_key]]
    data, labels = [], []
    for name in files:
        batch = _unpickle(root / name)
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[label_key])
    return LabelledImages(ImageArrays(np.concatenate(data), f"{root.resolve()}:{split}"), np.asarray(labels), names,
                          f"{root.name}/{split}")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds and nothing else: dicts, lists, bytes, numbers and numpy arrays.
    Any other global (a function a crafted pickle would call) is refused, so loading never runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,  # as the CIFAR files name it
               ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,  # as numpy >= 2 writes it
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR batch holds only arrays, lists, bytes "
                                         "and numbers")
        return found


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR file not found: {path}")
    with open(path, "rb") as f:
        try:
            out = _CifarUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise DataError(f"{path}: not a CIFAR pickle ({exc})") from None
    if not isinstance(out, dict):
        raise DataError(f"{path}: not a CIFAR pickle (holds a {type(out).__name__}, not a dict)")
    return out


def available_splits(spec: str | Path) -> list[str]:
    """The splits a labelled dataset has: CIFAR ``train``/``test``, the split sub-folders of a folder tree
    (``root/<split>/<class>/``), the values of a CSV's ``split`` column; empty when it has none."""
    path = Path(spec)
    if path.is_dir() and ((path / "batches.meta").is_file() or (path / "meta").is_file()):
        return ["test", "train"]
    if path.is_dir():
        return sorted(d.name for d in path.iterdir() if d.is_dir() and d.name in KNOWN_SPLITS
                      and any(c.is_dir() for c in d.iterdir()))
    if path.suffix == ".csv" and path.is_file():
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if "split" not in (reader.fieldnames or []):
                return []
            return sorted({(r.get("split") or "").strip() for r in reader} - {""})
    return []


KNOWN_SPLITS = ("train", "val", "valid", "validation", "dev", "test")


def load_labelled(spec: str | Path, *, split: str | None = None, class_names: list[str] | None = None,
                  image_root: str | Path | None = None) -> LabelledImages:
    """A class-per-folder tree, a CIFAR pickle folder or an ``image,label`` CSV, by path.

    ``split``: one of the dataset's splits (see :func:`available_splits`); ``None`` or ``all`` means the
    whole of a dataset without splits. Asking for a split the dataset lacks, or for the whole of one that
    has splits, is an error — never a silent fallback to all images.
    """
    path = Path(spec)
    if not path.exists():
        raise DataError(f"labelled dataset not found: {path}")
    splits = available_splits(path)
    if split in (None, "all"):
        if splits:
            raise DataError(f"{path} has splits ({', '.join(splits)}): choose one")
    elif split not in splits:
        have = f"its splits are {', '.join(splits)}" if splits else "it has no splits (no train/ or test/ sub-folder)"
        raise DataError(f"{path}: no split {split!r}; {have}")
    if path.is_dir() and ((path / "batches.meta").is_file() or (path / "meta").is_file()):
        return read_cifar(path, split)
    if path.is_dir():
        if split not in (None, "all"):
            ds = read_image_folder(path / split, class_names)
            ds.name = f"{path.name}/{split}"
            return ds
        return read_image_folder(path, class_names)
    if path.suffix == ".csv":
        return read_labelled_csv(path, image_root, class_names, split=split)
    raise DataError(f"labelled dataset not found or unsupported: {path}")
