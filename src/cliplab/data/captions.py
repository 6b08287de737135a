"""Image-caption datasets: one image has many captions; every caption knows its image.

Readers: Flickr8k (``captions.txt`` CSV or ``Flickr8k.token.txt`` + split files), COCO captions
JSON, Karpathy ``dataset_*.json`` and generic CSV/JSONL (``image,caption`` relative to an image root).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np

from cliplab.errors import ConfigError, DataError
from cliplab.utils import refuse_foreign_file, sha256_text, write_text

OnError = Literal["raise", "skip"]
SPLITS = ("train", "dev", "test", "all")


@dataclass
class SkipReport:
    """What was skipped under ``on_error='skip'``, one entry per bad item."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)

    def add(self, kind: str, message: str) -> None:
        self.items.append((kind, message))

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        return dict(Counter(kind for kind, _ in self.items))

    def summary(self) -> str:
        if not self.items:
            return "skipped 0 items"
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items()))
        return f"skipped {len(self.items)} items ({parts})"

    def to_dict(self) -> dict:
        return {"skipped": len(self.items), "counts": self.counts(), "items": [list(i) for i in self.items]}


@dataclass(frozen=True)
class CaptionRecord:
    """One (image, caption) pair as read from a file, with where it came from."""

    image: str
    caption: str
    source: str
    line: int


class CaptionDataset:
    """Unique images plus captions, each caption mapped to the index of its image."""

    def __init__(
        self,
        image_root: str | Path,
        images: list[str],
        captions: list[str],
        caption_image: Iterable[int],
        *,
        name: str = "dataset",
        image_sources: list[str] | None = None,
        skipped: SkipReport | None = None,
    ) -> None:
        self.image_root = Path(image_root)
        self.images = list(images)
        self.captions = list(captions)
        self.caption_image = np.asarray(list(caption_image), dtype=np.int64)
        self.name = name
        self.image_sources = image_sources or [""] * len(self.images)
        self.skipped = skipped or SkipReport()
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image must have one entry per caption")

    def __repr__(self) -> str:
        return f"CaptionDataset({self.name!r}, images={len(self.images)}, captions={len(self.captions)})"

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_paths(self) -> list[Path]:
        return [self.image_root / rel for rel in self.images]

    def captions_of(self, image_index: int) -> list[int]:
        return np.flatnonzero(self.caption_image == image_index).tolist()

    def fingerprint(self) -> str:
        """Content key of the image list and captions (for caches and run records)."""
        return sha256_text(str(self.image_root.resolve()), *self.images, "\x01", *self.captions)

    def drop_images(self, bad: Iterable[int], kind: str, messages: Iterable[str]) -> "CaptionDataset":
        """A copy without the given images (and their captions), the drops recorded in ``skipped``."""
        bad = sorted(set(int(b) for b in bad))
        if not bad:
            return self
        report = SkipReport(list(self.skipped.items))
        for msg in messages:
            report.add(kind, msg)
        keep = np.ones(len(self.images), dtype=bool)
        keep[bad] = False
        remap = np.cumsum(keep) - 1
        cap_keep = keep[self.caption_image]
        return CaptionDataset(
            self.image_root,
            [im for im, k in zip(self.images, keep) if k],
            [c for c, k in zip(self.captions, cap_keep) if k],
            remap[self.caption_image[cap_keep]],
            name=self.name,
            image_sources=[s for s, k in zip(self.image_sources, keep) if k],
            skipped=report,
        )

    def subset(self, n: int) -> "CaptionDataset":
        """The first ``n`` images (in the dataset's order) with all their captions; ``name`` says so."""
        if n < 1:
            raise DataError(f"{self.name}: a subset needs at least one image, not {n}")
        if n >= self.num_images:
            return self
        keep = np.arange(n)
        caps = np.isin(self.caption_image, keep)
        return CaptionDataset(self.image_root, self.images[:n], [c for c, k in zip(self.captions, caps) if k],
                              self.caption_image[caps], name=f"{self.name}[:{n}]",
                              image_sources=self.image_sources[:n], skipped=SkipReport(list(self.skipped.items)))

    @classmethod
    def from_records(
        cls,
        records: Iterable[CaptionRecord],
        image_root: str | Path,
        *,
        name: str,
        on_error: OnError = "raise",
        check_files: bool = True,
    ) -> "CaptionDataset":
        """Group pairs by image; empty captions and missing images raise or are skipped and counted."""
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        image_root = Path(image_root)
        report = SkipReport()
        index: dict[str, int] = {}
        images: list[str] = []
        sources: list[str] = []
        captions: list[str] = []
        caption_image: list[int] = []
        missing: set[str] = set()
        exists: dict[str, bool] = {}
        for rec in records:
            where = f"{rec.source}:{rec.line}"
            caption = " ".join(rec.caption.split())
            if not rec.image:
                _fail(on_error, report, "empty image field", f"{where}: empty image field")
                continue
            if not caption:
                _fail(on_error, report, "empty caption", f"{where}: empty caption for image '{rec.image}'")
                continue
            if rec.image in missing:
                continue
            if check_files:
                ok = exists.get(rec.image)
                if ok is None:
                    ok = exists[rec.image] = (image_root / rec.image).is_file()
                if not ok:
                    missing.add(rec.image)
                    _fail(on_error, report, "missing image", f"{where}: image not found: {image_root / rec.image}")
                    continue
            if rec.image not in index:
                index[rec.image] = len(images)
                images.append(rec.image)
                sources.append(where)
            captions.append(caption)
            caption_image.append(index[rec.image])
        if not images:
            raise DataError(f"{name}: no usable image-caption pairs")
        return cls(image_root, images, captions, caption_image, name=name, image_sources=sources, skipped=report)


def _fail(on_error: OnError, report: SkipReport, kind: str, message: str) -> None:
    if on_error == "raise":
        raise DataError(message)
    report.add(kind, message)


# ----------------------------------------------------------------------------- readers


def _hash_split(image: str) -> str:
    """Deterministic 90/5/5 split by image name, for formats that carry no split."""
    bucket = int(hashlib.md5(image.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if bucket < 5 else "dev" if bucket < 10 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def read_flickr8k_records(root: Path) -> list[CaptionRecord]:
    """Captions from ``captions.txt`` (CSV with header image,caption) or ``Flickr8k.token.txt``."""
    csv_path, token_path = root / "captions.txt", root / "Flickr8k.token.txt"
    if csv_path.is_file():
        return _read_csv_records(csv_path, "image", "caption")
    if token_path.is_file():
        records = []
        with open(token_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                key, sep, caption = line.partition("\t")
                if not sep:
                    raise DataError(f"{token_path}:{lineno}: expected '<image>#<n><TAB><caption>'")
                records.append(CaptionRecord(key.split("#")[0], caption, str(token_path), lineno))
        return records
    raise DataError(f"{root}: no captions.txt or Flickr8k.token.txt found")


def read_flickr8k(root: str | Path, split: str = "test", *, on_error: OnError = "raise",
                  images_dir: str = "images") -> CaptionDataset:
    """Flickr8k with the standard 6000/1000/1000 split files (``split='all'`` keeps every image)."""
    _check_split(split)
    root = Path(root)
    records = read_flickr8k_records(root)
    if split != "all":
        fname = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                 "test": "Flickr_8k.testImages.txt"}[split]
        split_path = root / fname
        if not split_path.is_file():
            raise DataError(f"split file not found: {split_path}")
        wanted = {ln.strip() for ln in split_path.read_text(encoding="utf-8").splitlines() if ln.strip()}
        records = [r for r in records if r.image in wanted]
    image_root = root / images_dir if (root / images_dir).is_dir() else root
    return CaptionDataset.from_records(records, image_root, name=f"flickr8k/{split}", on_error=on_error)


def _dataset_json(path: str | Path, split: str, valid, what: str) -> tuple[Path, dict]:
    """A JSON caption file read and checked for its format's keys (``what`` names the format in the error)."""
    _check_split(split)
    path = Path(path)
    data = _load_json(path)
    if not valid(data):
        raise DataError(f"{path}: not {what}")
    return path, data


def read_coco(path: str | Path, image_root: str | Path, split: str = "all", *,
              on_error: OnError = "raise") -> CaptionDataset:
    """COCO captions JSON (``images`` + ``annotations``); the file itself is the split unless ``split`` hashes one."""
    path, data = _dataset_json(path, split, lambda d: "annotations" in d and "images" in d,
                               "a COCO captions file (needs 'images' and 'annotations')")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    records = []
    for i, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in files:
            raise DataError(f"{path}: annotations[{i}]: unknown image_id {ann.get('image_id')!r}")
        fname = files[ann["image_id"]]
        if split == "all" or _hash_split(fname) == split:
            records.append(CaptionRecord(fname, str(ann.get("caption") or ""), str(path), i))
    return CaptionDataset.from_records(records, image_root, name=f"coco/{split}", on_error=on_error)


def read_karpathy(path: str | Path, image_root: str | Path, split: str = "test", *,
                  on_error: OnError = "raise") -> CaptionDataset:
    """Karpathy ``dataset_{coco,flickr8k,flickr30k}.json``; ``restval`` counts as train."""
    path, data = _dataset_json(
        path, split, lambda d: "images" in d and (not d["images"] or "sentences" in d["images"][0]),
        "a Karpathy split file (needs images[].sentences)")
    alias = {"val": "dev", "restval": "train"}
    records = []
    for i, im in enumerate(data["images"]):
        im_split = alias.get(im.get("split", "train"), im.get("split", "train"))
        if split != "all" and im_split != split:
            continue
        rel = str(Path(im.get("filepath", "")) / im["filename"])
        for sent in im["sentences"]:
            records.append(CaptionRecord(rel, str(sent.get("raw", "")), str(path), i))
    return CaptionDataset.from_records(records, image_root, name=f"karpathy/{split}", on_error=on_error)


def read_pairs(path: str | Path, image_root: str | Path | None = None, split: str = "all", *,
               image_column: str = "image", caption_column: str = "caption",
               on_error: OnError = "raise") -> CaptionDataset:
    """Generic CSV/TSV/JSONL of image-caption pairs; image paths relative to ``image_root`` (default: the file's folder).

    A ``split`` column, when present, selects rows; otherwise ``train/dev/test`` hash image names 90/5/5.
    """
    _check_split(split)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.suffix == ".jsonl":
        records, splits = _read_jsonl_records(path, image_column, caption_column)
    else:
        records, splits = _read_csv_records(path, image_column, caption_column, with_split=True)
    if split != "all":
        if any(splits):
            records = [r for r, s in zip(records, splits) if _norm_split(s) == split]
        else:
            records = [r for r in records if _hash_split(r.image) == split]
    root = Path(image_root) if image_root is not None else path.parent
    return CaptionDataset.from_records(records, root, name=f"{path.stem}/{split}", on_error=on_error)


def _norm_split(s: str | None) -> str:
    s = (s or "").strip().lower()
    return {"val": "dev", "valid": "dev", "validation": "dev", "restval": "train"}.get(s, s)


def _read_csv_records(path: Path, image_column: str, caption_column: str, with_split: bool = False):
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    records, splits = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        for col in (image_column, caption_column):
            if col not in fields:
                raise DataError(f"{path}: missing column {col!r} (header has {', '.join(fields) or 'nothing'})")
        for row in reader:
            lineno = reader.line_num
            records.append(CaptionRecord((row.get(image_column) or "").strip(), row.get(caption_column) or "",
                                         str(path), lineno))
            splits.append(row.get("split"))
    return (records, splits) if with_split else records


def _read_jsonl_records(path: Path, image_column: str, caption_column: str):
    records, splits = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if image_column not in row:
                raise DataError(f"{path}:{lineno}: missing field {image_column!r}")
            records.append(CaptionRecord(str(row[image_column]).strip(), str(row.get(caption_column) or ""),
                                         str(path), lineno))
            splits.append(row.get("split"))
    return records, splits


def _json_image_root(path: Path, data: dict) -> Path:
    """Where a captions JSON's images are when no root is given: beside it, in ``images/`` beside it, or in
    COCO's layout (``annotations/captions_train2017.json`` → ``train2017/``); the first that holds its first
    image, else beside it (the missing image is then reported as usual)."""
    images = data.get("images") or []
    first = images[0] if images and isinstance(images[0], dict) else {}
    name = str(Path(first.get("filepath", "")) / str(first.get("file_name") or first.get("filename") or ""))
    candidates = [path.parent, path.parent / "images"]
    if path.stem.startswith("captions_"):
        candidates += [path.parent / path.stem[len("captions_"):], path.parent.parent / path.stem[len("captions_"):]]
    for root in candidates:
        if name and (root / name).is_file():
            return root
    return path.parent


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


@dataclass(frozen=True)
class CaptionFormat:
    """A caption-dataset format: ``detect(path)`` says whether a path is one, ``read(path, split, image_root,
    on_error)`` opens it. Register a new one with :func:`register_caption_format` (one function, one line)."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, str, "str | Path | None", OnError], CaptionDataset]


CAPTION_FORMATS: dict[str, CaptionFormat] = {}


def register_caption_format(name: str, detect: Callable[[Path], bool],
                            read: Callable[[Path, str, "str | Path | None", OnError], CaptionDataset]) -> None:
    """Add a dataset format that :func:`load_caption_dataset` (and so every command, and the indexer) detects."""
    CAPTION_FORMATS[name] = CaptionFormat(name, detect, read)


def detect_caption_format(path: str | Path) -> CaptionFormat | None:
    """The registered format of ``path`` (the first whose ``detect`` accepts it), or None."""
    path = Path(path)
    return next((f for f in CAPTION_FORMATS.values() if f.detect(path)), None)


def _read_json_dataset(path: Path, split: str, image_root, on_error: OnError) -> CaptionDataset:
    data = _load_json(path)
    root = image_root if image_root is not None else _json_image_root(path, data)
    if "annotations" in data:
        return read_coco(path, root, split, on_error=on_error)
    return read_karpathy(path, root, split, on_error=on_error)


register_caption_format(
    "flickr8k", lambda p: p.is_dir() and ((p / "captions.txt").is_file() or (p / "Flickr8k.token.txt").is_file()),
    lambda p, split, image_root, on_error: read_flickr8k(p, split, on_error=on_error))
register_caption_format("coco-or-karpathy-json", lambda p: p.is_file() and p.suffix == ".json", _read_json_dataset)
register_caption_format("pairs", lambda p: p.is_file() and p.suffix in (".csv", ".tsv", ".tab", ".jsonl"),
                        lambda p, split, image_root, on_error: read_pairs(p, image_root, split, on_error=on_error))


def load_caption_dataset(spec: str | Path, split: str = "test", *, image_root: str | Path | None = None,
                         on_error: OnError = "raise") -> CaptionDataset:
    """Open any supported dataset by path, detecting its format (:data:`CAPTION_FORMATS`):

    - a folder with ``captions.txt`` or ``Flickr8k.token.txt``: Flickr8k;
    - ``*.json``: Karpathy (``images[].sentences``) or COCO captions (``annotations``);
    - ``*.csv``/``*.tsv``/``*.jsonl``: generic pairs.
    """
    path = Path(spec)
    fmt = detect_caption_format(path)
    if fmt is not None:
        return fmt.read(path, split, image_root, on_error)
    if path.is_dir():
        raise DataError(f"{path}: folder has no captions.txt or Flickr8k.token.txt")
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    raise DataError(f"{path}: unsupported dataset format (folder, .json, .csv, .tsv or .jsonl)")


def check_disjoint_splits(path: str | Path, splits: dict[str, str], *, image_root: str | Path | None = None) -> None:
    """Each named split (``role -> split name``) is non-empty and no two share an image: a ConfigError naming the
    data, both splits and an example otherwise (checked before any long work)."""
    images = {}
    for role, split in splits.items():
        ds = load_caption_dataset(path, split, image_root=image_root, on_error="skip")
        if ds.num_images == 0:
            raise ConfigError(f"{path}: the {role} split ({split!r}) has no images")
        images[role] = {str(p.resolve()) for p in ds.image_paths()}
    roles = list(splits)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            shared = images[a] & images[b]
            if shared:
                raise ConfigError(f"{path}: the {a} split ({splits[a]!r}) and the {b} split ({splits[b]!r}) share "
                                  f"{len(shared)} image(s), e.g. {sorted(shared)[0]}; they must be disjoint")


SUBSET_COLUMN = "cliplab_subset_of"  # the mark of a CSV cliplab wrote: a column naming the source dataset


def write_caption_csv(path: str | Path, splits: dict[str, CaptionDataset], source: str = "") -> Path:
    """One ``image,caption,split`` CSV (absolute image paths) holding the given splits: a subset of a dataset
    that training configs, ``eval`` and the notebook API read like any other (``data.path``). Its extra column
    ``cliplab_subset_of`` (``source``) marks it as cliplab's: an existing file is replaced only when it
    carries the mark or already holds exactly these rows."""
    rows = []
    for split, ds in splits.items():
        paths = ds.image_paths()
        rows += [(str(paths[i].resolve()), caption, split) for caption, i in zip(ds.captions, ds.caption_image)]
    text = _csv_text([("image", "caption", "split", SUBSET_COLUMN)] + [(*r, source) for r in rows])
    legacy = _csv_text([("image", "caption", "split")] + rows)  # the same rows as written before the mark
    refuse_foreign_file(path, lambda p: _is_own_csv(p) or p.read_bytes() == legacy.encode(), "out")
    return write_text(Path(path), text)


def _csv_text(table: list[tuple]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(table)
    return buf.getvalue()


def _is_own_csv(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return SUBSET_COLUMN in next(csv.reader([f.readline()]), [])
