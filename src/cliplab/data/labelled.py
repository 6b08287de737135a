"""Labelled image datasets for zero-shot classification and linear probes.

Readers: class-per-folder trees (``root/<class>/*.jpg``), CIFAR-10/100 python pickles and a CSV of
``image,label``. Class names come from folders/labels or a user file, and can be renamed by a mapping
(``automobile`` -> ``car``) for nicer prompts.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

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

    def subset(self, index: np.ndarray, name: str | None = None) -> "LabelledImages":
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.images, ImageFiles):
            images: ImageSet = ImageFiles([self.images.paths[i] for i in index])
        elif isinstance(self.images, ImageArrays):
            images = ImageArrays(self.images.arrays[index], f"{self.images.source}[subset]")
        else:
            raise TypeError(f"cannot subset {type(self.images).__name__}")
        return LabelledImages(images, self.labels[index], self.class_names, name or self.name)


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
                      image_column: str = "image", label_column: str = "label") -> LabelledImages:
    """CSV of ``image,label``; labels are class names (or indices into ``class_names``)."""
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
        for row in reader:
            rows.append((reader.line_num, row[image_column].strip(), row[label_column].strip()))
    names = list(class_names) if class_names else sorted({label for _, _, label in rows})
    index = {c: i for i, c in enumerate(names)}
    paths, labels = [], []
    for line, image, label in rows:
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and class_names and int(label) < len(names):
            labels.append(int(label))
        else:
            raise DataError(f"{path}:{line}: unknown class {label!r}")
        if not (root / image).is_file():
            raise DataError(f"{path}:{line}: image not found: {root / image}")
        paths.append(root / image)
    return LabelledImages(ImageFiles(paths), np.asarray(labels), names, path.stem)


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


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR file not found: {path}")
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError) as exc:
            raise DataError(f"{path}: corrupt pickle ({exc})") from None


def load_labelled(spec: str | Path, *, split: str = "test", class_names: list[str] | None = None,
                  image_root: str | Path | None = None) -> LabelledImages:
    """A class-per-folder tree, a CIFAR pickle folder or an ``image,label`` CSV, by path."""
    path = Path(spec)
    if path.is_dir() and ((path / "batches.meta").is_file() or (path / "meta").is_file()):
        return read_cifar(path, split)
    if path.is_dir():
        if (path / split).is_dir() and not (path / split / split).exists():
            sub = path / split
            if any(p.is_dir() for p in sub.iterdir()):
                ds = read_image_folder(sub, class_names)
                ds.name = f"{path.name}/{split}"
                return ds
        return read_image_folder(path, class_names)
    if path.suffix == ".csv":
        return read_labelled_csv(path, image_root, class_names)
    raise DataError(f"labelled dataset not found or unsupported: {path}")
