"""Photo search commands: ``index``, ``search``, ``duplicates``, ``serve`` and ``eval search``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from cliplab.cli.common import DeviceOpt, app, console, eval_app, log_line, print_run_dir, print_table


@app.command()
def index(
    paths: List[Path] = typer.Argument(..., help="photo folders (searched recursively) or caption datasets "
                                                 "(Flickr8k folder, COCO/Karpathy JSON, CSV/JSONL)"),
    out: Path = typer.Option(..., "--out", "-o", help="index folder: new, empty or an existing index (anything "
                                                      "else is refused; one inside a photo folder is not indexed)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="run/model folder, 'conse' or 'clip:SPEC' "
                                                                    "(default: the index's model, else conse)"),
    rebuild: bool = typer.Option(False, help="re-embed everything (needed to change the model)"),
    faiss_kind: str = typer.Option("auto", "--faiss", help="auto (exact below 50k images, HNSW above), flat, "
                                                           "hnsw or ivf"),
    dtype: str = typer.Option("float32", help="stored vectors: float32 or float16"),
    max_pixels: int = typer.Option(100_000_000, help="skip images declaring more pixels than this"),
    batch_size: int = typer.Option(64),
    chunk_size: int = typer.Option(256, help="images per resumable work chunk, on average (a killed run loses "
                                             "at most one; chunks are keyed by their files)"),
    formats: str = typer.Option("jpeg,png,webp,bmp,gif", help="image formats to decode (comma-separated Pillow "
                                                              "names; tiff possible)"),
    device: str = DeviceOpt,
    engine: str = typer.Option("local", help="local, or ray (image chunks embedded by Ray actors)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)"),
    ray_actors: int = typer.Option(2),
    captioner: Optional[str] = typer.Option(None, help="a `cliplab caption train` run: one generated caption per "
                                                       "photo, shown and searchable (default: the index's own; "
                                                       "'none' drops them)"),
    caption_precision: Optional[str] = typer.Option(
        None, help="captioner decoding: auto (int8 on CPU, calibrated on the caption run's training images; else "
                   "float32), float32 or int8 (default: the index's own, else auto)"),
    json_out: bool = typer.Option(False, "--json", help="print the build report as JSON"),
) -> None:
    """Index photos for search: embeddings + FAISS + SQLite metadata; re-runs embed only new/changed files."""
    from cliplab.serve.index import IndexBuilder
    from cliplab.utils import resolve_device

    builder = IndexBuilder(out, model, rebuild=rebuild, faiss_kind=faiss_kind, dtype=dtype,
                           device=str(resolve_device(device)), batch_size=batch_size, max_pixels=max_pixels,
                           chunk_size=chunk_size, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
                           formats=[f.strip() for f in formats.split(",") if f.strip()], log=log_line,
                           progress=not json_out, captioner=captioner,
                           caption_precision=caption_precision)
    report = builder.build(paths)
    if json_out:
        print(json.dumps(report.to_dict()))
        return
    _print_build_report(report, out)


def _print_build_report(report, out: Path) -> None:
    table = Table(title=f"index {out} (generation {report.generation})", show_header=False, title_justify="left")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("total", "new", "changed", "unchanged", "removed", "embedded", "captioned", "faiss", "recall_at_10"):
        value = getattr(report, key)
        table.add_row(key, "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
    table.add_row("skipped", str(len(report.skipped)))
    table.add_row("seconds", f"{report.seconds:.1f}")
    console.print(table)
    for rel, reason in report.skipped[:20]:
        console.print(f"  skipped {rel}: {reason}", highlight=False, markup=False)
    if len(report.skipped) > 20:
        console.print(f"  ... {len(report.skipped) - 20} more (listed in the index's skipped table)")


@app.command()
def search(
    query: List[str] = typer.Argument(None, help='[INDEX] then text and/or image files, combined with + and -, '
                                                 'e.g. INDEX "beach" + me.jpg - "people"; id:N is an indexed '
                                                 'image; INDEX may be left out when $CLIPLAB_INDEX names it'),
    k: int = typer.Option(10, "-k", "--top", "-t", help="number of results"),
    image: List[Path] = typer.Option([], "--image", help="an image query (added to the text)"),
    json_out: bool = typer.Option(False, "--json", help="print results as JSON"),
    filepath_only: bool = typer.Option(False, "--filepath-only", "-f", help="print only the files, one per line "
                                                                           "(for piping into other tools)"),
    like: List[str] = typer.Option([], "--like", help="id:N of a result judged relevant: the query moves towards "
                                                     "it (Rocchio feedback; repeatable)"),
    unlike: List[str] = typer.Option([], "--unlike", help="id:N of a result judged not relevant: the query moves "
                                                         "away from it (repeatable)"),
    after: Optional[str] = typer.Option(None, help="only photos taken on/after this date (EXIF; YYYY-MM-DD)"),
    before: Optional[str] = typer.Option(None, help="only photos taken before this date (EXIF; YYYY-MM-DD)"),
    camera: Optional[str] = typer.Option(None, help="only photos whose camera (EXIF make and model) contains this"),
    folder: Optional[str] = typer.Option(None, help="only photos in this folder (relative to an indexed folder)"),
    mode: str = typer.Option("hybrid", help="semantic (embeddings), keyword (words in file and folder names, "
                                            "camera, captions) or hybrid (both, rank-fused)"),
    device: str = typer.Option("cpu"),
) -> None:
    """Search an index by text, image or both (rclip-style + and - combinations); refine with --like/--unlike."""
    from cliplab.errors import CliplabError
    from cliplab.serve.index import PhotoFilter
    from cliplab.serve.query import parse_item_ids, search_index

    index_dir, query = _index_and_query(list(query or []))
    for p in image:
        if not p.is_file():
            raise CliplabError(f"image not found: {p}")
    hits = search_index(index_dir, query + [str(p) for p in image], k, device=device,
                        like=parse_item_ids(like, "--like"), unlike=parse_item_ids(unlike, "--unlike"),
                        filters=PhotoFilter(after=after, before=before, camera=camera, folder=folder), mode=mode)
    if filepath_only:
        for h in hits:
            print(h["file"])
        return
    if json_out:
        print(json.dumps(hits))
        return
    captioned = any(h.get("generated") for h in hits)  # the index has a captioner: show what it wrote
    print_table(["rank", "id", "score", "path"] + ["generated caption"] * captioned,
                [[h["rank"], f"id:{h['id']}", f"{h['score']:.4f}", h["file"]] + [h.get("generated") or ""] * captioned
                 for h in hits], " ".join(query), left=["path", "generated caption"])


def _index_and_query(args: list[str]) -> tuple[Path, list[str]]:
    """The index folder (the first argument when it is an index, else ``$CLIPLAB_INDEX``) and the query terms."""
    import os

    from cliplab.errors import CliplabError
    from cliplab.serve.index import CURRENT

    if args and (Path(args[0]) / CURRENT).is_file():
        return Path(args[0]), args[1:]
    if os.environ.get("CLIPLAB_INDEX"):
        return Path(os.environ["CLIPLAB_INDEX"]), args
    if args:
        return Path(args[0]), args[1:]  # not an index: PhotoIndex says so in one line
    raise CliplabError("give the index folder first (or set CLIPLAB_INDEX to it), then the query")


@app.command()
def duplicates(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder made by `cliplab index`"),
    threshold: Optional[float] = typer.Option(None, help="cosine similarity for near duplicates (default: chosen "
                                                         "on a planted Flickr8k dev set, see BENCHMARKS.md)"),
    json_out: bool = typer.Option(False, "--json", help="print the groups as JSON"),
    list_file: Optional[Path] = typer.Option(None, "--list", help="write the files not suggested to keep, one per "
                                                                  "line, to this new file (cliplab deletes nothing)"),
) -> None:
    """Exact (same content) and near (similar embedding) duplicate groups of an index; nothing is deleted."""
    from cliplab.serve.duplicates import check_removal_list, find_duplicates, write_removal_list

    if list_file is not None:
        check_removal_list(list_file)  # before the search
    report = find_duplicates(index_dir, threshold)
    if list_file is not None:
        write_removal_list(list_file, report)
    if json_out:
        print(json.dumps(report.to_dict()))
        return
    rows = [[f"{kind} {n}", str(len(group)), group[0]["file"],
             "\n".join(f"{it['file']}" + (f" ({it['similarity']:.3f})" if "similarity" in it else "")
                       + (" [review]" if it["suggest"] == "review" else "") for it in group[1:])]
            for kind, groups in (("exact", report.exact), ("near", report.near)) for n, group in enumerate(groups, 1)]
    keep, others = "suggested keep (most pixels)", "the others (similarity to it)"
    print_table(["group", "photos", keep, others], rows, f"{len(report.exact)} exact and {len(report.near)} near "
                f"groups among {report.images} photos (threshold {report.threshold})", left=[keep, others])
    if report.warning:
        console.print(f"[yellow]warning:[/yellow] {report.warning}", highlight=False)
    if list_file is not None:
        console.print(f"{len(report.suggested_removals())} files listed in {list_file} (review it; cliplab deletes "
                      "nothing)", highlight=False)


@app.command()
def serve(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder made by `cliplab index`"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default; any other needs --token)"),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, envvar="CLIPLAB_TOKEN",
                                        help="require this bearer token (16+ characters; a session cookie after)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="serve off loopback without a token (anyone who can "
                                                          "reach the address can search and download the images)"),
    allowed_host: List[str] = typer.Option([], "--allowed-host", help="another Host name clients use "
                                           "(repeatable; *.example.org patterns); loopback and --host always count"),
    max_upload_mb: float = typer.Option(10.0, help="largest accepted upload"),
    max_upload_mp: float = typer.Option(25.0, help="most megapixels decoded from a query image (JPEGs decode "
                                                   "reduced, so they may declare 4x this)"),
    max_k: int = typer.Option(200, help="largest number of results per query"),
    allow_urls: bool = typer.Option(False, help="let /knn-service fetch image_url from public addresses "
                                                "(off: the server fetches nothing)"),
    thumb_dir: Optional[Path] = typer.Option(None, help="thumbnail cache (default $CLIPLAB_CACHE/thumbs)"),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="let pages from this origin (e.g. "
                                          "http://localhost:3005, clip-retrieval's front end) read the API "
                                          "(repeatable; never *; off by default)"),
    device: str = typer.Option("cpu"),
) -> None:
    """Serve an index: web page at /, JSON API (/api/search, clip-retrieval's /knn-service), /docs, /metrics."""
    from cliplab.serve.app import ServerSettings, serve as run_server

    settings = ServerSettings(index_dir, token=token, host=host, allowed_hosts=allowed_host,
                              max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_upload_mp * 1e6),
                              max_k=max_k, allow_urls=allow_urls, thumb_dir=thumb_dir, device=device,
                              cors_origins=cors_origin)
    run_server(settings, port=port, no_auth=no_auth, log=log_line)


@eval_app.command("search")
def eval_search(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="index folder"),
    queries: Optional[Path] = typer.Argument(None, help="CSV with columns query,relevant (a photo path relative "
                                                        "to an indexed folder, or absolute; repeat rows or join "
                                                        "with ';')"),
    captions: Optional[str] = typer.Option(None, help="instead of QUERIES: a caption dataset whose split's captions "
                                                      "are the queries and their images the relevant photos"),
    split: str = typer.Option("test", help="the split of --captions"),
    run_dir: Optional[Path] = typer.Option(None, help="write search_quality.json and results.md here"),
    device: str = DeviceOpt,
    worst: int = typer.Option(10, help="worst queries to print"),
    mode: str = typer.Option("hybrid", help="search mode to measure: semantic, keyword or hybrid"),
) -> None:
    """Search quality on your own queries: R@1/5/10, MRR, nDCG@10, the worst queries and a suggested cutoff."""
    from cliplab.serve.quality import evaluate_search

    run = evaluate_search(index_dir, queries, captions=captions, split=split, run_dir=run_dir, device=device, mode=mode)
    m, c = run.metrics, run.cutoff
    print_table(["mode", "model", "R@1", "R@5", "R@10", "MRR", "nDCG@10", "queries"],
                [[run.record["mode"], run.record["model"], f"{m['r1']:.2f}", f"{m['r5']:.2f}", f"{m['r10']:.2f}",
                  f"{m['mrr']:.3f}", f"{m['ndcg10']:.2f}", m["queries"]]], run.record["protocol"],
                left=["mode", "model"])
    print_table(["query", "first relevant rank", "nDCG@10", "top result"],
                [[q["query"], q["first_relevant_rank"] or f"> {run.record['depth']}", f"{q['ndcg10']:.3f}",
                  q["top_result"]] for q in run.worst(worst)], "worst queries", left=["query", "top result"])
    console.print(f"suggested cutoff (in-sample): keep results within {c['margin']:.3f} of the top score — "
                  f"precision {c['precision']:.1f}%, recall {c['recall']:.1f}%, "
                  f"{c['kept_per_query']:.1f} kept per query",
                  highlight=False)
    if run_dir is not None:
        print_run_dir(run_dir)
