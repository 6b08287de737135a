"""A searchable photo index: image embeddings, a FAISS index and SQLite metadata in one folder.

Layout of ``INDEX/`` (one *generation* is live at a time; ``CURRENT`` names it):

- ``CURRENT``: JSON naming the live generation's files; replaced atomically (``os.replace``) as the
  last step of every build, so readers and a killed build always see one complete generation;
- ``meta-G.sqlite``: ``info`` (model spec and fingerprint, dimension, roots, captioner, ...), ``items`` (id,
  root, relative path, size, mtime, content hash, width, height, captions, added time, row, EXIF facts, the
  generated caption), ``items_text`` (FTS5: the words keyword search reads), ``skipped`` (files that could
  not be indexed, and why);
- ``vectors-G.npy``: unit-norm image embeddings ``[N, d]`` (float32 or float16, memory-mapped), row
  ``items.row``; ``faiss-G.index``: exact or approximate inner-product index over them;
- ``cliplab-work/``: embeddings of new files, computed in resumable chunks keyed by their files (the
  feature store), so a build killed half-way resumes where it stopped, even after photos were added;
- ``CLIPLAB_INDEX``: cliplab's marker. A build refuses a non-empty folder without it (so ``--out`` can never
  be a photo folder or a home directory), refuses an ``--out`` that is or contains an indexed root (one
  inside a root is left out of the walk), and only ever deletes the exact file names it writes
  (``meta-G.sqlite``, ``vectors-G.npy``, ``faiss-G.index``, its own ``.NAME.cliplab-*.tmp`` temp files) and
  the work folder when that carries its marker ``CLIPLAB_WORK``;
- ``CLIPLAB_INDEX.lock``: held (flock) for the length of a build; a second build at once is refused.

An update walks the roots, reuses the vectors of unchanged files (same path, size and mtime, or same
content hash), embeds only new or changed ones, drops deleted ones, writes generation G+1 next to G,
then swaps ``CURRENT``. Every file is written atomically and fsynced (file, then folder) before ``CURRENT``
moves, so a power loss leaves one whole generation. Leftovers of an interrupted build are removed by the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cliplab.data.images import FORMAT_EXTENSIONS, SAFE_IMAGE_FORMATS, ImageFiles, check_formats
from cliplab.embed.index import build_faiss
from cliplab.errors import ConfigError, DataError
from cliplab.serve.captions import NO_CAPTIONER, PRECISIONS, PhotoCaptioner, captioner_folder
from cliplab.utils import (atomic_write, exclusive_lock, fsync_dir, marked_folder_state, read_json_or_none, sha256_file,
                           temp_name_pattern, write_json, write_npy)

CURRENT = "CURRENT"
MARKER = "CLIPLAB_INDEX"  # cliplab's mark on a folder it made: only such a folder is written to or cleaned
LOCK = "CLIPLAB_INDEX.lock"  # held (flock) by the one build running
WORK = "cliplab-work"  # resumable chunks of the running build, with its own marker
WORK_MARKER = "CLIPLAB_WORK"
GENERATION_FILE = re.compile(r"meta-[0-9]+\.sqlite|vectors-[0-9]+\.npy|faiss-[0-9]+\.index")
OWN_TEMP_FILE = temp_name_pattern(GENERATION_FILE.pattern + "|" + CURRENT + "|" + MARKER)
EXACT_BELOW = 50_000  # FAISS "auto": exact inner product below this many images, HNSW above
DEFAULT_MAX_PIXELS = 100_000_000  # images declaring more pixels are skipped (decompression bombs)
SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    root INTEGER NOT NULL,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    captions TEXT NOT NULL DEFAULT '[]',
    added REAL NOT NULL,
    row INTEGER NOT NULL,
    taken TEXT,
    camera TEXT,
    orientation INTEGER NOT NULL DEFAULT 1,
    gps INTEGER NOT NULL DEFAULT 0,
    generated TEXT
);
CREATE INDEX IF NOT EXISTS items_taken ON items(taken);
CREATE VIRTUAL TABLE IF NOT EXISTS items_text USING fts5(body, tokenize='unicode61 remove_diacritics 2');
CREATE UNIQUE INDEX IF NOT EXISTS items_path ON items(root, relpath);
CREATE UNIQUE INDEX IF NOT EXISTS items_row ON items(row);
CREATE TABLE IF NOT EXISTS skipped (
    root INTEGER NOT NULL, relpath TEXT NOT NULL, reason TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    PRIMARY KEY (root, relpath)
);
"""


@dataclass
class SourceFile:
    """An image found under an indexed root."""

    root: int
    relpath: str
    path: Path
    size: int
    mtime_ns: int
    captions: list[str] = field(default_factory=list)


@dataclass
class BuildReport:
    """What one ``build`` did."""

    total: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    embedded: int = 0
    captioned: int = 0  # photos given a generated caption by this build (--captioner)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    skipped_known: int = 0  # of them, unchanged files that failed before (not tried again)
    faiss: str = ""
    recall_at_10: float | None = None
    seconds: float = 0.0
    generation: int = 0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("total", "new", "changed", "unchanged", "removed", "embedded",
                                               "captioned", "faiss", "recall_at_10", "seconds", "generation",
                                               "skipped_known")} | {
            "skipped": len(self.skipped), "skipped_items": [list(s) for s in self.skipped]}


def image_extensions(formats: tuple[str, ...] = SAFE_IMAGE_FORMATS) -> tuple[str, ...]:
    """File extensions of the given Pillow formats (what the walk picks up)."""
    return tuple(ext for f in formats for ext in FORMAT_EXTENSIONS[f])


def walk_images(root: Path, exclude: Path | None = None,
                formats: tuple[str, ...] = SAFE_IMAGE_FORMATS) -> Iterable[tuple[Path, str | None]]:
    """Image files under ``root`` (recursive, extensions case-insensitive), with a skip reason for files
    that must not be indexed (symlinks leading out of the root). ``exclude`` (the index folder, when it
    lies inside a root) is left out of the walk."""
    real_root = root.resolve()
    extensions = image_extensions(formats)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != exclude]
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(extensions):
                continue
            path = here / name
            reason = None
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_root):
                    reason = "symlink pointing outside the indexed folder"
                elif not target.exists():
                    reason = "broken symlink"
            yield path, reason


def collect_sources(paths: list[Path], exclude: Path | None = None, formats: tuple[str, ...] = SAFE_IMAGE_FORMATS
                    ) -> tuple[list[Path], list[SourceFile], list[tuple[str, str]]]:
    """Roots, the image files under them (with captions for caption datasets) and files skipped up front."""
    from cliplab.data.captions import detect_caption_format, load_caption_dataset

    roots: list[Path] = []
    files: list[SourceFile] = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(f"not found: {p}")
        if detect_caption_format(p) is not None:
            ds = load_caption_dataset(p, "all", on_error="skip")
            root = ds.image_root.resolve()
            ri = len(roots)
            roots.append(root)
            for i, rel in enumerate(ds.images):
                path = ds.image_root / rel
                try:
                    st = path.stat()
                except OSError:
                    skipped.append((rel, "missing image"))
                    continue
                files.append(SourceFile(ri, str(Path(rel).as_posix()), path, st.st_size, st.st_mtime_ns,
                                        [ds.captions[c] for c in ds.captions_of(i)]))
            skipped += [(msg, kind) for kind, msg in ds.skipped.items]
        elif p.is_dir():
            ri = len(roots)
            roots.append(p.resolve())
            for path, reason in walk_images(p, exclude, formats):
                rel = path.relative_to(p).as_posix()
                if reason:
                    skipped.append((rel, reason))
                    continue
                try:
                    st = path.stat()
                except OSError:  # removed between listing and stat
                    skipped.append((rel, "file vanished while indexing"))
                    continue
                if st.st_size == 0:
                    skipped.append((rel, "empty file (0 bytes)"))
                    continue
                files.append(SourceFile(ri, rel, path, st.st_size, st.st_mtime_ns))
        else:
            raise DataError(f"{p}: give a folder of images or a caption dataset (Flickr8k folder, COCO/Karpathy "
                            "JSON, CSV/JSONL)")
    return roots, files, skipped


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:  # a committed generation never changes: no locks, no journal
        uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"  # '#', '%', spaces: percent-encoded
        con = sqlite3.connect(uri, uri=True, check_same_thread=False)
    else:
        con = sqlite3.connect(str(path))
    con.row_factory = sqlite3.Row
    return con


def choose_faiss(kind: str, n: int) -> str:
    if kind not in ("auto", "flat", "ivf", "hnsw"):
        raise ConfigError(f"faiss index kind must be auto, flat, ivf or hnsw, not {kind!r}")
    return ("flat" if n < EXACT_BELOW else "hnsw") if kind == "auto" else kind


def approximate_recall(vectors: np.ndarray, index, k: int = 10, n_queries: int = 200, seed: int = 0) -> float:
    """Recall@k of ``index`` against exact search, with stored vectors as queries (what `index` prints)."""
    import faiss

    n = len(vectors)
    if n == 0:
        return 1.0
    q = np.array(vectors[np.random.default_rng(seed).choice(n, size=min(n_queries, n), replace=False)],
                 dtype=np.float32)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.asarray(vectors, dtype=np.float32))
    k = min(k, n)
    _, truth = exact.search(q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got)]))


@dataclass
class PhotoFilter:
    """Which photos a search may return: taken on/after ``after`` and before ``before`` (ISO dates or
    date-times; photos without a recorded date are left out by either), a ``camera`` whose "make model"
    contains the text (any case), inside ``folder`` (a path relative to an indexed folder, and below it)."""

    after: str | None = None
    before: str | None = None
    camera: str | None = None
    folder: str | None = None

    def __post_init__(self) -> None:
        import datetime

        for name in ("after", "before", "camera", "folder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 500):
                raise DataError(f"{name}: text of at most 500 characters")
            setattr(self, name, value.strip() or None if value is not None else None)
        for name in ("after", "before"):
            value = getattr(self, name)
            if value:
                try:
                    setattr(self, name, datetime.datetime.fromisoformat(value).isoformat())
                except ValueError:
                    raise DataError(f"{name}: not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS): {value!r}") from None
        if self.folder:
            parts = [p for p in self.folder.replace("\\", "/").split("/") if p not in ("", ".")]
            if ".." in parts:
                raise DataError(f"folder: a path inside an indexed folder, without '..': {self.folder!r}")
            self.folder = "/".join(parts) or None

    @property
    def active(self) -> bool:
        return any((self.after, self.before, self.camera, self.folder))

    def sql(self) -> tuple[str, list]:
        """A WHERE clause over ``items`` and its parameters."""
        clauses, params = ["1"], []
        if self.after:
            clauses.append("taken >= ?")
            params.append(self.after)
        if self.before:
            clauses.append("taken < ?")
            params.append(self.before)
        if self.camera:
            clauses.append("lower(camera) LIKE ? ESCAPE '!'")
            params.append(f"%{_like_escaped(self.camera.lower())}%")
        if self.folder:
            clauses.append("relpath LIKE ? ESCAPE '!'")
            params.append(f"{_like_escaped(self.folder)}/%")
        return " AND ".join(clauses), params


def searchable_text(relpath: str, captions: list[str], camera: str | None, generated: str | None = None) -> str:
    """What keyword search reads for a photo: its folder and file-name words (``trips/2020/beach_day.jpg`` ->
    ``trips 2020 beach day``), its camera, its captions and its generated caption."""
    words = re.sub(r"[\W_]+", " ", relpath.rsplit(".", 1)[0])
    return "\n".join([words, camera or "", *captions, *([generated] if generated else [])])


def fts_query(text: str, common: frozenset[str] = frozenset()) -> str | None:
    """A user's text as an FTS5 query: its words, each quoted (no FTS syntax gets through), any of them
    (BM25 ranks photos matching more words first); None when it has no words. Words in ``common`` are left
    out unless every word is: see :meth:`PhotoIndex.common_words`."""
    words = list(dict.fromkeys(re.findall(r"\w+", text.lower())[:64]))
    words = [w for w in words if w not in common] or words
    return " OR ".join(f'"{w}"' for w in words) or None


def _like_escaped(text: str) -> str:
    """``text`` matched literally by SQL LIKE with ``ESCAPE '!'``."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


class PhotoIndex:
    """A committed generation of an index folder, opened read-only (CLI search, the server)."""

    def __init__(self, folder: str | Path) -> None:
        from cliplab.extras import require

        faiss = require("faiss")
        self.folder = Path(folder)
        pointer = self.folder / CURRENT
        if not pointer.is_file():
            raise ConfigError(f"{self.folder}: not a cliplab index (no {CURRENT}); build one with `cliplab index`")
        self.current = json.loads(pointer.read_text(encoding="utf-8"))
        self.current_mtime = pointer.stat().st_mtime_ns
        self.db = _connect(self.folder / self.current["db"], read_only=True)
        self.info = {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT key, value FROM info")}
        self.roots = [Path(r) for r in self.info["roots"]]
        self.vectors = np.load(self.folder / self.current["vectors"], mmap_mode="r")
        self.faiss = faiss.read_index(str(self.folder / self.current["faiss"]))
        rows = self.db.execute("SELECT row, id FROM items ORDER BY row").fetchall()
        self.row_to_id = np.array([r["id"] for r in rows], dtype=np.int64)
        self.id_to_row = {int(i): r for r, i in enumerate(self.row_to_id)}
        if len(self.row_to_id) != len(self.vectors) or self.faiss.ntotal != len(self.vectors):
            raise ConfigError(f"{self.folder}: generation {self.current['generation']} is inconsistent")

    def __len__(self) -> int:
        return len(self.row_to_id)

    def stale(self) -> bool:
        """Whether a newer generation has been committed since this one was opened."""
        try:
            return (self.folder / CURRENT).stat().st_mtime_ns != self.current_mtime
        except OSError:
            return False

    def item(self, item_id: int) -> dict | None:
        row = self.db.execute("SELECT * FROM items WHERE id = ?", (int(item_id),)).fetchone()
        return None if row is None else self._public(row)

    def items(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT * FROM items WHERE id IN ({marks})", [int(i) for i in ids]).fetchall()
        return {int(r["id"]): self._public(r) for r in rows}

    def all_items(self) -> dict[int, dict]:
        """Every indexed item by id (one query, however large the index)."""
        return {int(r["id"]): self._public(r) for r in self.db.execute("SELECT * FROM items")}

    @staticmethod
    def _public(row: sqlite3.Row) -> dict:
        item = {"id": int(row["id"]), "root": int(row["root"]), "path": row["relpath"], "width": int(row["width"]),
                "height": int(row["height"]), "size": int(row["size"]), "sha256": row["sha256"],
                "captions": json.loads(row["captions"]), "added": float(row["added"])}
        keys = row.keys()
        if "taken" in keys:  # generations written before the EXIF facts were recorded lack them
            item.update(taken=row["taken"], camera=row["camera"], orientation=int(row["orientation"]),
                        gps=bool(row["gps"]))
        item["generated"] = row["generated"] if "generated" in keys else None  # cliplab index --captioner
        return item

    @cached_property
    def _item_columns(self) -> set[str]:
        return {r["name"] for r in self.db.execute("PRAGMA table_info(items)")}

    def check_filters(self, filters: "PhotoFilter") -> None:
        """Refuse date and camera filters on a generation written before those facts were recorded."""
        if "taken" not in self._item_columns and (filters.after or filters.before or filters.camera):
            raise ConfigError(f"{self.folder} was built before photo dates and cameras were recorded; run "
                              "`cliplab index` on it again (nothing is re-embedded)")

    def matching(self, filters: "PhotoFilter") -> set[int]:
        """Ids of the photos a filter keeps (one SQL query over the recorded dates, cameras and folders)."""
        self.check_filters(filters)
        where, params = filters.sql()
        return {int(r[0]) for r in self.db.execute(f"SELECT id FROM items WHERE {where}", params)}

    def file_path(self, item_id: int) -> Path | None:
        """The file of an indexed item, only if it still resolves inside its root (no path from a request)."""
        item = self.item(item_id)
        if item is None:
            return None
        root = self.roots[item["root"]]
        path = (root / item["path"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    def vector(self, item_id: int) -> np.ndarray | None:
        row = self.id_to_row.get(int(item_id))
        return None if row is None else np.asarray(self.vectors[row], dtype=np.float32)

    def rank(self, queries: np.ndarray, depth: int) -> tuple[list[list[int]], list[list[float]]]:
        """The ``depth`` best item ids and their scores (inner product) for each row of unit-norm ``queries``."""
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.vectors.shape[1]))
        with _omp_threads(1 if len(queries) == 1 and len(self) <= EXACT_BELOW else None):
            scores, rows = self.faiss.search(queries, depth)
        keep = rows >= 0
        return ([[int(i) for i in self.row_to_id[r[m]]] for r, m in zip(rows, keep)],
                [[float(x) for x in d[m]] for d, m in zip(scores, keep)])

    def search(self, query: np.ndarray, k: int = 10, exclude: set[int] | None = None,
               filters: "PhotoFilter | None" = None) -> list[dict]:
        """Top ``k`` items by inner product with the unit-norm ``query``: id, score and metadata. With
        ``filters`` only the matching photos are ranked, scored exactly (so ``k`` results whenever ``k`` match)."""
        allowed = self.matching(filters) if filters is not None and filters.active else None
        return self.described(self.semantic_rank(query, k, exclude, allowed))

    def semantic_rank(self, query: np.ndarray, k: int, exclude: set[int] | None = None,
                      allowed: set[int] | None = None) -> list[tuple[float, int]]:
        """``(score, id)`` of the ``k`` best items by inner product; among ``allowed`` ids only (exact scores)
        when given (see :meth:`search`)."""
        exclude = exclude or set()
        if allowed is not None:
            return self._ranked_among(query, [i for i in allowed if i not in exclude], k)
        n = min(len(self), k + len(exclude))
        if n == 0:
            return []
        ids, scores = self.rank(query, n)
        return [(s, i) for s, i in zip(scores[0], ids[0]) if i not in exclude][:k]

    def described(self, hits: list[tuple[float, int]]) -> list[dict]:
        """``(score, id)`` pairs as hits: id, score and the item's metadata."""
        meta = self.items([i for _, i in hits])
        return [{"id": i, "score": s, **{k2: v for k2, v in meta[i].items() if k2 != "id"}} for s, i in hits]

    @cached_property
    def has_keywords(self) -> bool:
        """Whether this generation has the keyword table (indexes built before it have not)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'items_text'").fetchone() is not None

    @cached_property
    def common_words(self) -> frozenset[str]:
        """Words in at least half of the photos. FTS5's BM25 gives them no weight (a negative IDF is clamped
        to 1e-6), so they cannot change a keyword ranking; left out of the match, they stop it reading nearly
        every photo ("a", "the" in captions: 17.7 -> ~2 ms per query over 8,091 captioned photos). A photo
        matching only such words is then not a keyword match at all, instead of one scoring ~0."""
        if not self.has_keywords:
            return frozenset()
        self.db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.items_vocab USING fts5vocab(main, items_text, 'row')")
        return frozenset(r[0] for r in self.db.execute("SELECT term FROM temp.items_vocab WHERE doc >= ?",
                                                       (len(self) / 2,)))

    def keyword_rank(self, text: str, depth: int, allowed: set[int] | None = None) -> list[tuple[float, int]]:
        """``(score, id)`` of the items whose words (folder, file name, camera, captions, generated caption)
        match ``text``, best first by BM25 (score = -BM25, higher is better); at most ``depth``, only ``allowed``
        ids when given."""
        if not self.has_keywords:
            return []
        query = fts_query(text, self.common_words)
        if query is None:
            return []
        rows = self.db.execute("SELECT rowid, bm25(items_text) FROM items_text WHERE items_text MATCH ? "
                               "ORDER BY bm25(items_text) LIMIT ?", (query, depth if allowed is None else -1))
        hits = [(-float(score), int(item_id)) for item_id, score in rows]
        return hits if allowed is None else [h for h in hits if h[1] in allowed][:depth]

    def _ranked_among(self, query: np.ndarray, ids: list[int], k: int) -> list[tuple[float, int]]:
        """The ``k`` best of ``ids`` by exact inner product (vectors read in blocks from the memory map)."""
        rows = np.sort(np.array([self.id_to_row[i] for i in ids if i in self.id_to_row], dtype=np.int64))
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        scores = np.concatenate([np.asarray(self.vectors[rows[b:b + 65536]], dtype=np.float32) @ q
                                 for b in range(0, len(rows), 65536)]) if len(rows) else np.zeros(0, np.float32)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(float(scores[t]), int(self.row_to_id[rows[t]])) for t in top]

    def summary(self) -> dict:
        return {"images": len(self), "model": self.info["model"], "dim": self.info["dim"],
                "faiss": self.info.get("faiss"), "generation": self.current["generation"],
                "roots": [str(r) for r in self.roots], "updated": self.info.get("updated"),
                "skipped": self.db.execute("SELECT COUNT(*) FROM skipped").fetchone()[0]}


class IndexBuilder:
    """Creates or updates an index folder (see the module docstring); ``build`` commits one generation."""

    def __init__(self, folder: str | Path, model_spec: str | None = None, *, rebuild: bool = False,
                 faiss_kind: str = "auto", dtype: str = "float32", device: str = "cpu", batch_size: int = 64,
                 max_pixels: int = DEFAULT_MAX_PIXELS, log: Callable[[str], None] = print,
                 progress: bool = True, chunk_size: int = 256, engine: str = "local",
                 ray_address: str | None = None, ray_actors: int = 2,
                 formats: tuple[str, ...] | list[str] = SAFE_IMAGE_FORMATS, captioner: str | Path | None = None,
                 caption_precision: str | None = None) -> None:
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"vector dtype must be float32 or float16, not {dtype!r}")
        choose_faiss(faiss_kind, 0)
        self.folder = Path(folder)
        self.formats = check_formats(formats)
        self.rebuild, self.faiss_kind, self.dtype = rebuild, faiss_kind, dtype
        self.device, self.batch_size, self.max_pixels = device, batch_size, max_pixels
        self.log, self.progress, self.chunk_size = log, progress, chunk_size
        self.engine = {"engine": engine, "ray_address": ray_address, "ray_actors": ray_actors}
        self._read_state()
        self.model_spec = model_spec or (self.previous_info or {}).get("model") or "conse"
        # a caption run writing one caption per photo: given, else the index's own; "none" stops captioning
        self.captioner = str(captioner) if captioner is not None else (self.previous_info or {}).get("captioner")
        if self.captioner == NO_CAPTIONER:
            self.captioner = None
        elif self.captioner is not None:
            try:
                captioner_folder(self.captioner)  # a one-line error before any work
            except ConfigError:
                if captioner is not None:
                    raise
                raise ConfigError(f"{self.folder}: its captioner {self.captioner} is gone; give --captioner RUN, "
                                  "or --captioner none to drop the generated captions") from None
        # given, else the index's own for the same captioner (one written before int8 decoding: float32), else auto
        prev = self.previous_info or {}
        same = self.captioner is not None and prev.get("captioner") == str(Path(self.captioner).resolve())
        inherited = (prev.get("caption_precision") or ("float32" if prev.get("captioner_id") else None)) if same else None
        self.caption_precision = caption_precision or inherited or "auto"
        if self.caption_precision not in PRECISIONS:
            raise ConfigError(f"--caption-precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {self.caption_precision!r}")

    def _read_state(self) -> None:
        """The live generation and its info (None for a new index); refuses a folder that is not an index."""
        self.current = self.previous_info = None
        if index_folder_state(self.folder) in ("index", "legacy"):
            self.current = read_json_or_none(self.folder / CURRENT) if (self.folder / CURRENT).is_file() else None
        if self.current is not None:
            con = _connect(self.folder / self.current["db"], read_only=True)
            try:
                self.previous_info = {r["key"]: json.loads(r["value"]) for r in con.execute("SELECT key, value FROM info")}
            finally:
                con.close()

    def build(self, paths: list[str | Path]) -> BuildReport:
        """Index ``paths`` into the folder: refused unless it is new, empty or a cliplab index (nothing else
        is ever deleted there), under an exclusive lock (a second build at once is refused)."""
        t0 = time.time()
        check_index_folder(self.folder)
        roots, files, skipped = collect_sources([Path(p) for p in paths], exclude=self.folder.resolve(),
                                                formats=self.formats)
        check_out_beside_roots(self.folder, roots)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with index_lock(self.folder):
                check_index_folder(self.folder)  # again, now that no other build can write here
                claim_index_folder(self.folder)
                self._read_state()  # another build may have committed before this one took the lock
                self._collect_garbage()
                report = self._build_locked(roots, files, skipped)
        except OSError as exc:  # a full disk, a read-only folder: the previous generation is untouched
            raise DataError(f"cannot write the index {self.folder}: {exc.strerror or exc} "
                            f"({exc.__class__.__name__}); the previous generation is unchanged") from None
        report.seconds = time.time() - t0
        return report

    def _build_locked(self, roots: list[Path], files: list[SourceFile], skipped: list) -> BuildReport:
        from cliplab.models.factory import load_model

        report = BuildReport(skipped=skipped)
        model = load_model(self.model_spec, device=self.device)
        captioner = self._load_captioner()
        fingerprint = model.fingerprint()
        prev = self.previous_info
        if prev is not None and prev["model_fingerprint"] != fingerprint and not self.rebuild:
            raise ConfigError(f"{self.folder} was built with model {prev['model']!r} (fingerprint "
                              f"{prev['model_fingerprint'][:12]}); {self.model_spec!r} is another model "
                              f"({fingerprint[:12]}). Pass --rebuild to re-embed every image with it")
        if prev is not None and prev["roots"] != [str(r) for r in roots] and not self.rebuild:
            self.log(f"roots changed: {prev['roots']} -> {[str(r) for r in roots]}; files are matched by root and path")
        fresh = prev is None or self.rebuild or prev["model_fingerprint"] != fingerprint
        old = {} if fresh else self._old_items()
        keep, todo, failed = self._sort_files(files, old, {} if fresh else self._old_failures(), report)
        self.log(f"{len(files)} images under {len(roots)} root(s): {report.unchanged} unchanged, {report.new} new, "
                 f"{report.changed} changed, {report.removed} removed")
        new_vectors, good, errors = self._embed(model, todo)
        report.embedded = int(good.sum())
        entries, stat_of = self._entries(keep, todo, good, errors, failed, old, report)
        generated = self._captions(captioner, entries, old or self._previous_items(), report) if captioner else {}
        old_vectors = np.load(self.folder / self.current["vectors"], mmap_mode="r") if old else None
        dim = (int(new_vectors.shape[1]) if new_vectors.size else int(old_vectors.shape[1])
               if old_vectors is not None else int(model.encode_text(["x"]).shape[1]))
        vectors = np.zeros((len(entries), dim), dtype=self.dtype)
        for row, e in enumerate(entries):
            src, j = e[1]
            vectors[row] = old_vectors[j] if src == "old" else new_vectors[j]
        info = {"model": self.model_spec, "model_fingerprint": fingerprint, "dim": dim, "dtype": self.dtype,
                "roots": [str(r) for r in roots], "max_pixels": self.max_pixels, "formats": list(self.formats),
                "created": (prev or {}).get("created", time.time()) if old else time.time(), "updated": time.time(),
                "captioner": str(captioner.run) if captioner else None,
                "captioner_id": captioner.id if captioner else None,
                "caption_precision": captioner.precision if captioner else None}
        self._commit(vectors, entries, info, stat_of, report, generated)
        return report

    def _sort_files(self, files: list[SourceFile], old: dict, old_failed: dict, report: BuildReport):
        """``(keep, todo, failed)``: unchanged files (vectors reused), new or changed ones (embedded), and
        unchanged files that failed before (not tried again)."""
        keep, todo, failed = [], [], []
        for f in files:
            bad = old_failed.get((f.root, f.relpath))
            if bad is not None and bad[1:] == (f.size, f.mtime_ns):
                failed.append((f, bad[0]))
                continue
            o = old.get((f.root, f.relpath))
            if o is not None and o["size"] == f.size and o["mtime_ns"] == f.mtime_ns:
                keep.append((f, o))
            elif o is not None and f.size == o["size"] and _same_content(f.path, o["sha256"]):
                keep.append((f, o))  # touched but identical
            else:
                todo.append(f)
                report.changed += int(o is not None)
        report.unchanged, report.new, report.skipped_known = len(keep), len(todo) - report.changed, len(failed)
        seen = {(f.root, f.relpath) for f in files}
        report.removed = sum(1 for key in old if key not in seen)
        return keep, todo, failed

    def _embed(self, model, todo: list[SourceFile]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Embeddings of new and changed files, resumable: content-keyed chunks land in the work folder as they
        are computed, so a killed build (even one whose file list then changed) reuses the finished ones."""
        from cliplab.embed.cache import FeatureCache
        from cliplab.embed.pipeline import image_embeddings

        if not todo:
            return np.zeros((0, 0), np.float32), np.zeros(0, dtype=bool), {}
        images = ImageFiles([f.path for f in todo], max_pixels=self.max_pixels, formats=self.formats)
        z, good, errors = image_embeddings(model, images, cache=FeatureCache(work_folder(self.folder),
                                                                             chunk_size=self.chunk_size),
                                           device=self.device, progress=self.progress, desc="embedding images",
                                           batch_size=self.batch_size, content_chunks=True, **self.engine)
        if not np.isfinite(z[good]).all():
            bad = [todo[i].relpath for i in np.flatnonzero(good & ~np.isfinite(z).all(1))[:3]]
            raise DataError(f"the model gave non-finite embeddings (NaN/inf) for {', '.join(bad)}; nothing was "
                            "committed (check the model's weights)")
        return z, good, errors

    def _entries(self, keep, todo, good, errors, failed, old, report: BuildReport):
        """The items of the next generation, sorted by root and path, and the stat of files that failed."""
        now = time.time()
        # (SourceFile, vector source, sha, width, height, added, id or None, EXIF facts)
        entries = [(f, ("old", o["row"]), o["sha256"], o["width"], o["height"], o["added"], o["id"],
                    self._kept_facts(f, o)) for f, o in keep]
        stat_of = {}  # relpath -> (size, mtime) of files that failed, so an unchanged one is not tried again
        for i, f in enumerate(todo):
            if good[i]:
                try:
                    (w, h, facts), sha = self._size_and_facts(f.path), sha256_file(f.path)
                except (OSError, DataError):  # gone or replaced since it was embedded
                    report.skipped.append((f.relpath, "file vanished or changed while indexing"))
                    report.embedded -= 1
                    continue
                prior = old.get((f.root, f.relpath))  # a changed file keeps its id
                entries.append((f, ("new", i), sha, w, h, now, prior["id"] if prior else None, facts))
            else:
                report.skipped.append((f.relpath, errors.get(i, "unreadable image").replace(str(f.path), f.relpath)))
                stat_of[f.relpath] = (f.size, f.mtime_ns)
        for f, reason in failed:
            report.skipped.append((f.relpath, reason))
            stat_of[f.relpath] = (f.size, f.mtime_ns)
        entries.sort(key=lambda e: (e[0].root, e[0].relpath))
        return entries, stat_of

    def _commit(self, vectors: np.ndarray, entries: list, info: dict, stat_of: dict, report: BuildReport,
                generated: dict[str, str]) -> None:
        """Write generation G+1 beside G (durably), then swap ``CURRENT``; G's files are removed after."""
        import faiss

        n = len(entries)
        generation = (self.current["generation"] + 1) if self.current else 1
        names = {"db": f"meta-{generation}.sqlite", "vectors": f"vectors-{generation}.npy",
                 "faiss": f"faiss-{generation}.index"}
        kind = choose_faiss(self.faiss_kind, n)
        index = build_faiss(vectors, kind)
        if kind != "flat" and n:
            report.recall_at_10 = approximate_recall(vectors, index)
            self.log(f"{kind} index: recall@10 against exact search {report.recall_at_10:.3f} "
                     f"(200 stored vectors as queries)")
        info = {**info, "faiss": kind, "recall_at_10": report.recall_at_10}
        write_npy(self.folder / names["vectors"], vectors)
        atomic_write(self.folder / names["faiss"], lambda p: faiss.write_index(index, str(p)))
        skipped_rows = [(rel, reason, *stat_of.get(rel, (None, None))) for rel, reason in report.skipped]
        atomic_write(self.folder / names["db"], lambda p: self._write_db(p, entries, info, skipped_rows, generated))
        # the commit: one atomic, durable rename makes generation G+1 the live one
        write_json(self.folder / CURRENT, {"generation": generation, **names, "count": n,
                                            "committed": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.current = {"generation": generation, **names}
        self._collect_garbage()
        remove_work_folder(self.folder)  # its chunks are in the committed vectors now
        report.total, report.faiss, report.generation = n, kind, generation

    def _load_captioner(self) -> PhotoCaptioner | None:
        if not self.captioner:
            return None
        try:
            return PhotoCaptioner(self.captioner, device=self.device, precision=self.caption_precision, log=self.log)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (captioner {self.captioner}; --captioner none builds without captions)") from None

    def _previous_items(self) -> dict[tuple[int, str], dict]:
        """The live generation's items (its captions are reused by a rebuild with the same captioner)."""
        return self._old_items() if self.current is not None else {}

    def _captions(self, captioner: PhotoCaptioner, entries: list, old: dict, report: BuildReport) -> dict[str, str]:
        """content hash -> generated caption of every photo of the next generation: kept from the previous
        generation when it was written by the same captioner (also through ``--rebuild`` or a model change:
        a caption depends on the photo's bytes and the captioner only), else written now (resumably, see
        :mod:`cliplab.serve.captions`)."""
        same = (self.previous_info or {}).get("captioner_id") == captioner.id
        known = {o["sha256"]: o["generated"] for o in old.values() if same and o.get("generated") is not None}
        need = [(e[0].path, e[2]) for e in entries if e[2] not in known]
        journal = work_folder(self.folder) / f"captions-{captioner.id[:16]}.jsonl"
        new = captioner.captions([p for p, _ in need], [k for _, k in need], journal, max_pixels=self.max_pixels,
                                 formats=self.formats, progress=self.progress, log=self.log)
        report.captioned = len(new)
        return {**known, **new}

    def _old_items(self) -> dict[tuple[int, str], dict]:
        con = _connect(self.folder / self.current["db"], read_only=True)
        try:
            return {(r["root"], r["relpath"]): dict(r) for r in con.execute("SELECT * FROM items")}
        finally:
            con.close()

    def _old_failures(self) -> dict[tuple[int, str], tuple[str, int, int]]:
        con = _connect(self.folder / self.current["db"], read_only=True)
        try:
            return {(r["root"], r["relpath"]): (r["reason"], r["size"], r["mtime_ns"])
                    for r in con.execute("SELECT * FROM skipped WHERE size IS NOT NULL")}
        finally:
            con.close()

    def _size_and_facts(self, path: Path) -> tuple[int, int, dict]:
        """Width, height and the EXIF facts (:func:`~cliplab.data.images.photo_facts`) from the header."""
        from PIL import Image

        from cliplab.data.images import photo_facts

        with Image.open(path, formats=self.formats) as im:
            return int(im.size[0]), int(im.size[1]), photo_facts(im)

    def _kept_facts(self, f: SourceFile, old: dict) -> dict:
        """An unchanged photo's facts: from the previous generation, or read now from an index written before
        they were recorded (its header only; an unreadable one has none)."""
        if "taken" in old:
            return {"taken": old["taken"], "camera": old["camera"], "orientation": old["orientation"],
                    "gps": bool(old["gps"])}
        from cliplab.data.images import NO_FACTS

        try:
            return self._size_and_facts(f.path)[2]
        except (OSError, DataError, SyntaxError, ValueError):
            return dict(NO_FACTS)

    @staticmethod
    def _write_db(path: Path, entries, info: dict, skipped: list[tuple], generated: dict[str, str]) -> None:
        con = sqlite3.connect(str(path))
        try:
            with con:  # one transaction
                con.executescript(SCHEMA)
                con.executemany("INSERT INTO info VALUES (?, ?)", [(k, json.dumps(v)) for k, v in info.items()])
                next_id = max([e[6] for e in entries if e[6] is not None], default=0) + 1
                rows = []
                for row, (f, _, sha, w, h, added, item_id, facts) in enumerate(entries):
                    if item_id is None:
                        item_id, next_id = next_id, next_id + 1
                    rows.append((item_id, f.root, f.relpath, f.size, f.mtime_ns, sha, w, h, json.dumps(f.captions),
                                 added, row, facts["taken"], facts["camera"], facts["orientation"], int(facts["gps"]),
                                 generated.get(sha)))
                con.executemany(f"INSERT INTO items VALUES ({', '.join('?' * 16)})", rows)
                con.executemany("INSERT INTO items_text (rowid, body) VALUES (?, ?)",
                                [(r[0], searchable_text(r[2], json.loads(r[8]), r[12], r[15])) for r in rows])
                con.executemany("INSERT OR REPLACE INTO skipped VALUES (0, ?, ?, ?, ?)", skipped)
        finally:
            con.close()

    def _collect_garbage(self) -> None:
        """Remove generation files the live ``CURRENT`` does not name (an interrupted build's leftovers, or the
        generation a commit replaced) and cliplab's own temp files: exact names cliplab writes, nothing else."""
        live = set((self.current or {}).values())
        for p in self.folder.iterdir():
            own = GENERATION_FILE.fullmatch(p.name) or OWN_TEMP_FILE.fullmatch(p.name)
            if own and p.name not in live and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
        fsync_dir(self.folder)


@contextmanager
def _omp_threads(n: int | None):
    """FAISS's OpenMP threads for this thread's searches inside the block (None: unchanged). One query over up
    to 50,000 vectors runs ~10x faster on one thread than on two when other work keeps the cores busy (a
    server's other requests): the threads wait on each other. OpenMP keeps the setting per calling thread;
    it is restored after."""
    if n is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _same_content(path: Path, sha256: str) -> bool:
    try:
        return sha256_file(path) == sha256
    except OSError:  # vanished: embedding it again reports it
        return False


def index_folder_state(folder: Path) -> str:
    """``missing``, ``empty``, ``index`` (has cliplab's marker), ``legacy`` (an index written before the
    marker: a ``CURRENT`` naming generation files that exist) or ``foreign`` (anything else)."""
    folder = Path(folder)
    mine = lambda name: name == LOCK or OWN_TEMP_FILE.fullmatch(name)  # noqa: E731 - a build starting beside us
    state = marked_folder_state(folder, MARKER, "cliplab-index", mine)
    if state is not None:
        return "index" if state == "marked" else state
    current = read_json_or_none(folder / CURRENT)
    if isinstance(current, dict) and all(isinstance(current.get(k), str) and GENERATION_FILE.fullmatch(current[k])
                                         and (folder / current[k]).is_file() for k in ("db", "vectors", "faiss")):
        return "legacy"
    return "foreign"


def check_index_folder(folder: Path) -> None:
    """Refuse an index folder that already holds anything but a cliplab index (before any work starts)."""
    state = index_folder_state(folder)
    if state == "foreign":
        what = "is not a folder" if Path(folder).exists() and not Path(folder).is_dir() else \
            f"is not empty and is not a cliplab index (no {MARKER} file)"
        raise DataError(f"--out {folder} {what}; nothing was written. Give a new or empty folder for the index")


def check_out_beside_roots(folder: Path, roots: list[Path]) -> None:
    """Refuse an index folder that is, or contains, an indexed root; one inside a root is left out of the walk."""
    out = Path(folder).resolve()
    for root in roots:
        if root == out or root.is_relative_to(out):
            raise DataError(f"--out {folder} is or contains the indexed folder {root}; put the index outside the "
                            f"photos, e.g. --out {root.parent / (root.name + '-index')}")


def claim_index_folder(folder: Path) -> None:
    """Create the folder if needed and write cliplab's marker (an existing index keeps its own)."""
    folder = Path(folder)
    if index_folder_state(folder) != "index":
        write_json(folder / MARKER, {"format": "cliplab-index", "version": 1,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "note": "written by cliplab index; cliplab only ever deletes its own files here"})


def index_lock(folder: Path):
    """An exclusive lock on the index folder for one build (a second build at once is refused)."""
    return exclusive_lock(Path(folder) / LOCK, f"{folder} is being updated by another `cliplab index` (it holds "
                          f"{LOCK}); wait for it to finish, then run this again")


def work_folder(folder: Path) -> Path:
    """The build's resumable work folder, created with cliplab's marker."""
    work = Path(folder) / WORK
    work.mkdir(exist_ok=True)
    if not (work / WORK_MARKER).is_file():
        write_json(work / WORK_MARKER, {"format": "cliplab-index-work", "version": 1})
    return work


def remove_work_folder(folder: Path) -> None:
    """Remove the work folder only when it carries cliplab's marker (never a folder of the user's)."""
    work = Path(folder) / WORK
    if (work / WORK_MARKER).is_file() and not work.is_symlink():
        shutil.rmtree(work, ignore_errors=True)
