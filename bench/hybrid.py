"""Hybrid search: do words stored with the photos help, and by how much, against embeddings alone?

    python bench/hybrid.py [-m conse] [--data ../shared/data/flickr8k]

Protocol (``search.hybrid.r1`` / ``search.semantic.r1``, R@10, MRR): for a split, an index is built (``cliplab
index`` on a CSV caption dataset) from its 1,000 images with **four** of each image's five captions stored as the
photos' text (as a photo library's descriptions or tags would be); the fifth caption of each image is its query
(1,000 queries, each with one relevant photo). Every query is ranked by the library's own ``ranked_hits`` in
``semantic``, ``keyword`` (BM25 over the stored words) and ``hybrid`` (reciprocal rank fusion) modes, to depth
1,000. The fusion constant, the keyword list's weight and the default mode (semantic or hybrid: the default must
answer every query, and keyword mode finds nothing in photos without words) are chosen on **dev** (R@1, then
MRR), then test is scored once in all three modes.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_and_data_args, save, table  # noqa: E402

CONSTANTS = (10, 30, 60, 100)
WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0)
DEPTH = 1000


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


def ranked_lists(index, queries, vectors) -> list[tuple[list[int], list[int], int]]:
    """Per query: the semantic and keyword lists (depth 1,000, the library's own rankings) and its photo."""
    by_name = {Path(it["path"]).name: i for i, it in index.all_items().items()}  # Flickr8k names are unique
    return [([i for _, i in index.semantic_rank(v, DEPTH)], [i for _, i in index.keyword_rank(text, DEPTH)],
             by_name[Path(rel).name]) for (text, rel), v in zip(queries, vectors)]


def rank_of(ranking: list[int], target: int) -> int:
    return ranking.index(target) if target in ranking else DEPTH


def ranks(lists, mode: str, constant: float = 60, weight: float = 1.0) -> np.ndarray:
    """0-based rank of each query's photo in a mode (1,000 when not in the list); hybrid through the library's
    ``fuse_rankings`` exactly as ``ranked_hits`` calls it (a query without keyword hits: the semantic list)."""
    from cliplab.serve.query import fuse_rankings

    out = []
    for semantic, keyword, target in lists:
        if mode == "semantic" or (mode == "hybrid" and not keyword):
            ranking = semantic
        elif mode == "keyword":
            ranking = keyword
        else:
            ranking = [i for _, i in fuse_rankings([semantic, keyword], constant, [1.0, weight])]
        out.append(rank_of(ranking, target))
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
    library = (query.DEFAULT_MODE, query.RRF_CONSTANT, query.KEYWORD_WEIGHT)
    with tempfile.TemporaryDirectory(prefix="cliplab-hybrid-") as tmp:
        dev, dev_queries = split_index(args.data, "dev", args.model, Path(tmp))
        dev_lists = ranked_lists(dev, dev_queries, text_embeddings(model, [q for q, _ in dev_queries]))
        grid = {("semantic", None, None): metrics(ranks(dev_lists, "semantic")),
                ("keyword", None, None): metrics(ranks(dev_lists, "keyword"))}
        for c in CONSTANTS:
            for w in WEIGHTS:
                grid[("hybrid", c, w)] = metrics(ranks(dev_lists, "hybrid", c, w))
        print(f"dev ({len(dev_queries)} held-out captions as queries, {len(dev)} photos with 4 captions each):")
        print(table([(m, c or "", w or "", f"{v['r1']:.2f}", f"{v['r10']:.2f}", f"{v['mrr']:.4f}")
                     for (m, c, w), v in grid.items()], ("mode", "RRF constant", "keyword weight", "R@1", "R@10", "MRR")))
        # the default must answer every query, also on photos without words: keyword mode is not a candidate
        candidates = [key for key in grid if key[0] != "keyword"]
        mode, constant, weight = max(candidates, key=lambda key: (round(grid[key]["r1"], 6), grid[key]["mrr"]))
        chosen = (mode, constant or library[1], weight or library[2])
        test, test_queries = split_index(args.data, "test", args.model, Path(tmp))
        test_vectors = text_embeddings(model, [q for q, _ in test_queries])
        test_lists = ranked_lists(test, test_queries, test_vectors)
        scored = {m: metrics(ranks(test_lists, m, chosen[1], chosen[2])) for m in ("semantic", "keyword", "hybrid")}
        query.RRF_CONSTANT, query.KEYWORD_WEIGHT = chosen[1], chosen[2]  # the library path gives the same ranks
        for (text, _), v, (_, _, target), r in list(zip(test_queries, test_vectors, test_lists,
                                                        ranks(test_lists, "hybrid", chosen[1], chosen[2])))[:50]:
            hits = [h["id"] for h in query.ranked_hits(test, v, text, DEPTH, mode="hybrid")]
            assert rank_of(hits, target) == r, "bench fusion differs from ranked_hits"
    print(f"chosen on dev: {chosen} (library DEFAULT_MODE, RRF_CONSTANT, KEYWORD_WEIGHT {library}: "
          f"{'the same' if chosen == library else 'DIFFERENT - update it'})")
    print(f"test ({len(test_queries)} queries), scored once:")
    print(table([(m, f"{v['r1']:.2f}", f"{v['r5']:.2f}", f"{v['r10']:.2f}", f"{v['mrr']:.4f}")
                 for m, v in scored.items()], ("mode", "R@1", "R@5", "R@10", "MRR")))
    save("hybrid" if args.model == "conse" else f"hybrid_{Path(args.model).name}",
         {"model": args.model, "chosen_on_dev": dict(zip(("mode", "rrf_constant", "keyword_weight"), chosen)),
          "library": dict(zip(("mode", "rrf_constant", "keyword_weight"), library)),
          "dev_grid": [{"mode": m, "rrf_constant": c, "keyword_weight": w, **v} for (m, c, w), v in grid.items()],
          "test": scored, "machine": machine()})


if __name__ == "__main__":
    main()
