"""Queries against a photo index: text, images, indexed items, and sums/differences of them (like rclip:
``"beach" + photo.jpg - "people"``)."""

from __future__ import annotations

import io
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cliplab.data.images import SAFE_IMAGE_FORMATS, draft_short_side
from cliplab.errors import CliplabError, DataError
from cliplab.models.wrappers import encode_pil_images, text_side


@dataclass
class QueryTerm:
    sign: float  # +1 or -1
    kind: str  # text | image (a PIL image) | item (an indexed image id)
    value: object


def parse_cli_query(args: list[str]) -> list[QueryTerm]:
    """``["beach", "+", "me.jpg", "-", "people"]``: an existing file is an image, anything else text;
    ``+``/``-`` set the sign of the next term (``+`` by default)."""
    from cliplab.data.images import load_rgb

    terms, sign = [], 1.0
    for arg in args:
        if arg in ("+", "-"):
            sign = 1.0 if arg == "+" else -1.0
            continue
        if Path(arg).is_file():
            terms.append(QueryTerm(sign, "image", load_rgb(arg)))
        elif arg.startswith("id:") and arg[3:].isdigit():
            terms.append(QueryTerm(sign, "item", int(arg[3:])))
        else:
            if not arg.strip():
                raise CliplabError("empty text query")
            terms.append(QueryTerm(sign, "text", arg))
        sign = 1.0
    if not terms:
        raise CliplabError("give a text query, an image (a file path) or both")
    return terms


UPLOAD_FORMATS = SAFE_IMAGE_FORMATS  # the only decoders an upload reaches: JPEG, PNG, WebP, BMP, GIF (no EPS, PSD, TIFF)
QUERY_SIDE = 448  # query images are reduced while decoding to a short side near this (the model sees 224-448 px)


class QueryBusy(CliplabError):
    """Too many queries are already waiting; the client should retry shortly (HTTP 429)."""


def decode_image_bytes(data: bytes, max_pixels: int, side: int = QUERY_SIDE) -> "Image.Image":
    """An uploaded query image as RGB, reduced to a short side of ``side``..2×``side`` pixels while decoding.

    Only :data:`UPLOAD_FORMATS` are tried. ``max_pixels`` bounds the pixels actually decoded, checked from the
    header before any decoding: a JPEG decodes at 1/2-1/8 scale (draft mode), so it may declare up to
    4×``max_pixels``; other formats decode in full and may declare ``max_pixels``. Then a box reduction by an
    integer factor brings the short side near ``side`` (cheap, and the model's preprocessing resizes anyway).
    """
    from PIL import UnidentifiedImageError
    from PIL.JpegImagePlugin import JpegImageFile

    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            w, h = im.size
            jpeg = isinstance(im, JpegImageFile)  # MPO (phone photos) included
            if w * h > (4 * max_pixels if jpeg else max_pixels):
                raise DataError(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            if jpeg:
                draft_short_side(im, side)
                if im.size[0] * im.size[1] > max_pixels:
                    raise DataError(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            im.load()
            rgb = im.convert("RGB")
    except Image.DecompressionBombError:
        raise DataError("image too large (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"not a readable image ({exc.__class__.__name__})") from None
    factor = min(rgb.size) // side
    return rgb.reduce(factor) if factor >= 2 else rgb


def query_text_encoder(model):
    """``texts -> unit embeddings`` for queries: a model over an exportable cliplab text tower on the CPU runs
    that tower in ONNX Runtime (one query in ~8 ms instead of ~18 ms on 2 cores; the same embedding, as the
    ONNX backend's parity tests check), then its own projection; anything else through ``encode_text``."""
    from cliplab.embed.backends import OnnxTextTower, resolve_backend
    from cliplab.embed.extract import _exportable
    from cliplab.models.base import TowerModel

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if not (isinstance(model, TowerModel) and on_cpu and _exportable(model.text_tower)
            and resolve_backend("auto", torch.device("cpu")) == "onnx"):
        return lambda texts: model.encode_text(texts, normalize=True)
    onnx = OnnxTextTower(model.text_tower)  # single-threaded session: the other core serves HTTP meanwhile
    return lambda texts: model.project_text(onnx.encode(list(texts)).float(), normalize=True)


class QueryEncoder:
    """Embeds query terms with the index's model; thread-safe. Text queries that arrive together are encoded
    in one batch (a worker thread takes every query waiting while the previous batch ran: no added wait
    for a lone query, several times the throughput under load); at most ``max_pending`` texts wait (then
    :class:`QueryBusy`); recent texts are kept in an LRU cache. ``onnx_text``: encode texts through
    :func:`query_text_encoder` (worth its session start in a long-lived server, not for one CLI query)."""

    def __init__(self, model, cache_size: int = 1024, max_batch: int = 64, max_pending: int = 512,
                 onnx_text: bool = False) -> None:
        self.model = model.eval()
        self.encode_text = (query_text_encoder(text_side(self.model)) if onnx_text else
                            lambda texts: self.model.encode_text(texts, normalize=True))
        self.lock = threading.Lock()  # one model call at a time (fast tokenizers are not re-entrant)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_lock = threading.Lock()
        self.cache_size, self.max_batch = cache_size, max_batch
        self.pending: "queue.Queue[tuple[str, Future]]" = queue.Queue(maxsize=max_pending)  # full: QueryBusy
        self.batches: list[int] = []  # sizes of the batches encoded (for tests and metrics)
        threading.Thread(target=self._worker, name="cliplab-text-batcher", daemon=True).start()

    def _worker(self) -> None:
        while True:
            items = [self.pending.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            texts = list(dict.fromkeys(t for t, _ in items))
            try:
                with self.lock, torch.inference_mode():
                    z = self.encode_text(texts).float().cpu().numpy()
                self.batches.append(len(texts))
                by_text = dict(zip(texts, z))
                for t, fut in items:
                    fut.set_result(by_text[t])
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)

    def text(self, text: str) -> np.ndarray:
        with self.cache_lock:
            hit = self.cache.get(text)
            if hit is not None:
                self.cache.move_to_end(text)
                return hit
        fut: Future = Future()
        try:
            self.pending.put_nowait((text, fut))
        except queue.Full:
            raise QueryBusy("too many text queries waiting; retry shortly") from None
        z = fut.result()
        with self.cache_lock:
            self.cache[text] = z
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return z

    @torch.inference_mode()
    def image(self, image) -> np.ndarray:
        """A query image's unit embedding, made as the index's images were (wrappers such as flip TTA and
        ensembles combine their parts as the embedding pipeline does)."""
        with self.lock:
            z = encode_pil_images(self.model, [image], normalize=True)[0].float()
        return torch.nn.functional.normalize(z, dim=-1).cpu().numpy()

    def compose(self, terms: list[QueryTerm], index) -> tuple[np.ndarray, set[int]]:
        """The unit-norm sum of signed term embeddings, and the indexed items used as queries (excluded from
        their own results)."""
        total, used = None, set()
        for t in terms:
            if t.kind == "text":
                z = self.text(str(t.value))
            elif t.kind == "image":
                z = self.image(t.value)
            else:
                z = index.vector(int(t.value))
                if z is None:
                    raise DataError(f"no indexed image with id {t.value}")
                used.add(int(t.value))
            z = np.asarray(z, dtype=np.float32)
            z = z / max(float(np.linalg.norm(z)), 1e-12)
            total = t.sign * z if total is None else total + t.sign * z
        norm = float(np.linalg.norm(total))
        if not np.isfinite(norm) or norm < 1e-6:
            raise DataError("the query terms cancel out (their sum is zero)")
        return (total / norm).astype(np.float32), used


# Rocchio weights (query, mean of the liked results, mean of the disliked ones): the disliked weight chosen on
# Flickr8k dev for the default search model (conse) by `python bench/feedback.py` (one round, the first 3
# results judged; BENCHMARKS.md `search.feedback.r10_gain`); the liked weight is Rocchio's usual 0.75 (that
# simulation cannot choose it). Results marked not relevant are also left out of the refined results.
FEEDBACK_WEIGHTS = (1.0, 0.75, 0.025)


def refine_with_feedback(query: np.ndarray | None, liked: list[np.ndarray], disliked: list[np.ndarray],
                         weights: tuple[float, float, float] = FEEDBACK_WEIGHTS) -> np.ndarray:
    """Rocchio relevance feedback on unit embeddings: ``a*q + b*mean(liked) - c*mean(disliked)``, unit norm.
    ``query`` may be None (only "more like these"); every vector is normalised first."""
    a, b, c = weights

    def unit(v) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    if query is None and not liked:
        raise DataError("give a query or at least one liked result")
    parts = [a * unit(query)] if query is not None else []
    parts += [b * np.mean([unit(v) for v in liked], axis=0)] if liked else []
    parts += [-c * np.mean([unit(v) for v in disliked], axis=0)] if disliked else []
    total = np.sum(parts, axis=0)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise DataError("the query and the feedback cancel out (their sum is zero)")
    return (total / norm).astype(np.float32)


SEARCH_MODES = ("semantic", "keyword", "hybrid")
DEFAULT_MODE = "hybrid"  # chosen on Flickr8k dev by `python bench/hybrid.py` (BENCHMARKS.md `search.hybrid.*`)
RRF_CONSTANT = 10  # reciprocal rank fusion constant, and the keyword list's weight against the semantic list's 1:
KEYWORD_WEIGHT = 16.0  # both chosen on the same dev queries (photos with words: their order first, embeddings after)
FUSION_DEPTH = 100  # each list fused to this depth (at least k)


def fuse_rankings(rankings: list[list[int]], constant: float = RRF_CONSTANT,
                  weights: list[float] | None = None) -> list[tuple[float, int]]:
    """Weighted reciprocal rank fusion: each id scores the sum over the rankings of ``weight / (constant + rank)``
    (rank 1 first; weights 1 by default); ``(score, id)`` best first, ties in order of first appearance."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings)):
        for rank, item_id in enumerate(ranking, 1):
            scores[item_id] = scores.get(item_id, 0.0) + weight / (constant + rank)
    order = {i: n for n, i in enumerate(dict.fromkeys(i for r in rankings for i in r))}
    return sorted(((s, i) for i, s in scores.items()), key=lambda si: (-si[0], order[si[1]]))


def ranked_hits(index, vector: np.ndarray | None, text: str, k: int, *, mode: str = DEFAULT_MODE,
                exclude: set[int] = frozenset(), filters=None) -> list[dict]:
    """The ``k`` best photos for a query: ``semantic`` (the embedding ``vector``), ``keyword`` (BM25 over the
    words of ``text`` in folder and file names, camera and captions) or ``hybrid`` (the two lists fused by
    :func:`fuse_rankings`; a query without words, or an index without the keyword table, ranks semantically)."""
    if mode not in SEARCH_MODES:
        raise CliplabError(f"mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    allowed = index.matching(filters) if filters is not None and filters.active else None  # one SQL query
    if mode == "keyword":
        if not text.strip():
            raise CliplabError("keyword mode needs words in the query")
        if not index.has_keywords:
            raise CliplabError("this index has no keyword table (written before keyword search existed): update it "
                               "with `cliplab index` (no photo is embedded again), or search in semantic mode")
        hits = index.keyword_rank(text, k + len(exclude), allowed)
        return index.described([h for h in hits if h[1] not in exclude][:k])
    semantic = index.semantic_rank(vector, max(k, FUSION_DEPTH) if mode == "hybrid" else k, exclude, allowed)
    keyword = index.keyword_rank(text, max(k, FUSION_DEPTH) + len(exclude), allowed) if mode == "hybrid" else []
    keyword = [i for _, i in keyword if i not in exclude]
    if not keyword:
        return index.described(semantic[:k])
    fused = fuse_rankings([[i for _, i in semantic], keyword], RRF_CONSTANT, [1.0, KEYWORD_WEIGHT])
    return index.described(fused[:k])


def query_words(terms: list[QueryTerm]) -> str:
    """The words keyword search reads from a query: its positive text terms."""
    return " ".join(str(t.value) for t in terms if t.kind == "text" and t.sign > 0)


def feedback_vectors(index, ids: list[int]) -> list[np.ndarray]:
    """The indexed embeddings of judged results (a :class:`DataError` names an unknown id)."""
    vectors = []
    for item_id in ids:
        v = index.vector(int(item_id))
        if v is None:
            raise DataError(f"no indexed image with id {item_id}")
        vectors.append(v)
    return vectors


def parse_item_ids(values: list[str], option: str) -> list[int]:
    """``id:N`` or ``N`` for each value of a CLI option such as ``--like``."""
    ids = []
    for value in values:
        digits = value[3:] if value.startswith("id:") else value
        if not (digits.isascii() and digits.isdigit()):
            raise CliplabError(f"{option} takes indexed ids like id:12 (see --json), not {value!r}")
        ids.append(int(digits))
    return ids


def search_index(index_dir: str | Path, query: list[str], k: int = 10, *, device: str = "cpu",
                 like: list[int] = (), unlike: list[int] = (), filters=None, mode: str = DEFAULT_MODE) -> list[dict]:
    """The ``k`` best images of an index for an rclip-style query (texts, image files and ``id:N`` combined with
    ``+`` and ``-``), each a dict with rank, id, score, path, file, width, height and captions. ``like`` /
    ``unlike``: ids of results judged relevant / not relevant, folded into the query by
    :func:`refine_with_feedback`; the ``unlike`` ones are left out of the results (the liked ones stay).
    ``filters``: a :class:`~cliplab.serve.index.PhotoFilter` (date taken, camera, folder) applied before ranking.
    ``mode``: semantic, keyword or hybrid (:func:`ranked_hits`)."""
    from cliplab.models.factory import load_model
    from cliplab.serve.index import PhotoIndex

    if k < 1:
        raise CliplabError("-k must be >= 1")
    if mode not in SEARCH_MODES:
        raise CliplabError(f"--mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    index = PhotoIndex(index_dir)
    if filters is not None and filters.active:
        index.check_filters(filters)  # an index without the facts says so before the model loads
    terms = parse_cli_query(list(query)) if query or not like else []
    if mode == "keyword":  # words only: no model, no embedding
        if like or unlike:
            raise CliplabError("relevance feedback refines the embedding: use --mode semantic or hybrid")
        vector, used = None, {int(t.value) for t in terms if t.kind == "item"}
    else:
        liked, disliked = feedback_vectors(index, list(like)), feedback_vectors(index, list(unlike))
        model = load_model(index.info["model"], device=device)
        if model.fingerprint() != index.info["model_fingerprint"]:
            raise CliplabError(f"{index.info['model']!r} is not the model {index_dir} was built with; rebuild the "
                               "index")
        vector, used = QueryEncoder(model).compose(terms, index) if terms else (None, set())
        if like or unlike:
            vector = refine_with_feedback(vector, liked, disliked)
    hits = ranked_hits(index, vector, query_words(terms), k, mode=mode, exclude=used | set(unlike), filters=filters)
    return [{"rank": r, "id": h["id"], "score": h["score"], "path": h["path"],
             "file": str(index.roots[h["root"]] / h["path"]), "width": h["width"], "height": h["height"],
             "captions": h["captions"], **{f: h[f] for f in ("taken", "camera", "generated") if f in h}}
            for r, h in enumerate(hits, 1)]
