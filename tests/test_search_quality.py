"""``cliplab eval search``: search-quality metrics against brute force, the relative cutoff by hand, and the
command against ``eval retrieval`` on the same image-caption pairs."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from cliplab import rundir
from cliplab.errors import CliplabError
from cliplab.eval.search_quality import cutoff_quality, ndcg, per_query, search_metrics, suggest_cutoff


def random_case(rng, n_items=30, n_queries=40, depth=None):
    rankings, relevant = [], []
    for _ in range(n_queries):
        order = rng.permutation(n_items)[: depth or n_items].tolist()
        rel = set(rng.choice(n_items, size=int(rng.integers(1, 4)), replace=False).tolist())
        rankings.append(order)
        relevant.append(rel)
    return rankings, relevant


@pytest.mark.parametrize("depth", [None, 12])
def test_metrics_match_brute_force(depth):
    rng = np.random.default_rng(0)
    rankings, relevant = random_case(rng, depth=depth)
    got = search_metrics(rankings, relevant)
    positions = [[i for i, item in enumerate(r) if item in rel] for r, rel in zip(rankings, relevant)]
    for k in (1, 5, 10):
        assert got[f"r{k}"] == pytest.approx(100 * np.mean([bool(p) and p[0] < k for p in positions]))
    assert got["mrr"] == pytest.approx(np.mean([1 / (p[0] + 1) if p else 0.0 for p in positions]))
    if depth is None:  # sklearn's nDCG over the full ranking: a relevance vector and scores falling with rank
        want = []
        for r, rel in zip(rankings, relevant):
            y_true = np.array([[1.0 if i in rel else 0.0 for i in range(30)]])
            y_score = np.zeros((1, 30))
            y_score[0, r] = -np.arange(len(r), dtype=float)
            want.append(ndcg_score(y_true, y_score, k=10))
        assert got["ndcg10"] == pytest.approx(100 * np.mean(want))
    else:
        assert any(not p for p in positions)  # some relevant items fall beyond the depth: rank inf, RR 0
        assert math.isinf(max(r["first_relevant_rank"] for r in per_query(rankings, relevant)))
    assert ndcg([5, 1, 2], {1, 2}) == pytest.approx((1 / math.log2(3) + 1 / 2) / (1 + 1 / math.log2(3)))
    with pytest.raises(CliplabError, match="at least one relevant"):
        search_metrics([[1, 2]], [set()])


def test_relative_cutoff_by_hand():
    scores = [[0.9, 0.85, 0.5], [0.7, 0.69, 0.68]]
    rankings = [[1, 2, 3], [4, 5, 6]]
    relevant = [{1}, {5, 6}]
    c = cutoff_quality(scores, rankings, relevant, 0.05)  # keeps 1, 2 | 4, 5, 6: 3 relevant of 5 kept, of 3
    assert (c.precision, c.recall, c.kept_per_query) == pytest.approx((60.0, 100.0, 2.5))
    c0 = cutoff_quality(scores, rankings, relevant, 0.0)  # keeps 1 | 4: 1 of 2 kept, of 3 relevant
    assert (c0.precision, c0.recall) == pytest.approx((50.0, 100 / 3))
    best = suggest_cutoff(scores, rankings, relevant, margins=[0.0, 0.05, 0.5])
    assert best.margin == 0.05 and best.f1 == pytest.approx(2 * 60 * 100 / 160)


@pytest.fixture()
def test_photos(caption_dir, tmp_path):
    """The caption fixture's test images in a photo folder, indexed with conse, and a queries CSV of their
    captions (relevant: the caption's image, by its path relative to the folder)."""
    from cliplab.data.captions import load_caption_dataset
    from cliplab.serve.index import IndexBuilder

    ds = load_caption_dataset(caption_dir / "captions.csv", "test")
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in ds.image_paths():
        shutil.copy(path, photos / path.name)
    index = tmp_path / "index"
    IndexBuilder(index, "conse", log=lambda m: None, progress=False).build([photos])
    queries = tmp_path / "queries.csv"
    with open(queries, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "relevant"])
        w.writerows([c, ds.image_paths()[i].name] for c, i in zip(ds.captions, ds.caption_image))
    return ds, index, queries


@pytest.mark.slow  # builds an index and embeds the split twice (~30 s)
def test_eval_search_equals_eval_retrieval_on_the_same_pairs(caption_dir, test_photos, tmp_path, cli):
    from cliplab.errors import ConfigError
    from cliplab.experiments import run_retrieval
    from cliplab.serve.quality import evaluate_search

    ds, index, queries = test_photos
    run = evaluate_search(index, queries, run_dir=tmp_path / "q", progress=False, mode="semantic")
    want = run_retrieval(caption_dir / "captions.csv", ["conse"], split="test", device="cpu").results["conse"]
    assert run.metrics["queries"] == len(ds.captions)
    for k in (1, 5, 10):
        assert run.metrics[f"r{k}"] == pytest.approx(want[f"t2i_r{k}"])
    assert run.metrics["mrr"] == pytest.approx(want["t2i_mrr"])
    record = json.loads((tmp_path / "q" / rundir.SEARCH_QUALITY).read_text())
    assert record["metrics"] == run.metrics and rundir.run_kind(tmp_path / "q") == "search"
    ranks = [q["first_relevant_rank"] for q in record["queries"]]
    assert ranks == sorted(ranks, reverse=True)  # worst first
    assert "Suggested relative cutoff" in (tmp_path / "q" / rundir.RESULTS_MD).read_text()
    assert 0 <= run.cutoff["precision"] <= 100 and run.table()["r1"][0] == run.metrics["r1"]

    res = cli("eval", "search", index, queries, "--worst", "2")
    assert res.returncode == 0 and "worst queries" in res.stdout and "suggested cutoff" in res.stdout, res.stdout + res.stderr
    by_content = evaluate_search(index, captions=caption_dir / "captions.csv", progress=False)  # copies indexed
    assert by_content.metrics == run.metrics  # hybrid: no query word is in these file names, so semantic's ranks
    assert by_content.record["mode"] == "hybrid" and run.record["mode"] == "semantic"
    words = evaluate_search(index, queries, progress=False, mode="keyword")
    assert words.metrics["r10"] == 0.0 and words.record["mode"] == "keyword"  # nothing to match by words
    with pytest.raises(ConfigError, match="--mode must be one of"):
        evaluate_search(index, queries, progress=False, mode="fuzzy")
    first = next(iter(run.queries))
    queries.write_text(f"\ufeffquery,relevant\n{first['query']},{first['top_result']}\n", encoding="utf-8")
    assert evaluate_search(index, queries, progress=False).metrics["r1"] == 100.0  # a spreadsheet's BOM is fine
    queries.write_text("query,relevant\na red circle,nowhere.jpg\n")
    res = cli("eval", "search", index, queries)
    assert res.returncode == 2 and "relevant photo 'nowhere.jpg' of query 'a red circle' is not in the index" \
        in res.stdout
    queries.write_text("text,file\nx,y\n")
    res = cli("eval", "search", index, queries)
    assert res.returncode == 2 and "columns query,relevant" in res.stdout
    res = cli("eval", "search", index)
    assert res.returncode == 2 and "give a queries CSV or --captions" in res.stdout
