"""cliplab: learn and evaluate shared image-text embedding spaces."""

from importlib import metadata as _metadata

from cliplab.errors import CliplabError

try:
    __version__ = _metadata.version("cliplab")  # from the installed package's metadata (pyproject.toml)
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_API = ("load_model", "zeroshot", "probe", "evaluate", "sweep", "report", "Index", "datasets")
_CALLABLE_PACKAGES = ("train", "caption")  # packages that are also verbs: cliplab.train(...), cliplab.caption.train(...)
__all__ = ["CliplabError", "__version__", *_API, *_CALLABLE_PACKAGES]


def __getattr__(name: str):
    """The notebook API (:mod:`cliplab.api`), imported on first use so ``import cliplab`` stays light."""
    if name in _API:
        from cliplab import api

        return getattr(api, name)
    if name in _CALLABLE_PACKAGES:
        import importlib

        return importlib.import_module(f"cliplab.{name}")
    raise AttributeError(f"module 'cliplab' has no attribute {name!r}")
