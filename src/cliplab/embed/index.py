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


class VectorIndex:
    """A FAISS inner-product index; ``search`` returns (scores, ids) of the top k."""

    def __init__(self, index, normalize: bool = True) -> None:
        self.index = index
        self.normalize = normalize

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "flat", *, normalize: bool = True, nlist: int | None = None,
              nprobe: int = 16, hnsw_m: int = 32, batch_size: int = 65536, seed: int = 0) -> "VectorIndex":
        faiss = require("faiss")

        n, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))
            index.train(cls._prep(vectors[sample], normalize))
            index.nprobe = min(nprobe, nlist)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ConfigError(f"index kind must be flat, ivf or hnsw, not {kind!r}")
        for s in range(0, n, batch_size):
            index.add(cls._prep(vectors[s:s + batch_size], normalize))
        return cls(index, normalize)

    @staticmethod
    def _prep(x: np.ndarray, normalize: bool) -> np.ndarray:
        x = np.array(x, dtype=np.float32, order="C")
        if normalize:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        q = self._prep(np.atleast_2d(queries), self.normalize)
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
