"""Search quality on a user's own queries: each query's ranked list of index items against its set of relevant
items -> Recall@K (a relevant item in the top K), MRR (of the first relevant item), nDCG@10 (binary gains), a
per-query table with the worst queries first, and a suggested relative score cutoff.

Pure functions of rankings, written here and tested against brute force (``tests/test_search_quality.py``); the
index and the query encoder are :mod:`cliplab.serve.quality`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cliplab.errors import CliplabError

DEFAULT_KS = (1, 5, 10)
NDCG_AT = 10


def first_relevant_rank(ranked: Sequence[int], relevant: set[int]) -> float:
    """1-based rank of the first relevant item of ``ranked``; ``inf`` when none is in the list."""
    for rank, item in enumerate(ranked, 1):
        if item in relevant:
            return float(rank)
    return math.inf


def ndcg(ranked: Sequence[int], relevant: set[int], at: int = NDCG_AT) -> float:
    """Normalised discounted cumulative gain of the top ``at`` with binary gains (1 for a relevant item)."""
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:at]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), at)))
    return dcg / ideal if ideal else 0.0


def per_query(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], ks=DEFAULT_KS) -> list[dict]:
    """One record per query: first relevant rank, a hit at each K, reciprocal rank, nDCG@10."""
    if len(rankings) != len(relevant):
        raise CliplabError(f"{len(rankings)} rankings for {len(relevant)} queries")
    rows = []
    for ranked, rel in zip(rankings, relevant):
        if not rel:
            raise CliplabError("every query needs at least one relevant item")
        first = first_relevant_rank(ranked, rel)
        rows.append({"first_relevant_rank": first, **{f"r{k}": float(first <= k) for k in ks},
                     "rr": 0.0 if math.isinf(first) else 1.0 / first, f"ndcg{NDCG_AT}": ndcg(ranked, rel)})
    return rows


def search_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], ks=DEFAULT_KS) -> dict:
    """Mean over queries: ``r1``, ``r5``, ``r10`` and ``ndcg10`` in percent, ``mrr`` as a fraction, and the
    median rank of the first relevant item (``inf`` when beyond the ranked lists)."""
    rows = per_query(rankings, relevant, ks)
    out = {f"r{k}": 100 * float(np.mean([r[f"r{k}"] for r in rows])) for k in ks}
    out["mrr"] = float(np.mean([r["rr"] for r in rows]))
    out[f"ndcg{NDCG_AT}"] = 100 * float(np.mean([r[f"ndcg{NDCG_AT}"] for r in rows]))
    out["median_rank"] = float(np.median([r["first_relevant_rank"] for r in rows]))
    out["queries"] = len(rows)
    return out


@dataclass(frozen=True)
class Cutoff:
    """Keep the results whose score is within ``margin`` of the query's top score; ``precision`` / ``recall``
    over all queries' kept results (micro-averaged) and their ``f1``."""

    margin: float
    precision: float
    recall: float
    f1: float
    kept_per_query: float


def cutoff_quality(scores: Sequence[Sequence[float]], rankings: Sequence[Sequence[int]],
                   relevant: Sequence[set[int]], margin: float) -> Cutoff:
    """Precision and recall (in percent) of the relative cutoff ``margin`` on these ranked lists."""
    kept = hits = 0
    for score, ranked, rel in zip(scores, rankings, relevant):
        if len(score) == 0:
            continue
        top = float(score[0])
        chosen = [item for s, item in zip(score, ranked) if s >= top - margin]
        kept += len(chosen)
        hits += sum(item in rel for item in chosen)
    total = sum(len(r) for r in relevant)
    precision = 100 * hits / kept if kept else 0.0
    recall = 100 * hits / total if total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Cutoff(margin, precision, recall, f1, kept / max(1, len(rankings)))


def suggest_cutoff(scores: Sequence[Sequence[float]], rankings: Sequence[Sequence[int]],
                   relevant: Sequence[set[int]], margins: Sequence[float] | None = None) -> Cutoff:
    """The relative cutoff with the best F1 on these queries (margins 0 to 0.2 in steps of 0.005 by default;
    ties: the smaller margin). In-sample: a suggestion for the user's searches, not a held-out estimate."""
    grid = margins if margins is not None else np.round(np.arange(0, 0.2001, 0.005), 3)
    results = [cutoff_quality(scores, rankings, relevant, float(m)) for m in grid]
    return max(results, key=lambda c: (c.f1, -c.margin))
