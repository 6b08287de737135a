"""Image decoding with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cliplab.errors import DataError


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB, fully decoded; raise :class:`DataError` naming the file when it is missing or corrupt."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"corrupt image: {path} ({exc.__class__.__name__}: {exc})") from None
