"""``cliplab eval search``: how well an index answers the user's own text queries.

Queries come from a CSV (``query,relevant``: one or more relevant photos per query, as repeated rows or
``;``-separated; a path relative to an indexed folder, or absolute) or from a caption dataset's split (each
caption a query, its image the relevant photo: Flickr8k test captions against an index of the test images).
Every query is ranked as ``cliplab search --mode`` ranks it (semantic: the index's own FAISS search; keyword;
hybrid) to the first ``depth`` results; :mod:`cliplab.eval.search_quality` turns the rankings into R@1/5/10, MRR,
nDCG@10, a per-query table (worst first) and a suggested relative score cutoff.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from cliplab import rundir
from cliplab.errors import ConfigError, DataError
from cliplab.eval.search_quality import per_query, search_metrics, suggest_cutoff
from cliplab.results import ResultTable
from cliplab.utils import resolve_device, write_json, write_text

MAX_DEPTH = 1000  # ranks beyond this count as misses (MRR 0) on a large index


def read_search_queries(path: str | Path) -> list[tuple[str, list[str]]]:
    """``(query, [relevant path, ...])`` in file order from a ``query,relevant`` CSV (rows of one query merged)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the queries: {exc}") from None
    if not rows or not {"query", "relevant"} <= set(rows[0]):
        raise DataError(f"{path}: needs a header with the columns query,relevant and one row or more")
    queries: dict[str, list[str]] = {}
    for line, row in enumerate(rows, 2):
        query, relevant = (row.get("query") or "").strip(), [p.strip() for p in (row.get("relevant") or "").split(";")]
        if not query or not any(relevant):
            raise DataError(f"{path} line {line}: empty {'query' if not query else 'relevant'}")
        queries.setdefault(query, []).extend(p for p in relevant if p)
    return list(queries.items())


def queries_from_captions(data: str | Path, split: str = "test") -> list[tuple[str, list[str]]]:
    """Each caption of a dataset split as a query whose relevant photo is its image (absolute path)."""
    from cliplab.data.captions import load_caption_dataset

    ds = load_caption_dataset(data, split)
    paths = [str(Path(p).resolve()) for p in ds.image_paths()]
    return [(caption, [paths[i]]) for caption, i in zip(ds.captions, ds.caption_image)]


def _item_ids(index, items: dict[int, dict], queries: list[tuple[str, list[str]]], source: str) -> list[set[int]]:
    """Relevant paths -> index ids: by the path relative to an indexed folder, by the absolute path, else by the
    file's content (a copy of an indexed photo elsewhere); a photo the index does not hold is an error naming it
    (before any work)."""
    from cliplab.utils import sha256_files

    by_rel, by_abs, by_hash = {}, {}, {}
    for item in items.values():
        by_rel.setdefault(item["path"], set()).add(item["id"])
        by_abs[str((index.roots[item["root"]] / item["path"]).resolve())] = item["id"]
        by_hash.setdefault(item["sha256"], set()).add(item["id"])
    base = Path(source).parent if Path(source).is_file() else Path.cwd()
    resolved = {p: str((base / p).resolve()) for _, paths in queries for p in paths}
    unmatched = sorted({a for p, a in resolved.items() if a not in by_abs and Path(p).as_posix() not in by_rel})
    digests = dict(zip(unmatched, sha256_files(unmatched)))  # the content of files found under neither name
    out = []
    for query, paths in queries:
        ids = set()
        for p in paths:
            found = (by_rel.get(Path(p).as_posix()) if not Path(p).is_absolute() else None) \
                or ({by_abs[resolved[p]]} if resolved[p] in by_abs else None) or by_hash.get(digests.get(resolved[p]))
            if not found:
                raise DataError(f"{source}: relevant photo {p!r} of query {query!r} is not in the index "
                                "(give a path relative to an indexed folder, an absolute one, or a copy of one)")
            ids |= found
        out.append(ids)
    return out


def _rank(index, model, texts: list[str], depth: int, batch: int = 64, progress: bool = True):
    """Each text's ``depth`` best item ids and scores, as ``cliplab search`` ranks a text query."""
    from tqdm.auto import tqdm

    ids, scores = [], []
    for s in tqdm(range(0, len(texts), batch), desc="queries", disable=not progress, leave=False):
        with torch.inference_mode():
            z = model.encode_text(texts[s:s + batch], normalize=True).float().cpu().numpy()
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        batch_ids, batch_scores = index.rank(z, depth)
        if not np.isfinite([x for row in batch_scores for x in row]).all():
            raise DataError("non-finite search scores: the index or the model is damaged")
        ids += batch_ids
        scores += batch_scores
    return ids, scores


def _rank_mode(index, model, texts: list[str], depth: int, mode: str, progress: bool = True):
    """As :func:`_rank`, in any search mode (keyword and hybrid through ``ranked_hits``, one query at a time)."""
    from tqdm.auto import tqdm

    from cliplab.serve.query import ranked_hits

    if mode == "semantic":
        return _rank(index, model, texts, depth, progress=progress)
    ids, scores = [], []
    for s in tqdm(range(0, len(texts), 64), desc=f"queries ({mode})", disable=not progress, leave=False):
        batch = texts[s:s + 64]
        if mode == "keyword":
            vectors = [None] * len(batch)
        else:
            with torch.inference_mode():
                vectors = model.encode_text(batch, normalize=True).float().cpu().numpy()
        for text, vector in zip(batch, vectors):
            hits = ranked_hits(index, vector, text, depth, mode=mode)
            ids.append([h["id"] for h in hits])
            scores.append([float(h["score"]) for h in hits])
    return ids, scores


class SearchQualityRun(ResultTable):
    """``cliplab eval search``: ``metrics`` (R@K and nDCG@10 in percent, MRR), ``queries`` (one row per query,
    worst first), ``cutoff`` (the suggested relative score cutoff with its precision and recall)."""

    def __init__(self, record: dict) -> None:
        self.record = record
        self.metrics, self.queries, self.cutoff = record["metrics"], record["queries"], record["cutoff"]
        self.title = f"search quality: {record['index']} ({record['protocol']})"

    def table_rows(self) -> list[dict]:
        return [{"mode": self.record["mode"], "model": self.record["model"], **self.metrics}]

    def worst(self, n: int = 10) -> list[dict]:
        return self.queries[:n]

    def markdown(self) -> str:
        m, c = self.metrics, self.cutoff
        lines = [f"# Search quality: {self.record['index']}", "", self.record["protocol"], "",
                 "| mode | model | R@1 | R@5 | R@10 | MRR | nDCG@10 | median rank | queries |", "|" + "---|" * 9,
                 f"| {self.record['mode']} | {self.record['model']} | {m['r1']:.2f} | {m['r5']:.2f} | {m['r10']:.2f} "
                 f"| {m['mrr']:.3f} | {m['ndcg10']:.2f} | {m['median_rank'] if m['median_rank'] is not None else '-'} "
                 f"| {m['queries']} |", "",
                 f"Suggested relative cutoff (in-sample, on these queries): keep results scoring within "
                 f"{c['margin']:.3f} of the top one: precision {c['precision']:.1f}%, recall {c['recall']:.1f}% "
                 f"({c['kept_per_query']:.1f} results kept per query).", "", "## Worst queries", "",
                 "| query | first relevant rank | nDCG@10 | top result |", "|---|---|---|---|"]
        beyond = f"> {self.record['depth']}"
        lines += [f"| {q['query'].replace('|', '/')} | {q['first_relevant_rank'] or beyond} | {q['ndcg10']:.3f} "
                  f"| {q['top_result']} |"
                  for q in self.worst(20)]
        return "\n".join(lines) + "\n"


def evaluate_search(index_dir: str | Path, queries: str | Path | None = None, *, captions: str | Path | None = None,
                    split: str = "test", run_dir: str | Path | None = None, device: str = "cpu",
                    progress: bool = True, mode: str = "hybrid") -> SearchQualityRun:
    """Search quality of ``index_dir`` on a ``query,relevant`` CSV (``queries``) or a caption dataset's split
    (``captions``) in a search ``mode`` (semantic, keyword or hybrid, as ``cliplab search --mode``); writes
    ``search_quality.json`` + ``results.md`` to ``run_dir`` when given."""
    from cliplab.serve.query import SEARCH_MODES

    if mode not in SEARCH_MODES:
        raise ConfigError(f"--mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    from cliplab.models.factory import load_model
    from cliplab.serve.index import PhotoIndex

    if (queries is None) == (captions is None):
        raise ConfigError("give a queries CSV or --captions DATA (one of them)")
    index = PhotoIndex(index_dir)
    source = str(queries if queries is not None else captions)
    pairs = read_search_queries(queries) if queries is not None else queries_from_captions(captions, split)
    items = index.all_items()
    relevant = _item_ids(index, items, pairs, source)
    if run_dir is not None:
        rundir.claim_run_folder(run_dir, "search")  # before the queries run: a folder of the user's is refused
    model = load_model(index.info["model"], device=str(resolve_device(device)))
    if model.fingerprint() != index.info["model_fingerprint"]:
        raise ConfigError(f"{index.info['model']!r} is not the model {index_dir} was built with; rebuild the index")
    depth = min(len(index), MAX_DEPTH)
    ids, scores = _rank_mode(index, model.eval(), [q for q, _ in pairs], depth, mode, progress=progress)
    rows = per_query(ids, relevant)
    cutoff = suggest_cutoff(scores, ids, relevant)
    first = [None if math.isinf(row["first_relevant_rank"]) else int(row["first_relevant_rank"]) for row in rows]
    table = [{"query": q, "relevant": len(rel), **row, "first_relevant_rank": f,
              "top_result": items[r[0]]["path"] if r else None, "top_score": s[0] if s else None}
             for (q, _), rel, row, f, r, s in zip(pairs, relevant, rows, first, ids, scores)]
    table.sort(key=lambda r: (-(r["first_relevant_rank"] or math.inf), r["ndcg10"]))
    record = {"index": str(index_dir), "model": index.info["model"], "mode": mode, "source": source,
              "depth": depth,
              "metrics": search_metrics(ids, relevant), "cutoff": vars(cutoff), "queries": table,
              "protocol": f"{len(pairs)} queries from {source}{f' ({split} split)' if captions is not None else ''} "
                          f"against {len(index)} indexed photos; ranks beyond {depth} count as misses"}
    if not math.isfinite(record["metrics"]["median_rank"]):
        record["metrics"]["median_rank"] = None
    run = SearchQualityRun(record)
    if run_dir is not None:
        out = Path(run_dir)  # claimed before the queries ran
        write_json(out / rundir.SEARCH_QUALITY, record)
        write_text(out / rundir.RESULTS_MD, run.markdown())
    return run
