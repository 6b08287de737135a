"""FAISS indexes over feature stores, for search in large galleries.

``flat`` is exact inner product (cosine on normalised vectors); ``ivf`` (inverted lists) and ``hnsw``
(graph) trade a little recall for speed on very large galleries. Vectors are added in batches, so a
memory-mapped store is indexed without loading it whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cliplab.errors import ConfigError
from cliplab.extras import require
from cliplab.utils import atomic_write


def build_faiss(vectors: np.ndarray, kind: str = "flat", *, normalize: bool = False, nlist: int | None = None,
                nprobe: int = 16, hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64,
                batch_size: int = 65536, seed: int = 0):
    """The one FAISS inner-product index factory (the photo index and :class:`VectorIndex`): ``flat`` (exact),
    ``ivf`` (``nlist`` lists, default 4 sqrt(N), trained on a sorted sample) or ``hnsw``; vectors added in
    batches (a memory-mapped store is never loaded whole)."""
    faiss = require("faiss")

    n, dim = vectors.shape
    if kind == "flat" or (kind == "ivf" and n == 0):
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 256 * nlist), replace=False))
        index.train(_as_queries(vectors[sample], normalize))
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ConfigError(f"index kind must be flat, ivf or hnsw, not {kind!r}")
    for s in range(0, n, batch_size):
        index.add(_as_queries(vectors[s:s + batch_size], normalize))
    return index


def _as_queries(x: np.ndarray, normalize: bool) -> np.ndarray:
    """float32, C-ordered (what FAISS takes), unit-norm rows when asked."""
    x = np.array(x, dtype=np.float32, order="C")
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


class VectorIndex:
    """A FAISS inner-product index; ``search`` returns (scores, ids) of the top k."""

    def __init__(self, index, normalize: bool = True) -> None:
        self.index = index
        self.normalize = normalize

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "flat", *, normalize: bool = True, nlist: int | None = None,
              nprobe: int = 16, hnsw_m: int = 32, batch_size: int = 65536, seed: int = 0) -> "VectorIndex":
        index = build_faiss(vectors, kind, normalize=normalize, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                            batch_size=batch_size, seed=seed)
        return cls(index, normalize)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(np.atleast_2d(queries), self.normalize)
        return self.index.search(q, min(k, len(self)))

    def save(self, path: str | Path) -> Path:
        faiss = require("faiss")

        return atomic_write(path, lambda p: faiss.write_index(self.index, str(p)))

    @classmethod
    def load(cls, path: str | Path, normalize: bool = True) -> "VectorIndex":
        faiss = require("faiss")

        if not Path(path).is_file():
            raise ConfigError(f"index not found: {path}")
        return cls(faiss.read_index(str(path)), normalize)
