"""Duplicate photos in an index: exact groups (same content hash) and near groups (embeddings whose cosine
similarity is at least a threshold, joined into connected components). cliplab only reports them: the
review page marks what to keep and exports a list; no photo is ever deleted or moved by cliplab.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cliplab.errors import CliplabError

# Near-duplicate cosine threshold, chosen on a planted set built from Flickr8k dev (200 images with five edited
# copies each among 1,000) by `python bench/duplicates.py -m runs/demo` (highest F1 over pairs) for the trained
# two-tower heads the README indexes photos with; BENCHMARKS.md `duplicates.precision` / `duplicates.recall` are
# measured at it on the same construction over test. ConSE's space (class probabilities) cannot tell an edited
# copy from another photo of the same things (best dev F1 0.32): `find_duplicates` says so for such an index.
UNRELIABLE_MODELS = {"conse": "best planted-set F1 0.32"}
NEAR_THRESHOLD = 0.82
NEIGHBOURS = 20  # nearest neighbours examined per photo (a group links through chains of them)

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, depth) -> (scores, rows)


def flat_search(vectors: np.ndarray) -> Search:
    """Exact inner-product search over ``vectors`` (FAISS ``IndexFlatIP``)."""
    from cliplab.extras import require

    faiss = require("faiss")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return lambda queries, depth: index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)


def near_groups(vectors: np.ndarray, threshold: float, *, neighbours: int = NEIGHBOURS, search: Search | None = None,
                batch: int = 4096) -> list[list[int]]:
    """Rows of unit ``vectors`` grouped by similarity: connected components of the graph linking each row to
    those of its ``neighbours`` nearest with cosine >= ``threshold``; groups of two or more, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not 0.0 < threshold <= 1.0:
        raise CliplabError(f"--threshold must be in (0, 1], not {threshold}")
    n = len(vectors)
    if n < 2:
        return []
    search = search or flat_search(vectors)
    depth = min(n, neighbours + 1)
    src, dst = [], []
    for start in range(0, n, batch):
        scores, rows = search(np.asarray(vectors[start:start + batch], dtype=np.float32), depth)
        hit = (scores >= threshold) & (rows >= 0)
        r, c = np.nonzero(hit)
        src.append(r + start)
        dst.append(rows[r, c])
    src, dst = np.concatenate(src), np.concatenate(dst)
    keep = src != dst
    graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (src[keep], dst[keep])), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        members[int(label)].append(row)
    groups = [g for g in members.values() if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def pair_scores(groups: list[list[int]], families: list[list[int]]) -> dict:
    """Precision and recall over pairs: a pair is predicted when both rows share a group and true when they
    share a family (e.g. an original and its planted copies)."""
    def pairs(sets: list[list[int]]) -> set[tuple[int, int]]:
        return {(a, b) for s in sets for i, a in enumerate(sorted(s)) for b in sorted(s)[i + 1:]}

    predicted, true = pairs(groups), pairs(families)
    hits = len(predicted & true)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(true) if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted_pairs": len(predicted),
            "true_pairs": len(true)}


@dataclass
class DuplicateReport:
    """Exact and near groups of one index; each item has id, path, file, width, height, size and ``keep``
    (a suggestion: the most pixels, then the largest file, then the first path)."""

    index: str
    threshold: float
    images: int
    model: str = ""
    warning: str | None = None
    exact: list[list[dict]] = field(default_factory=list)
    near: list[list[dict]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"index": self.index, "model": self.model, "threshold": self.threshold, "images": self.images,
                "neighbours": NEIGHBOURS, "warning": self.warning, "exact": self.exact, "near": self.near,
                "note": "cliplab never deletes photos: review the groups and remove files yourself"}

    def suggested_removals(self) -> list[str]:
        """Files of every grouped photo not suggested to keep (exact groups first, each file once)."""
        seen, out = set(), []
        for group in [*self.exact, *self.near]:
            for item in group:
                if not item["keep"] and item["file"] not in seen:
                    seen.add(item["file"])
                    out.append(item["file"])
        return out


def _described(group_ids: list[int], items: dict[int, dict], roots: list[Path],
               vector_of: Callable[[int], np.ndarray] | None = None) -> list[dict]:
    """A group's items, the suggested keeper first; near groups also get each item's cosine similarity to it."""
    group = [{"id": i, "root": items[i]["root"], "path": items[i]["path"],
              "file": str(roots[items[i]["root"]] / items[i]["path"]),
              "width": items[i]["width"], "height": items[i]["height"], "size": items[i]["size"],
              "sha256": items[i]["sha256"]} for i in group_ids]
    best = max(group, key=lambda it: (it["width"] * it["height"], it["size"], [-ord(ch) for ch in it["path"]]))
    for item in group:
        item["keep"] = item is best
        if vector_of is not None:
            item["similarity"] = round(float(vector_of(item["id"]) @ vector_of(best["id"])), 6)
    return sorted(group, key=lambda it: (not it["keep"], it["path"]))


def find_duplicates(index, threshold: float = NEAR_THRESHOLD, neighbours: int = NEIGHBOURS) -> DuplicateReport:
    """Exact and near duplicate groups of a :class:`~cliplab.serve.index.PhotoIndex` (or its folder), found
    through the index's own FAISS search; near groups that are one exact group are reported once, as exact."""
    from cliplab.serve.index import PhotoIndex

    index = index if isinstance(index, PhotoIndex) else PhotoIndex(index)
    items = index.all_items()
    by_hash: dict[str, list[int]] = defaultdict(list)
    for item_id, item in items.items():
        by_hash[item["sha256"]].append(item_id)
    exact = sorted((sorted(g) for g in by_hash.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    vectors = np.asarray(index.vectors, dtype=np.float32)
    rows = near_groups(vectors, threshold, neighbours=neighbours, search=index.faiss.search)
    model = str(index.info["model"])
    warning = next((f"near groups under {model!r} are unreliable ({why}); index with a trained model, e.g. "
                    "-m runs/demo" for name, why in UNRELIABLE_MODELS.items()
                    if model == name or model.startswith(name + ":")), None)
    report = DuplicateReport(str(index.folder), threshold, len(index), model=model, warning=warning,
                             exact=[_described(g, items, index.roots) for g in exact])
    for group_rows in rows:
        ids = [int(index.row_to_id[r]) for r in group_rows]
        if len({items[i]["sha256"] for i in ids}) == 1:
            continue  # byte-identical copies only: already an exact group
        report.near.append(_described(ids, items, index.roots, vector_of=lambda i: vectors[index.id_to_row[i]]))
    return report


def write_removal_list(path: str | Path, report: DuplicateReport) -> Path:
    """Write :meth:`DuplicateReport.suggested_removals` to a new file (an existing one is never overwritten)."""
    from cliplab.utils import atomic_write

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise CliplabError(f"{path} exists; give a new file name for the list (cliplab never overwrites your files)")
    lines = "".join(f"{f}\n" for f in report.suggested_removals())
    return atomic_write(path, lambda p: p.write_text(lines, encoding="utf-8"))
