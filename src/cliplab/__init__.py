"""cliplab: learn and evaluate shared image-text embedding spaces."""

from cliplab.errors import CliplabError

__version__ = "0.1.0"

__all__ = ["CliplabError", "__version__"]
