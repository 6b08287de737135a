"""Hybrid search: do words stored with the photos help, and by how much, against embeddings alone?

    python bench/hybrid.py [-m conse] [--data ../shared/data/flickr8k]

Protocol (``search.hybrid.r1`` / ``search.semantic.r1``, R@10, MRR): for a split, an index is built (``cliplab
index`` on a CSV caption dataset) from its 1,000 images with **four** of each image's five captions stored as the
photos' text (as a photo library's descriptions or tags would be); the fifth caption of each image is its query
(1,000 queries, each with one relevant photo). Every query is ranked by the library's own ``ranked_hits`` in
``semantic``, ``keyword`` (BM25 over the stored words) and ``hybrid`` (reciprocal rank fusion) modes, to depth
1,000. The fusion constant and the default mode are chosen on **dev** (R@1, then MRR), then test is scored once.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_and_data_args, save, table  # noqa: E402

CONSTANTS = (1, 5, 10, 20, 30, 60, 100)


def split_index(data: Path, split: str, model: str, folder: Path):
    """An index of the split's images with captions 0-3 stored, and the held-out caption of each image."""
    from cliplab.data.captions import load_caption_dataset
    from cliplab.serve.index import IndexBuilder, PhotoIndex

    ds = load_caption_dataset(data, split)
    csv_path = folder / f"{split}.csv"
    queries = []
    with open(csv_path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["image", "caption"])
        for i, rel in enumerate(ds.images):
            caps = [ds.captions[c] for c in ds.captions_of(i)]
            writer.writerows([str(ds.image_root / rel), c] for c in caps[:4])
            queries.append((caps[4], rel))
    IndexBuilder(folder / f"{split}-index", model, log=lambda m: None, progress=False).build([csv_path])
    return PhotoIndex(folder / f"{split}-index"), queries


def ranks(index, queries, vectors, mode: str, constant: float) -> np.ndarray:
    """0-based rank of each query's photo (1,000 when it is not in the list at all)."""
    import cliplab.serve.query as query

    query.RRF_CONSTANT = constant  # ranked_hits reads the module constant through fuse_rankings' default
    by_name = {Path(it["path"]).name: i for i, it in index.all_items().items()}  # Flickr8k names are unique
    out = []
    for (text, rel), vector in zip(queries, vectors):
        hits = [h["id"] for h in query.ranked_hits(index, vector, text, 1000, mode=mode)]
        target = by_name[Path(rel).name]
        out.append(hits.index(target) if target in hits else 1000)
    return np.array(out)


def metrics(r: np.ndarray) -> dict:
    return {"r1": 100 * float((r < 1).mean()), "r5": 100 * float((r < 5).mean()),
            "r10": 100 * float((r < 10).mean()), "mrr": float((1.0 / (r + 1)).mean())}


def main() -> None:
    import cliplab
    import cliplab.serve.query as query
    from cliplab.embed.pipeline import text_embeddings

    args = model_and_data_args(__doc__)
    model = cliplab.load_model(args.model)
    default_constant, default_mode = query.RRF_CONSTANT, query.DEFAULT_MODE
    with tempfile.TemporaryDirectory(prefix="cliplab-hybrid-") as tmp:
        dev, dev_queries = split_index(args.data, "dev", args.model, Path(tmp))
        dev_vectors = text_embeddings(model, [q for q, _ in dev_queries])
        rows, grid = [], {}
        for mode in ("semantic", "keyword"):
            grid[(mode, None)] = metrics(ranks(dev, dev_queries, dev_vectors, mode, default_constant))
        for c in CONSTANTS:
            grid[("hybrid", c)] = metrics(ranks(dev, dev_queries, dev_vectors, "hybrid", c))
        for (mode, c), m in grid.items():
            rows.append((mode, c or "", f"{m['r1']:.2f}", f"{m['r10']:.2f}", f"{m['mrr']:.4f}"))
        print(f"dev ({len(dev_queries)} held-out captions as queries, {len(dev)} photos with 4 captions each):")
        print(table(rows, ("mode", "RRF constant", "R@1", "R@10", "MRR")))
        mode, constant = max(grid, key=lambda mc: (round(grid[mc]["r1"], 6), grid[mc]["mrr"]))
        constant = constant or default_constant
        test, test_queries = split_index(args.data, "test", args.model, Path(tmp))
        test_vectors = text_embeddings(model, [q for q, _ in test_queries])
        scored = {m: metrics(ranks(test, test_queries, test_vectors, m, constant))
                  for m in ("semantic", "keyword", "hybrid")}
    print(f"chosen on dev: mode {mode}, RRF constant {constant} (library: {default_mode}, {default_constant}: "
          f"{'the same' if (mode, constant) == (default_mode, default_constant) else 'DIFFERENT - update it'})")
    print(f"test ({len(test_queries)} queries), scored once:")
    print(table([(m, f"{v['r1']:.2f}", f"{v['r5']:.2f}", f"{v['r10']:.2f}", f"{v['mrr']:.4f}")
                 for m, v in scored.items()], ("mode", "R@1", "R@5", "R@10", "MRR")))
    save("hybrid" if args.model == "conse" else f"hybrid_{Path(args.model).name}",
         {"model": args.model, "chosen_on_dev": {"mode": mode, "rrf_constant": constant},
          "library": {"mode": default_mode, "rrf_constant": default_constant},
          "dev_grid": [{"mode": m, "rrf_constant": c, **v} for (m, c), v in grid.items()],
          "test": scored, "machine": machine()})


if __name__ == "__main__":
    main()
