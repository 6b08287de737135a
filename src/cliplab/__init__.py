"""cliplab: learn and evaluate shared image-text embedding spaces."""

from importlib import metadata as _metadata

from cliplab.errors import CliplabError

try:
    __version__ = _metadata.version("cliplab")  # from the installed package's metadata (pyproject.toml)
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["CliplabError", "__version__"]
