"""Image decoding with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cliplab.errors import DataError
from cliplab.utils import sha256_files


SAFE_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # what uploads and indexing decode by default
FORMAT_EXTENSIONS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "BMP": (".bmp",),
                     "GIF": (".gif",), "TIFF": (".tif", ".tiff")}


def check_formats(formats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Pillow format names, upper-cased; unknown ones refused (a typo would otherwise skip every image)."""
    out = tuple(f.upper() for f in formats)
    unknown = [f for f in out if f not in FORMAT_EXTENSIONS]
    if unknown or not out:
        raise DataError(f"image formats must be among {', '.join(FORMAT_EXTENSIONS)}, not {', '.join(unknown) or 'none'}")
    return out


def draft_short_side(im: Image.Image, side: int) -> None:
    """Let a JPEG decode at 1/2-1/8 scale (PIL draft mode) while its short side stays >= ``side``."""
    w, h = im.size
    short = max(1, min(w, h))
    im.draft("RGB", (-(-side * w // short), -(-side * h // short)))


def load_rgb(path: str | Path, draft_size: int | None = None, max_pixels: int | None = None,
             formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open an image as RGB, fully decoded; raise :class:`DataError` naming the file when it is missing or corrupt.

    ``draft_size`` lets the JPEG decoder downscale large files by 1/2-1/8 while decoding (PIL draft mode),
    never below ``draft_size`` on either side. ``max_pixels`` refuses images whose header declares more
    pixels (decompression bombs) before anything is decoded; PIL's own bomb limit always applies.
    ``formats`` limits the decoders Pillow may use (e.g. :data:`SAFE_IMAGE_FORMATS`: no EPS/PSD/TIFF parsers).
    """
    path = Path(path)
    try:
        with Image.open(path, formats=formats) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise DataError(f"image too large: {path} ({w}x{h} pixels, limit {max_pixels})")
            if draft_size and im.format == "JPEG":
                draft_short_side(im, draft_size)
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image too large: {path} ({exc})") from None
    except UnidentifiedImageError:
        allowed = f" (or not one of {', '.join(formats)})" if formats else ""
        raise DataError(f"corrupt image: {path}: not a readable image{allowed}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"corrupt image: {path} ({exc.__class__.__name__}: {exc})") from None


EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATE_TAKEN, DATE_CHANGED, MAKE, MODEL, ORIENTATION = 0x9003, 0x0132, 0x010F, 0x0110, 0x0112
NO_FACTS = {"taken": None, "camera": None, "orientation": 1, "gps": False}  # an image whose EXIF says nothing


def photo_facts(im: Image.Image) -> dict:
    """What an opened image's EXIF says (read from the header, nothing decoded): ``taken`` (ISO date-time of
    DateTimeOriginal, else DateTime; None when absent or malformed), ``camera`` ("Make Model"; None), the
    ``orientation`` tag (1-8, 1 when absent) and ``gps`` (whether GPS data is recorded)."""
    import datetime

    try:
        exif = im.getexif()
        sub = exif.get_ifd(EXIF_IFD)
        gps = bool(exif.get_ifd(GPS_IFD))
    except Exception:  # noqa: BLE001 - a damaged EXIF block only means no facts
        return dict(NO_FACTS)
    taken = None
    for raw in (sub.get(DATE_TAKEN), exif.get(DATE_CHANGED)):
        try:
            taken = datetime.datetime.strptime(str(raw).strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
            break
        except (TypeError, ValueError):
            continue
    make, model = (str(exif.get(t) or "").strip("\x00 ") for t in (MAKE, MODEL))
    camera = (model if make and model.lower().startswith(make.lower().split()[0]) else f"{make} {model}").strip()
    orientation = exif.get(ORIENTATION)
    return {"taken": taken, "camera": camera[:200] or None,
            "orientation": orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1, "gps": gps}


def preprocess_geometry(transform) -> tuple[int, tuple, tuple]:
    """The one crop-size rule: ``(size, mean, std)`` of an eval transform (torchvision ``Compose``): the
    centre-crop size (else the resize size, else 224) and the normalisation (else mean = std = 0.5)."""
    import torchvision.transforms as T

    steps = list(getattr(transform, "transforms", []))
    crops = [t.size for t in steps if isinstance(t, T.CenterCrop)]
    resizes = [t.size for t in steps if isinstance(t, T.Resize)]
    size = crops[0] if crops else resizes[0] if resizes else 224
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    norm = [t for t in steps if isinstance(t, T.Normalize)]
    if not norm:
        return size, (0.5,) * 3, (0.5,) * 3
    return size, tuple(float(x) for x in norm[0].mean), tuple(float(x) for x in norm[0].std)


class ImageSet:
    """An indexable collection of images: ``load(i)`` gives RGB, ``keys()`` identifies content for caches."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    def item_ids(self) -> list[str]:
        """One identity per image (a resolved path, or source + original index): two sets share an image
        exactly when they share an id (train/test disjointness checks)."""
        raise NotImplementedError

    def content_keys(self) -> list[str] | None:
        """One cache key per image (None where the set has only a whole-set key): lets the feature store
        reuse finished chunks after the set changes."""
        return None

    def source_file(self, i: int) -> Path | None:
        """The file whose bytes are image ``i`` (its content digest is its cache key), or None."""
        return None

    def stat_keys(self) -> list[str] | None:
        """The keys of cliplab before content digests, where they differ from :meth:`keys` (files: path, size,
        mtime): to find features cached by it. None otherwise."""
        return None


class ImageFiles(ImageSet):
    """Images on disk; the cache key of each is the SHA-256 of its bytes (:func:`cliplab.utils.sha256_files`,
    remembered per path + size + mtime + inode): the same images under new paths or times share cached features,
    a changed file does not."""

    def __init__(self, paths, draft_size: int | None = None, max_pixels: int | None = None,
                 formats: tuple[str, ...] | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.draft_size = draft_size
        self.max_pixels = max_pixels
        self.formats = formats

    def __len__(self) -> int:
        return len(self.paths)

    def with_draft(self, size: int) -> "ImageFiles":
        out = type(self).__new__(type(self))  # subclasses keep their behaviour and attributes
        out.__dict__.update(self.__dict__)
        out.draft_size = size
        return out

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i], self.draft_size, self.max_pixels, self.formats)

    def item_ids(self) -> list[str]:
        return [str(p.resolve()) for p in self.paths]

    def content_keys(self) -> list[str]:
        return self.keys()

    def source_file(self, i: int) -> Path:
        return self.paths[i]

    def keys(self) -> list[str]:
        return [f"sha256:{d}" if d else f"{p}|missing" for p, d in zip(self.paths, sha256_files(self.paths))]

    def stat_keys(self) -> list[str]:
        import os

        out = []
        for p in self.paths:
            try:
                st = os.stat(p)
                out.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
            except OSError:
                out.append(f"{p}|missing")
        return out


class ImageArrays(ImageSet):
    """Images held as a ``[N, H, W, 3]`` uint8 array (e.g. CIFAR pickles); ``source`` names their origin."""

    def __init__(self, arrays, source: str, indices=None) -> None:
        import numpy as np

        self.arrays = np.asarray(arrays, dtype=np.uint8)
        self.source = source
        self.indices = list(range(len(self.arrays))) if indices is None else [int(i) for i in indices]

    def item_ids(self) -> list[str]:
        return [f"{self.source}#{i}" for i in self.indices]

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.arrays[i], "RGB")

    def keys(self) -> list[str]:
        import hashlib

        digest = hashlib.sha256(self.arrays.tobytes()).hexdigest()
        return [f"{self.source}|{digest}|{len(self.arrays)}"]


class MirroredImages(ImageSet):
    """The horizontal mirror of every image of another set (for flip test-time augmentation)."""

    def __init__(self, inner: ImageSet) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, i: int) -> Image.Image:
        return self.inner.load(i).transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def keys(self) -> list[str]:
        return ["hflip"] + self.inner.keys()

    def content_keys(self) -> list[str] | None:
        inner = self.inner.content_keys()
        return None if inner is None else [f"hflip|{k}" for k in inner]

    def source_file(self, i: int) -> Path | None:
        return self.inner.source_file(i)

    def stat_keys(self) -> list[str] | None:
        inner = self.inner.stat_keys()
        return None if inner is None else ["hflip"] + inner

    def item_ids(self) -> list[str]:
        return self.inner.item_ids()
