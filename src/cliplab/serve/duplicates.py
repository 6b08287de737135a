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
Graph = tuple[np.ndarray, np.ndarray]  # (scores [n, depth], rows [n, depth]) of each row's nearest neighbours


def flat_search(vectors: np.ndarray) -> Search:
    """Exact inner-product search over ``vectors`` (FAISS ``IndexFlatIP``)."""
    from cliplab.extras import require

    faiss = require("faiss")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return lambda queries, depth: index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise CliplabError(f"the near-duplicate threshold must be in (0, 1], not {threshold}")
    return float(threshold)


def neighbour_graph(vectors: np.ndarray, *, neighbours: int = NEIGHBOURS, search: Search | None = None,
                    batch: int = 4096) -> Graph:
    """Each row's ``neighbours`` nearest rows and their similarities (computed once, then thresholded at will)."""
    n = len(vectors)
    search = search or flat_search(vectors)
    depth = min(n, neighbours + 1)
    parts = [search(np.asarray(vectors[b:b + batch], dtype=np.float32), depth) for b in range(0, n, batch)]
    return (np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, depth), np.float32),
            np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, depth), np.int64))


def groups_from_graph(graph: Graph, threshold: float) -> list[list[int]]:
    """Connected components of the neighbour links at cosine >= ``threshold``: groups of two or more rows,
    largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    check_threshold(threshold)
    scores, rows = graph
    n = len(rows)
    if n < 2:
        return []
    src, col = np.nonzero((scores >= threshold) & (rows >= 0))
    dst = rows[src, col]
    keep = src != dst
    links = coo_matrix((np.ones(int(keep.sum()), np.int8), (src[keep], dst[keep])), shape=(n, n))
    _, labels = connected_components(links, directed=False)
    members: dict[int, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        members[int(label)].append(row)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def near_groups(vectors: np.ndarray, threshold: float, *, neighbours: int = NEIGHBOURS, search: Search | None = None,
                batch: int = 4096) -> list[list[int]]:
    """Rows of unit ``vectors`` grouped by similarity: connected components of the graph linking each row to
    those of its ``neighbours`` nearest with cosine >= ``threshold``; groups of two or more, largest first."""
    check_threshold(threshold)
    if len(vectors) < 2:
        return []
    return groups_from_graph(neighbour_graph(vectors, neighbours=neighbours, search=search, batch=batch), threshold)


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
    """Exact and near groups of one index. Each item has id, root, path, file, width, height, size, ``keep``
    (the group's keeper: most pixels, then largest file, then path) and ``suggest``: ``keep``, ``remove`` (a
    copy; near groups: at least the threshold similar to the keeper) or ``review`` (linked to the group only
    through others); near items also ``similarity`` to the keeper. One file indexed twice (overlapping roots,
    a symlink inside a root) is one photo: its other paths are listed as ``aliases`` and never suggested."""

    index: str
    threshold: float
    images: int
    model: str = ""
    warning: str | None = None
    exact: list[list[dict]] = field(default_factory=list)
    near: list[list[dict]] = field(default_factory=list)
    near_skipped: bool = False

    def to_dict(self) -> dict:
        return {"index": self.index, "model": self.model, "threshold": self.threshold, "images": self.images,
                "neighbours": NEIGHBOURS, "warning": self.warning, "near_skipped": self.near_skipped,
                "exact": self.exact, "near": self.near,
                "note": "cliplab never deletes photos: review the groups and remove files yourself"}

    def suggested_removals(self) -> list[str]:
        """Files suggested for removal (exact groups first, each file once), never one that any group keeps."""
        kept = {it["file"] for g in [*self.exact, *self.near] for it in g if it["suggest"] != "remove"}
        return list(dict.fromkeys(it["file"] for g in [*self.exact, *self.near] for it in g
                                  if it["suggest"] == "remove" and it["file"] not in kept))


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()  # follows symlinks: the file itself
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _physical_files(index, items: dict[int, dict]) -> dict[int, list[str]]:
    """One representative item per physical file (real paths before symlinks, then by root and path), with the
    other paths that lead to the same file; items whose file is gone stand for themselves."""
    def key(i: int):
        path = index.roots[items[i]["root"]] / items[i]["path"]
        return (path.is_symlink(), items[i]["root"], items[i]["path"], i)

    first: dict[tuple[int, int], int] = {}
    aliases: dict[int, list[str]] = {}
    for i in sorted(items, key=key):
        ident = _file_identity(index.roots[items[i]["root"]] / items[i]["path"])
        if ident is not None and ident in first:
            aliases[first[ident]].append(str(index.roots[items[i]["root"]] / items[i]["path"]))
        else:
            aliases[i] = []
            if ident is not None:
                first[ident] = i
    return aliases


def _described(group_ids: list[int], items: dict[int, dict], roots: list[Path], aliases: dict[int, list[str]],
               threshold: float | None = None, vector_of: Callable[[int], np.ndarray] | None = None) -> list[dict]:
    """A group's items, the keeper first (a total order: most pixels, largest file, path, root, id)."""
    group = [{"id": i, "root": items[i]["root"], "path": items[i]["path"],
              "file": str(roots[items[i]["root"]] / items[i]["path"]), "aliases": aliases.get(i, []),
              "width": items[i]["width"], "height": items[i]["height"], "size": items[i]["size"],
              "sha256": items[i]["sha256"]} for i in group_ids]
    best = min(group, key=lambda it: (-it["width"] * it["height"], -it["size"], it["path"], it["root"], it["id"]))
    for item in group:
        item["keep"] = item is best
        item["suggest"] = "keep" if item is best else "remove"
        if vector_of is not None:
            item["similarity"] = round(float(vector_of(item["id"]) @ vector_of(best["id"])), 6)
            if item is not best and item["similarity"] < threshold:
                item["suggest"] = "review"  # in the group only through a chain of other photos
    return sorted(group, key=lambda it: (not it["keep"], it["path"], it["root"]))


def unreliable_warning(model: str) -> str | None:
    return next((f"near groups under {model!r} are unreliable ({why}), so only exact duplicates are listed "
                 "unless a threshold is given; index with a trained model, e.g. -m runs/demo"
                 for name, why in UNRELIABLE_MODELS.items() if model == name or model.startswith(name + ":")), None)


def find_duplicates(index, threshold: float | None = None, neighbours: int = NEIGHBOURS,
                    graph: Graph | None = None) -> DuplicateReport:
    """Exact and near duplicate groups of a :class:`~cliplab.serve.index.PhotoIndex` (or its folder), found
    through the index's own FAISS search (``graph``: its neighbour graph, computed before). ``threshold`` None:
    :data:`NEAR_THRESHOLD`, and no near groups for a model that cannot find them (:data:`UNRELIABLE_MODELS`).
    Near groups are formed over one photo per content (exact copies are in the exact groups)."""
    from cliplab.serve.index import PhotoIndex

    index = index if isinstance(index, PhotoIndex) else PhotoIndex(index)
    model = str(index.info["model"])
    warning = unreliable_warning(model)
    skip_near = threshold is None and warning is not None
    threshold = check_threshold(NEAR_THRESHOLD if threshold is None else threshold)
    items = index.all_items()
    aliases = _physical_files(index, items)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for item_id in sorted(aliases):
        by_hash[items[item_id]["sha256"]].append(item_id)
    report = DuplicateReport(str(index.folder), threshold, len(index), model=model, warning=warning,
                             near_skipped=skip_near,
                             exact=[_described(g, items, index.roots, aliases)
                                    for g in sorted((g for g in by_hash.values() if len(g) > 1),
                                                    key=lambda g: (-len(g), g[0]))])
    if skip_near:
        return report
    vectors = np.asarray(index.vectors, dtype=np.float32)
    graph = graph if graph is not None else neighbour_graph(vectors, neighbours=neighbours, search=index.faiss.search)
    firsts = {g[0] for g in by_hash.values()}  # one item per content
    for group_rows in groups_from_graph(graph, threshold):
        ids = [i for i in (int(index.row_to_id[r]) for r in group_rows) if i in firsts]
        if len(ids) > 1:
            report.near.append(_described(ids, items, index.roots, aliases, threshold,
                                          vector_of=lambda i: vectors[index.id_to_row[i]]))
    return report


def check_removal_list(path: str | Path) -> None:
    """Before the search: the list goes to a new file in an existing folder."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CliplabError(f"{path.parent} is not a folder; give the list a file name in an existing folder")
    if path.exists() or path.is_symlink():
        raise CliplabError(f"{path} exists; give a new file name for the list (cliplab never overwrites your files)")


def write_removal_list(path: str | Path, report: DuplicateReport) -> Path:
    """Write :meth:`DuplicateReport.suggested_removals` to a new file in an existing folder: written beside it,
    fsynced, then hard-linked into place, so an existing file (even one created meanwhile) is never replaced."""
    import os
    import secrets

    from cliplab.utils import fsync_dir

    path = Path(path)
    check_removal_list(path)
    tmp = path.parent / f".{path.name}.cliplab-{secrets.token_hex(8)}.tmp"
    with open(tmp, "x", encoding="utf-8") as out:
        out.writelines(f"{f}\n" for f in report.suggested_removals())
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CliplabError(f"{path} exists; give a new file name for the list (cliplab never overwrites your "
                           "files)") from None
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return path
