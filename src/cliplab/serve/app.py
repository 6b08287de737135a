"""The search server: FastAPI over a read-only photo index (``cliplab serve``).

Endpoints: ``/`` (the web page), ``/healthz``, ``/api/info``, ``/api/search`` (GET text; POST JSON text /
indexed id for "more like this" / relevance feedback on result ids, or a multipart image upload),
``/image/{id}``, ``/thumb/{id}``, ``/api/duplicates`` and ``/duplicates`` (the review page),
clip-retrieval's ``/indices-list``, ``/knn-service`` and ``/metadata`` (same field names, so its front end
can point here), ``/metrics`` (Prometheus) and the OpenAPI schema (``/docs``, ``/openapi.json``).

Safety (threat model in the README's search section):

- reach: loopback by default; the ``Host`` header must name this server (localhost, 127.0.0.1, [::1], the
  bind address or an ``--allowed-host``), so a DNS-rebinding page cannot talk to it; off loopback a token of
  16+ characters is required (``serve`` refuses to start otherwise unless told ``no_auth``);
- the token guards everything but ``/healthz``, the page and its static files; it is taken from an
  ``Authorization: Bearer`` header (or ``?token=`` on the page load only), answered with an HttpOnly,
  SameSite=Strict session cookie so ``<img src="/image/1">`` works without the token in any URL;
- files are served by index id only (never a path from a request) and must resolve inside their indexed
  root; ids outside 0..2**63-1 are a 404;
- every input is bounded: body size (Content-Length, no chunked uploads) and read time, uploaded pixels
  (decoded reduced, only JPEG/PNG/WebP/BMP/GIF decoders), query length, k, list lengths, waiting image and
  text queries (then 429 with Retry-After), connections and header size (uvicorn);
- decoding and embedding never run on the event loop: image work runs in worker threads, at most
  ``cores - 1`` at a time, so health checks and text queries keep being answered during uploads;
- no URL is fetched unless ``allow_urls``, and then only a public (global) address, pinned after the
  check, without redirects, within a total deadline and size cap, image content types only;
- every error is a JSON 4xx (502 for a failed image_url fetch), never a traceback; a rebuilt index with
  another model is not loaded (the old generation keeps serving, ``/healthz`` says degraded).
"""


import base64
import hashlib
import hmac
import io
import ipaddress
import os
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from cliplab.errors import CliplabError, ConfigError
from cliplab.extras import require
from cliplab.serve.index import CURRENT, PhotoIndex
from cliplab.serve.query import (DEFAULT_MODE, SEARCH_MODES, QueryBusy, QueryEncoder, QueryTerm, decode_image_bytes,
                                 feedback_vectors, query_words, ranked_hits, refine_with_feedback)

STATIC = Path(__file__).with_name("static")
MAX_ID = 2**63 - 1  # SQLite's INTEGER range: any other id is simply not found
MIN_TOKEN_CHARS = 16
MAX_HEADER_BYTES = 16 * 1024  # also uvicorn's (h11) limit on a request head still arriving
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
COOKIE = "cliplab_session"
PAGES = ("/", "/duplicates")  # the web pages: no data in them (it comes from the API)
PUBLIC_PATHS = (*PAGES, "/healthz")  # and /static/*: no data behind them
PAGE_CSP = "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"  # no framing (clickjacking)


class ServerSettings:
    """What one server serves and its limits. ``host`` is the bind address (it joins the allowed ``Host``
    names); ``allowed_hosts`` adds more (``*.example.org`` patterns, or ``*`` for any)."""

    def __init__(self, index_dir: str | Path, *, token: str | None = None, host: str = "127.0.0.1",
                 allowed_hosts: list[str] | tuple[str, ...] = (), max_upload_bytes: int = 10 * 2**20,
                 max_pixels: int = 25_000_000, max_query_chars: int = 500, max_k: int = 200,
                 allow_urls: bool = False, url_timeout: float = 10.0, body_timeout: float = 30.0,
                 image_workers: int | None = None, max_waiting_images: int = 8,
                 thumb_dir: str | Path | None = None, thumb_size: int = 256, device: str = "cpu",
                 index_name: str | None = None, cors_origins: list[str] | tuple[str, ...] = ()) -> None:
        from cliplab.utils import default_cache_dir

        self.index_dir = Path(index_dir)
        self.token = token or None
        if self.token is not None and (len(self.token) < MIN_TOKEN_CHARS or not self.token.isascii()
                                       or not self.token.isprintable() or " " in self.token):
            raise ConfigError(f"--token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
                              "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe())')")
        self.host, self.extra_hosts = host, [h.strip().lower() for h in allowed_hosts if h.strip()]
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.max_query_chars, self.max_k = max_query_chars, max_k
        self.allow_urls, self.url_timeout, self.body_timeout = allow_urls, url_timeout, body_timeout
        # one core stays free for the event loop, health checks and text queries
        self.image_workers = image_workers or max(1, (os.cpu_count() or 2) - 1)
        self.max_waiting_images = max_waiting_images
        self.thumb_size, self.device = thumb_size, device
        self.index_name = index_name or self.index_dir.resolve().name
        self.thumb_dir = Path(thumb_dir) if thumb_dir else default_cache_dir() / "thumbs"
        self.cors_origins = [_checked_origin(o) for o in cors_origins]

    @property
    def allowed_hosts(self) -> list[str]:
        """Host names (no port) a request may name: loopback, the bind address (for a wildcard bind: this
        machine's host name) and the extra ones."""
        bind = _bare_host(self.host)
        names = list(LOOPBACK_NAMES)
        names += [socket.gethostname().lower()] if bind in ("0.0.0.0", "::", "") else [bind]
        return list(dict.fromkeys(names + [_bare_host(h) for h in self.extra_hosts]))


def _bare_host(host: str) -> str:
    """``[::1]:8000`` -> ``::1``, ``Example.org.:80`` -> ``example.org``, ``1.2.3.4`` -> itself."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")  # name or address, optional port


def host_allowed(header: str | None, allowed: list[str]) -> bool:
    """Whether a ``Host`` header is well formed (a name or address and an optional port: no userinfo, path or
    spaces, since it also builds this server's own URLs) and names this server."""
    if not header or not HOST_HEADER.fullmatch(header):
        return False
    name = _bare_host(header)
    return any(a == "*" or name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def is_loopback(host: str) -> bool:
    bare = _bare_host(host)
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


class SearchService:
    """The index, its model and the query encoder. A newly committed generation is opened once per change of
    ``CURRENT``, and only if it was built with the same model (fingerprint and dimension); otherwise, or if it
    cannot be opened, the previous generation keeps serving and ``problem`` says why (not retried until
    ``CURRENT`` changes again)."""

    def __init__(self, settings: ServerSettings) -> None:
        from cliplab.models.factory import load_model

        self.settings = settings
        self.lock = threading.Lock()
        self.seen = self._pointer()
        self.index = PhotoIndex(settings.index_dir)
        self.model = load_model(self.index.info["model"], device=settings.device)
        self.fingerprint, self.dim = self.model.fingerprint(), self.index.info["dim"]
        if self.fingerprint != self.index.info["model_fingerprint"]:
            raise ConfigError(f"the model {self.index.info['model']!r} no longer matches the one that built "
                              f"{settings.index_dir} (its weights changed); rebuild the index")
        self.encoder = QueryEncoder(self.model, onnx_text=True)
        self.problem: str | None = None

    def _pointer(self) -> tuple | None:
        try:
            st = (self.settings.index_dir / CURRENT).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self) -> PhotoIndex:
        pointer = self._pointer()
        if pointer != self.seen and pointer is not None:
            with self.lock:
                if pointer != self.seen:
                    self.seen = pointer
                    self._reload()
        return self.index

    def _reload(self) -> None:
        try:
            fresh = PhotoIndex(self.settings.index_dir)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old generation
            self.problem = (f"the newly committed index generation could not be opened ({exc.__class__.__name__}); "
                            "serving the previous one")
            return
        if fresh.info.get("model_fingerprint") != self.fingerprint or fresh.info.get("dim") != self.dim:
            self.problem = (f"the index was rebuilt with another model ({fresh.info.get('model')!r}); serving the "
                            "previous generation: restart the server to load the new one")
            return
        self.index, self.problem = fresh, None


class _ImageGate:
    """Decoding and embedding of query images: at most ``slots`` at once (worker threads), at most
    ``waiting`` more queued; beyond that :class:`QueryBusy` (429). Loop-agnostic: called in a worker thread."""

    def __init__(self, slots: int, waiting: int) -> None:
        self.slots = threading.BoundedSemaphore(slots)
        self.limit, self.admitted, self.lock = slots + waiting, 0, threading.Lock()

    def __call__(self, fn, *args):
        with self.lock:
            if self.admitted >= self.limit:
                raise QueryBusy("too many image queries in progress; retry shortly")
            self.admitted += 1
        try:
            with self.slots:
                return fn(*args)
        finally:
            with self.lock:
                self.admitted -= 1


def _session_value(token: str) -> str:
    """The cookie's value: derived from the token (the token itself is never stored by the browser)."""
    return hmac.new(token.encode(), b"cliplab session cookie", hashlib.sha256).hexdigest()


def _checked_origin(origin: str) -> str:
    """A CORS origin as a browser sends it (``scheme://host[:port]``); ``*`` is never accepted."""
    from urllib.parse import urlsplit

    origin = origin.strip().rstrip("/")
    parts = urlsplit(origin)
    if origin == "*" or parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ConfigError(f"--cors-origin takes an origin like http://localhost:3005 (never *), not {origin!r}")
    return origin


def create_app(settings: ServerSettings):
    """The FastAPI application for one index."""
    require("fastapi")
    require("multipart", "image uploads")
    from fastapi import FastAPI

    ctx = SearchContext(settings)
    app = FastAPI(title="cliplab search", version=_version(),
                  description="Search a photo folder by text or image with a cliplab model.")
    _add_error_handlers(app)
    _add_guard(app, ctx)
    if settings.cors_origins:  # opt-in, named origins only; added last, so it answers preflights first
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False)
    _add_page_routes(app, ctx)
    _add_search_routes(app, ctx)
    _add_file_routes(app, ctx)
    _add_clip_retrieval_routes(app, ctx)
    _add_duplicates_route(app, ctx)
    _add_metrics_route(app, ctx)
    return app


class ApiError(Exception):
    """A refusal answered as ``{"error": message}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _busy(exc: QueryBusy) -> ApiError:
    return ApiError(429, str(exc), {"Retry-After": "1"})


class SearchContext:
    """What one app's routes share: the settings, the search service, the image gate, the request admission and
    metrics, the OpenAPI models, and the checks and searches the routes are made of."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.service = SearchService(settings)
        self.gate = _ImageGate(settings.image_workers, settings.max_waiting_images)
        self.admission = _Admission(settings)
        self.metrics = _Metrics()
        self.models = _api_models(settings)

    def errors(self, *codes: int) -> dict:
        """The OpenAPI ``responses`` of an operation: JSON errors with these codes and the ones any may give."""
        return {c: {"model": self.models.ErrorBody} for c in (400, 401, 422, 431, *codes)}

    def check_k(self, k: int) -> int:
        if k < 1:
            raise ApiError(422, "k must be >= 1")
        return min(k, self.settings.max_k)

    def check_text(self, q: str) -> str:
        if not q.strip():
            raise ApiError(422, "empty query")
        if len(q) > self.settings.max_query_chars:
            raise ApiError(422, f"query longer than {self.settings.max_query_chars} characters")
        return q

    @staticmethod
    def filters(**fields):
        """A :class:`~cliplab.serve.index.PhotoFilter` from request fields (a bad date or folder: 422)."""
        from cliplab.serve.index import PhotoFilter

        try:
            return PhotoFilter(**fields)
        except CliplabError as exc:
            raise ApiError(422, str(exc)) from None

    def check_id(self, item_id: int) -> int:
        if not 0 <= item_id <= MAX_ID:
            raise ApiError(404, f"no image with id {item_id}")
        return item_id

    def run_search(self, terms: list[QueryTerm], k: int, liked: list[int] = (), disliked: list[int] = (),
                   filters=None, mode: str = "semantic") -> dict:
        """Compose the query terms, fold in relevance feedback on judged result ids, rank (semantic, keyword or
        hybrid: :func:`~cliplab.serve.query.ranked_hits`) among the photos ``filters`` keeps, when given."""
        index = self.service.current()
        t0 = time.perf_counter()
        if mode not in SEARCH_MODES:
            raise ApiError(422, f"mode must be one of {', '.join(SEARCH_MODES)}")
        if mode == "keyword" and (liked or disliked or not query_words(terms).strip()):
            raise ApiError(422, "keyword mode needs words in the query (and takes no relevance feedback)")
        try:
            if filters is not None and filters.active:
                index.check_filters(filters)  # an index without recorded facts: refused before any encoding
            vector, used = ((None, {int(t.value) for t in terms if t.kind == "item"}) if mode == "keyword" else
                            self.service.encoder.compose(terms, index) if terms else (None, set()))
            if liked or disliked:
                vector = refine_with_feedback(vector, feedback_vectors(index, [self.check_id(i) for i in liked]),
                                              feedback_vectors(index, [self.check_id(i) for i in disliked]))
        except QueryBusy as exc:
            raise _busy(exc) from None
        except CliplabError as exc:
            raise ApiError(404 if "no indexed image" in str(exc) else 422, str(exc)) from None
        try:  # disliked results are not shown again
            results = ranked_hits(index, vector, query_words(terms), k, mode=mode, exclude=used | set(disliked),
                                  filters=filters)
        except CliplabError as exc:
            raise ApiError(422, str(exc)) from None
        took = (time.perf_counter() - t0) * 1000
        return {"k": k, "took_ms": round(took, 2), "count": len(index),
                "results": [_public_hit(h) for h in results]}

    def load_upload(self, data: bytes):
        if len(data) > self.settings.max_upload_bytes:
            raise ApiError(413, f"image larger than {self.settings.max_upload_bytes} bytes")
        try:
            return decode_image_bytes(data, self.settings.max_pixels)
        except CliplabError as exc:
            raise ApiError(413 if "too large" in str(exc) else 415, str(exc)) from None

    def image_search(self, data: bytes, extra: list[QueryTerm], k: int, filters=None, mode: str = "semantic") -> dict:
        """Decode + embed + search an uploaded image (in a worker thread, through the gate)."""
        try:
            return self.gate(lambda: self.run_search([QueryTerm(1.0, "image", self.load_upload(data)), *extra], k,
                                                     filters=filters, mode=mode))
        except QueryBusy as exc:
            raise _busy(exc) from None

    async def read_upload_form(self, request) -> tuple[bytes, list[QueryTerm], int, object, str]:
        """A multipart search (image, text, k, filters): the image's bytes, the extra text term, k and the
        :class:`~cliplab.serve.index.PhotoFilter`."""
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart search needs an 'image' file field")
        data = await upload.read(self.settings.max_upload_bytes + 1)
        text = form.get("text")
        extra = [QueryTerm(1.0, "text", self.check_text(text))] if isinstance(text, str) and text.strip() else []
        try:
            k = self.check_k(int(form.get("k") or 10))
        except ValueError:
            raise ApiError(422, "k must be an integer") from None
        fields = {f: form.get(f) for f in ("after", "before", "camera", "folder")}
        mode = form.get("mode") if isinstance(form.get("mode"), str) else DEFAULT_MODE
        return data, extra, k, self.filters(**{f: v for f, v in fields.items() if isinstance(v, str) and v}), mode

    def json_terms(self, body) -> list[QueryTerm]:
        """The query terms of a JSON search (text, id for "more like this", minus_text)."""
        terms = []
        if body.text:
            terms.append(QueryTerm(1.0, "text", self.check_text(body.text)))
        if body.id is not None:
            if not 0 <= body.id <= MAX_ID:
                raise ApiError(404, f"no indexed image with id {body.id}")
            terms.append(QueryTerm(1.0, "item", body.id))
        if body.minus_text:
            terms.append(QueryTerm(-1.0, "text", self.check_text(body.minus_text)))
        if not terms and not body.positive_ids:
            raise ApiError(422, "give text, id (more like this), positive_ids or an uploaded image")
        return terms

    def item_file(self, item_id: int) -> Path:
        path = self.service.current().file_path(self.check_id(item_id))
        if path is None:
            raise ApiError(404, f"no image with id {item_id}")
        return path

    def thumbnail(self, item_id: int) -> Path:
        """The cached thumbnail of an indexed image (made in a worker thread, through the gate)."""
        index = self.service.current()
        item = index.item(self.check_id(item_id))
        if item is None:
            raise ApiError(404, f"no image with id {item_id}")
        path = self.item_file(item_id)
        settings = self.settings
        try:
            return self.gate(_thumbnail, path, item["sha256"], settings.thumb_dir, settings.thumb_size, index.info)
        except QueryBusy as exc:
            raise _busy(exc) from None
        except CliplabError:  # replaced since indexing by something unreadable, too large or of another format
            raise ApiError(404, f"image {item_id} can no longer be read") from None

    def knn(self, body, origin: str = "") -> list[dict]:
        """clip-retrieval's ``/knn-service``: one of text, image (base64), image_url or embedding_input; image
        URLs absolute under ``origin`` (its front end shows them from another origin)."""
        self._check_knn(body)
        k = self.check_k(body.num_result_ids or body.num_images)
        index = self.service.current()
        if body.embedding_input is not None:
            hits = self._embedding_hits(body.embedding_input, index, k)
        elif body.text is not None:
            hits = self.run_search([QueryTerm(1.0, "text", self.check_text(body.text))], k)["results"]
        else:
            hits = self.image_search(self._knn_image(body), [], k)["results"]
        return [{"id": h["id"], "similarity": h["score"], "url": f"{origin}/image/{h['id']}",
                 "caption": display_caption(h), "image_path": h["path"]} for h in hits[: body.num_images]]

    def _check_knn(self, body) -> None:
        if body.indice_name not in (None, "", self.settings.index_name):
            raise ApiError(404, f"unknown indice_name {body.indice_name!r}; see /indices-list")
        if body.modality != "image":
            raise ApiError(422, "only the image modality is indexed (modality must be 'image')")
        given = [x is not None for x in (body.text, body.image, body.image_url, body.embedding_input)]
        if sum(given) != 1:
            raise ApiError(422, "give exactly one of text, image (base64), image_url or embedding_input")
        if body.num_images < 1:
            raise ApiError(422, "num_images must be >= 1")

    @staticmethod
    def _embedding_hits(embedding: list[float], index: PhotoIndex, k: int) -> list[dict]:
        import numpy as np

        v = np.asarray(embedding, dtype=np.float64)
        norm = float(np.linalg.norm(v)) if np.isfinite(v).all() else 0.0
        if v.shape != (index.info["dim"],) or not np.isfinite(norm) or norm == 0:
            raise ApiError(422, f"embedding_input must be {index.info['dim']} finite numbers, not all zero")
        return [_public_hit(h) for h in index.search((v / norm).astype(np.float32), k)]

    def _knn_image(self, body) -> bytes:
        """The image of a knn query: decoded from base64, or fetched from image_url (only with allow_urls)."""
        if body.image is not None:
            try:
                return base64.b64decode(body.image, validate=True)
            except ValueError:
                raise ApiError(422, "image is not valid base64") from None
        if not self.settings.allow_urls:
            raise ApiError(403, "image_url queries are disabled on this server (start it with --allow-urls)")
        try:
            return fetch_image(body.image_url, self.settings.max_upload_bytes, self.settings.url_timeout)
        except FetchError as exc:
            raise ApiError(exc.status, str(exc)) from None

    def metadata(self, ids: list[int], origin: str = "") -> list[dict]:
        ids = [i for i in ids if 0 <= i <= MAX_ID]  # others are not found
        found = self.service.current().items(ids)
        return [{"id": i, "metadata": {"url": f"{origin}/image/{i}", "caption": display_caption(found[i]),
                                       "image_path": found[i]["path"], "width": found[i]["width"],
                                       "height": found[i]["height"]}} for i in ids if i in found]


class _Admission:
    """Host, limits and auth, checked before any handler runs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.allowed = settings.allowed_hosts
        self.session = _session_value(settings.token) if settings.token else None

    async def __call__(self, request):
        """An early answer (or None), and whether to set the session cookie on the handler's answer."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal, False
        early, set_cookie = self._authenticate(request)
        if early is not None:
            return early, set_cookie
        early = await self._read_body(request)
        return (early, False) if early is not None else (None, set_cookie)

    def _refusal(self, request):
        """A wrong Host, or headers or a body over the limits."""
        limit = self.settings.max_upload_bytes
        if not host_allowed(request.headers.get("host"), self.allowed):
            return _error(400, "invalid Host header (start the server with --allowed-host NAME to accept it)")
        if sum(len(k) + len(v) for k, v in request.headers.raw) > MAX_HEADER_BYTES:
            return _error(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")
        length = request.headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > limit):
            return _error(413, f"request body too large (limit {limit} bytes)")
        if request.method in ("POST", "PUT", "PATCH") and length is None and request.headers.get("transfer-encoding"):
            return _error(411, "send a Content-Length (chunked uploads are not accepted)")
        return None

    def _authenticate(self, request):
        """The token (bearer header or session cookie) on everything but the public paths; a page link's
        ``?token=`` swapped for the cookie. An early answer (or None) and whether to set the cookie."""
        from fastapi.responses import RedirectResponse

        session, token = self.session, self.settings.token
        set_cookie = False
        path = request.scope["path"]  # never request.url (rebuilt with the Host header)
        if session and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            bearer = request.headers.get("authorization", "")
            bearer = bearer[7:].strip() if bearer[:7].lower() == "bearer " else ""
            cookie_ok = hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), session.encode())
            if bearer and not hmac.compare_digest(bearer.encode(), token.encode()) or not bearer and not cookie_ok:
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}), False
            set_cookie = not cookie_ok
        if session and path in PAGES and "token" in request.query_params:  # a shared link: swap it for a cookie
            given = request.query_params["token"]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "wrong token in the link", {"WWW-Authenticate": "Bearer"}), False
            rest = "&".join(f"{k}={v}" for k, v in _query_pairs(request.url.query) if k != "token")
            return RedirectResponse(path + (f"?{rest}" if rest else ""), status_code=303), True  # path: a page
        return None, set_cookie

    async def _read_body(self, request):
        """A body read within the time limit (cached for the handler; a stalled sender is cut off)."""
        import anyio
        from starlette.requests import ClientDisconnect

        length = request.headers.get("content-length")
        if request.method in ("POST", "PUT", "PATCH") and length is not None and int(length) > 0:
            try:
                with anyio.fail_after(self.settings.body_timeout):
                    await request.body()
            except TimeoutError:
                return _error(408, f"request body not received within {self.settings.body_timeout:g} s")
            except ClientDisconnect:
                return _error(400, "the request body ended early")
        return None


def _add_error_handlers(app) -> None:
    """Errors are always JSON, never a traceback."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x not in ("body", "query", "path"))
        return _error(422, f"invalid request: {where or 'input'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged by uvicorn; the client gets no traceback
        return _error(500, "internal error")


def _add_guard(app, ctx: SearchContext) -> None:
    """The middleware: admission before any handler, the session cookie, nosniff and no-referrer, metrics."""
    app.add_middleware(_Guard, ctx=ctx)


class _Guard:
    """A pure ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request)."""

    def __init__(self, app, ctx: SearchContext) -> None:
        self.app, self.admit, self.metrics = app, ctx.admission, ctx.metrics
        self.cookie = self._cookie_header(ctx.admission.session) if ctx.admission.session else None

    @staticmethod
    def _cookie_header(session: str) -> tuple[str, str]:
        from starlette.responses import Response

        response = Response()
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/")
        return "set-cookie", response.headers["set-cookie"]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import MutableHeaders
        from starlette.requests import Request

        t0, status = time.perf_counter(), [500]
        if scope["method"] == "POST" and scope["path"] in JSON_BODY_PATHS:
            scope = _as_json_body(scope)
        request = Request(scope, receive)
        early, set_cookie = await self.admit(request)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                if set_cookie and self.cookie and message["status"] < 400:
                    headers.append(*self._secure(self.cookie, scope))
            await send(message)

        try:
            if early is not None:
                await early(scope, receive, send_with_headers)
            else:
                await self.app(scope, _replay(request, receive), send_with_headers)
        finally:
            self.metrics.observe(scope["path"], status[0], time.perf_counter() - t0)

    @staticmethod
    def _secure(cookie: tuple[str, str], scope) -> tuple[str, str]:
        return (cookie[0], cookie[1] + "; secure") if scope.get("scheme") == "https" else cookie


# clip-retrieval's ClipClient and front end post JSON without a JSON content type (text/plain, or none)
JSON_BODY_PATHS = ("/knn-service", "/metadata")


def _as_json_body(scope: dict) -> dict:
    """The request's scope with its body declared JSON (whatever its content type said): the route parses and
    validates it as JSON (a 422 when it is not), within the same size and time limits."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


def _replay(request, receive):
    """The ASGI ``receive`` for the handler: the body admission already read, then the real channel."""
    body = getattr(request, "_body", None)
    if body is None:
        return receive
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _api_models(settings: ServerSettings) -> SimpleNamespace:
    """The OpenAPI description of requests and answers (schemathesis checks every answer against it)."""
    return SimpleNamespace(**_answer_models(settings), **_knn_models(settings))


def _answer_models(settings: ServerSettings) -> dict:
    from pydantic import BaseModel, Field

    class ErrorBody(BaseModel):
        error: str

    class Hit(BaseModel):
        id: int
        score: float
        path: str
        width: int
        height: int
        captions: list[str]
        image: str
        thumb: str
        taken: str | None = None
        camera: str | None = None
        generated: str | None = Field(None, description="the caption the index's captioner wrote for the photo "
                                                        "(`cliplab index --captioner`)")

    class SearchResult(BaseModel):
        k: int
        took_ms: float
        count: int
        results: list[Hit]

    class Health(BaseModel):
        status: str = Field(description="ok, or degraded (a newer index generation could not be loaded)")
        images: int
        reason: str | None = None

    class SearchBody(BaseModel):
        text: str | None = Field(None, description="text query")
        id: int | None = Field(None, description="an indexed image: 'more like this'")
        minus_text: str | None = Field(None, description="text to subtract from the query")
        mode: str = Field(DEFAULT_MODE, description="semantic, keyword or hybrid (both lists fused)")
        after: str | None = Field(None, max_length=40, description="only photos taken on/after (YYYY-MM-DD)")
        before: str | None = Field(None, max_length=40, description="only photos taken before (YYYY-MM-DD)")
        camera: str | None = Field(None, max_length=200, description="camera make/model contains this")
        folder: str | None = Field(None, max_length=500, description="only photos in this folder (relative)")
        positive_ids: list[int] = Field([], max_length=settings.max_k,
                                        description="results judged relevant: the query moves towards them (Rocchio)")
        negative_ids: list[int] = Field([], max_length=settings.max_k,
                                        description="results judged not relevant: the query moves away from them")
        k: int = 10

    return {"ErrorBody": ErrorBody, "SearchResult": SearchResult, "Health": Health, "SearchBody": SearchBody}


def _knn_models(settings: ServerSettings) -> dict:
    """clip-retrieval's request and answer shapes (same field names), bounded by this server's limits."""
    from pydantic import BaseModel, Field

    max_b64 = (settings.max_upload_bytes + 2) // 3 * 4 + 4

    class KnnBody(BaseModel):
        text: str | None = None
        image: str | None = Field(None, max_length=max_b64, description="base64 of an image file")
        image_url: str | None = Field(None, max_length=2048)
        embedding_input: list[float] | None = Field(None, max_length=4096)
        modality: str = "image"
        num_images: int = 40
        num_result_ids: int | None = None
        indice_name: str | None = None
        deduplicate: bool = False
        use_mclip: bool = False
        use_safety_model: bool = False
        use_violence_detector: bool = False
        aesthetic_score: str | int | None = None
        aesthetic_weight: str | float | None = None

    class KnnHit(BaseModel):
        id: int
        similarity: float
        url: str
        caption: str
        image_path: str

    class MetadataBody(BaseModel):
        ids: list[int] = Field(max_length=settings.max_k)
        indice_name: str | None = None

    return {"KnnBody": KnnBody, "KnnHit": KnnHit, "MetadataBody": MetadataBody}


def _add_page_routes(app, ctx: SearchContext) -> None:
    """The web page, its static files, ``/healthz`` and ``/api/info``."""
    from fastapi.responses import FileResponse, HTMLResponse

    settings, service = ctx.settings, ctx.service

    def page_response(name: str):
        """A page: the common head (``head.html``: charset, viewport, the shared style sheet), then its own file."""
        html = (STATIC / "head.html").read_text(encoding="utf-8") + (STATIC / name).read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    def page():
        return page_response("index.html")

    @app.get("/duplicates", include_in_schema=False)
    def duplicates_page():
        return page_response("duplicates.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # served by name from a fixed list
        if name not in files:
            raise ApiError(404, "not found")
        return FileResponse(files[name])

    @app.get("/healthz", response_model=ctx.models.Health, response_model_exclude_none=True, responses=ctx.errors())
    def healthz():
        """``ok``; or ``degraded`` (still 200: the previous generation is served) with the reason."""
        index = service.current()
        out = {"status": "ok", "images": len(index)}
        return out if service.problem is None else {**out, "status": "degraded", "reason": service.problem}

    @app.get("/api/info", responses=ctx.errors())
    def info():
        index = service.current()
        return {**index.summary(), "name": settings.index_name, "max_k": settings.max_k,
                "max_upload_bytes": settings.max_upload_bytes, "version": _version()}


def _add_search_routes(app, ctx: SearchContext) -> None:
    """``/api/search``: GET with a text query; POST with JSON or a multipart image upload."""
    from fastapi import Query, Request
    from starlette.concurrency import run_in_threadpool

    SearchResult, SearchBody = ctx.models.SearchResult, ctx.models.SearchBody
    form_schema = {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}, "text": {"type": "string"}, "k": {"type": "integer"},
        **{f: {"type": "string", "maxLength": 200} for f in ("after", "before", "camera", "folder", "mode")}}}
    post_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchBody.model_json_schema()},
        "multipart/form-data": {"schema": form_schema}}}}

    @app.get("/api/search", response_model=SearchResult, responses=ctx.errors(404, 429))
    def search_get(q: str = Query(..., description="text query"), k: int = Query(10),
                   mode: str = Query(DEFAULT_MODE, description="semantic, keyword or hybrid (both lists fused)"),
                   after: str | None = Query(None, max_length=40, description="taken on/after (YYYY-MM-DD)"),
                   before: str | None = Query(None, max_length=40, description="taken before (YYYY-MM-DD)"),
                   camera: str | None = Query(None, max_length=200, description="camera contains this"),
                   folder: str | None = Query(None, max_length=500, description="in this folder (relative)")):
        filters = ctx.filters(after=after, before=before, camera=camera, folder=folder)
        return ctx.run_search([QueryTerm(1.0, "text", ctx.check_text(q))], ctx.check_k(k), filters=filters, mode=mode)

    @app.post("/api/search", response_model=SearchResult, openapi_extra=post_body,
              responses=ctx.errors(404, 408, 411, 413, 415, 429))
    async def search_post(request: Request):
        """JSON (text, id, minus_text, positive_ids, negative_ids, mode, filters, k) or a multipart upload
        (image, text, k, mode, filters). The body is read here; the
        decoding, embedding and search run in worker threads."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, extra, k, filters, mode = await ctx.read_upload_form(request)
            return await run_in_threadpool(ctx.image_search, data, extra, k, filters, mode)
        try:
            body = SearchBody.model_validate(await request.json())
        except (ValueError, RecursionError) as exc:
            raise ApiError(422, f"invalid JSON body: {_first_error(exc)}") from None
        filters = ctx.filters(after=body.after, before=body.before, camera=body.camera, folder=body.folder)
        return await run_in_threadpool(ctx.run_search, ctx.json_terms(body), ctx.check_k(body.k), body.positive_ids,
                                       body.negative_ids, filters, body.mode)


def _add_file_routes(app, ctx: SearchContext) -> None:
    """``/image/{id}`` and ``/thumb/{id}``: files by index id only."""
    from fastapi.responses import FileResponse, Response

    image_content = {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "the image file"}
    file_headers = {"Content-Security-Policy": "default-src 'none'; sandbox"}

    @app.get("/image/{item_id}", response_class=Response, responses={200: image_content, **ctx.errors(404)})
    def image(item_id: int):
        return FileResponse(ctx.item_file(item_id), headers={"Cache-Control": "private, max-age=3600", **file_headers})

    @app.get("/thumb/{item_id}", response_class=Response, responses={200: image_content, **ctx.errors(404, 429)})
    def thumb(item_id: int):
        return FileResponse(ctx.thumbnail(item_id), media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=86400", **file_headers})


def _add_clip_retrieval_routes(app, ctx: SearchContext) -> None:
    """clip-retrieval's ``/indices-list``, ``/knn-service`` and ``/metadata`` (its front end can point here)."""
    from fastapi import Request

    KnnBody, KnnHit, MetadataBody = ctx.models.KnnBody, ctx.models.KnnHit, ctx.models.MetadataBody

    @app.get("/indices-list", response_model=list[str], responses=ctx.errors())
    def indices_list():
        return [ctx.settings.index_name]

    @app.post("/knn-service", response_model=list[KnnHit], responses=ctx.errors(403, 404, 408, 411, 413, 415, 429, 502))
    def knn_service(body: KnnBody, request: Request):
        return ctx.knn(body, _own_origin(request))

    @app.post("/metadata", responses=ctx.errors(408, 411, 413))
    def metadata(body: MetadataBody, request: Request):
        return ctx.metadata(body.ids, _own_origin(request))


def _own_origin(request) -> str:
    """``http://HOST[:PORT]`` of this server as the client named it (the Host header, already checked against
    the allowed names): image URLs handed to clip-retrieval's front end, which runs on another origin."""
    return f"{request.url.scheme}://{request.headers.get('host', '127.0.0.1')}"


def _add_duplicates_route(app, ctx: SearchContext) -> None:
    """``/api/duplicates``: exact and near groups of the served index. The neighbour graph is computed once per
    index generation (in a worker thread; one computation at a time, others get a 429 meanwhile), then any
    threshold is a cheap cut of it; at most ``limit`` groups are answered."""
    import numpy as np
    from fastapi import Query

    from cliplab.serve.duplicates import find_duplicates, neighbour_graph

    graphs: dict = {}
    lock = threading.Lock()

    @app.get("/api/duplicates", responses=ctx.errors(429))
    def duplicates(threshold: float | None = Query(None, description="cosine similarity for near duplicates "
                                                                     "(default: the library's, none for conse)"),
                   limit: int = Query(200, description="groups answered at most (exact first)")):
        """Groups of exact and near duplicates (ids, paths relative to their indexed folder, the keeper first,
        each item's suggestion: keep, remove or review); cliplab deletes nothing: the page exports a list."""
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ApiError(422, "threshold must be in (0, 1]")
        if not 1 <= limit <= 10_000:
            raise ApiError(422, "limit must be between 1 and 10000")
        index = ctx.service.current()
        if not lock.acquire(blocking=False):
            raise ApiError(429, "duplicate groups are being computed; retry shortly", {"Retry-After": "2"})
        try:
            generation = index.current["generation"]
            if generation not in graphs:
                graphs.clear()
                vectors = np.asarray(index.vectors, dtype=np.float32)
                graphs[generation] = neighbour_graph(vectors, search=index.faiss.search)
            report = find_duplicates(index, threshold, graph=graphs[generation]).to_dict()  # any threshold: a cut
        finally:
            lock.release()
        groups = [("exact", g) for g in report["exact"]] + [("near", g) for g in report["near"]]
        shown = groups[:limit]
        return {**{k: v for k, v in report.items() if k not in ("exact", "near", "index")},
                "roots": [str(r) for r in index.roots], "groups_total": len(groups),
                "exact": _public_groups([g for kind, g in shown if kind == "exact"]),
                "near": _public_groups([g for kind, g in shown if kind == "near"])}


def _first_error(exc: Exception) -> str:
    """``field: message`` of a pydantic validation error (its first), else the exception's first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return f"{'.'.join(str(p) for p in first.get('loc', ())) or 'body'}: {first.get('msg', '')}"
        except (IndexError, TypeError, AttributeError):
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _public_groups(groups: list[list[dict]]) -> list[list[dict]]:
    """Duplicate groups as the API answers them: item ids and paths relative to their root (an index into
    ``roots``), with thumbnail and image URLs."""
    return [[{**{k: v for k, v in it.items() if k not in ("file", "sha256")}, "image": f"/image/{it['id']}",
              "thumb": f"/thumb/{it['id']}"} for it in group] for group in groups]


def _add_metrics_route(app, ctx: SearchContext) -> None:
    from fastapi.responses import Response

    @app.get("/metrics", include_in_schema=False)
    def prometheus():
        return Response(ctx.metrics.render(len(ctx.service.current())), media_type="text/plain; version=0.0.4")


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """The raw ``key=value`` pairs of a query string (values kept percent-encoded)."""
    return [(p.partition("=")[0], p.partition("=")[2]) for p in query.split("&") if p]


def display_caption(item: dict) -> str:
    """A photo's caption for clients that show one: its dataset caption, else its generated one, else ''."""
    return (item.get("captions") or [item.get("generated") or ""])[0]


def _public_hit(hit: dict) -> dict:
    return {"id": hit["id"], "score": round(hit["score"], 6), "path": hit["path"], "width": hit["width"],
            "height": hit["height"], "captions": hit["captions"], "image": f"/image/{hit['id']}",
            "thumb": f"/thumb/{hit['id']}", "taken": hit.get("taken"), "camera": hit.get("camera"),
            "generated": hit.get("generated")}


def _thumbnail(path: Path, sha256: str, folder: Path, size: int, info: dict) -> Path:
    """A JPEG thumbnail keyed by content hash and size, generated once (atomically) and reused. The file is
    decoded with the index's own limits (its decoders and pixel cap): it may have been replaced since."""
    from PIL import ImageOps

    from cliplab.data.images import SAFE_IMAGE_FORMATS, load_rgb
    from cliplab.utils import atomic_write

    out = folder / sha256[:2] / f"{sha256}-{size}-o.jpg"  # -o: orientation applied (older thumbnails were not)
    if not out.is_file():
        im = load_rgb(path, draft_size=size, max_pixels=info.get("max_pixels"),
                      formats=tuple(info.get("formats") or SAFE_IMAGE_FORMATS))
        im = ImageOps.exif_transpose(im)  # a phone's portrait photo stands up (the EXIF orientation tag)
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        atomic_write(out, lambda p: p.write_bytes(buf.getvalue()))
    return out


# -- image_url fetching (only with --allow-urls)
class FetchError(Exception):
    """A refused or failed image_url fetch: ``status`` 400 (bad or refused URL) or 502 (the fetch failed).
    Messages never say which port or internal state caused a failure."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Only globally routable addresses may be fetched (no loopback, private, link-local, CGNAT, multicast,
    reserved, or IPv4 hidden in IPv6)."""
    mapped = getattr(ip, "ipv4_mapped", None) or getattr(ip, "sixtofour", None)
    return ip.is_global and not ip.is_multicast and (mapped is None or is_public_address(mapped))


def _resolve(host: str, port: int, timeout: float) -> str:
    """One checked address of ``host``; every address it resolves to must be public."""
    answer: list = []

    def lookup():
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if not answer or isinstance(answer[0], Exception) or not answer[0]:
        raise FetchError(400, "image_url: the host name could not be resolved")
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in answer[0]]
    if not all(is_public_address(a) for a in addresses):
        raise FetchError(400, "image_url: the target address is not allowed (only public addresses are fetched)")
    return str(addresses[0])


def fetch_image(url: str, limit: int, timeout: float = 10.0) -> bytes:
    """GET an image over http(s): the host resolved and checked (public addresses only), the connection pinned
    to the checked address (TLS still verified against the host name), no redirects, at most ``limit``
    bytes, ``image/*`` only, everything within ``timeout`` seconds in total."""
    import http.client

    parts, port = _checked_url(url)
    deadline = time.monotonic() + timeout
    ip = _resolve(parts.hostname, port, timeout)
    link = None
    try:
        link = _PinnedLink(parts, port, ip, deadline)  # inside: a lookup that used up the deadline is a 502 too
        return link.get(limit)
    except FetchError:
        raise
    except (OSError, TimeoutError, http.client.HTTPException, ValueError):
        raise FetchError(502, "image_url could not be fetched (connection failed, timed out or was "
                              "malformed)") from None
    finally:
        if link is not None:
            link.close()


def _checked_url(url: str):
    """The parts of an http(s) URL with a host and no credentials, and its port."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError(400, "image_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise FetchError(400, "image_url must be an http(s) URL with a host and no credentials")
    return parts, port


class _PinnedLink:
    """One GET over a connection to the checked address ``ip``, within a total ``deadline``: a watchdog
    disconnects a server trickling bytes, whatever the phase."""

    def __init__(self, parts, port: int, ip: str, deadline: float) -> None:
        self.parts, self.deadline = parts, deadline
        self.sockets: list[socket.socket] = []  # the connection's socket (http.client may drop its own reference)
        self.expired = threading.Event()
        self.conn = _pinned_connection(ip, self)(parts.hostname, port, timeout=self.remaining())
        self.watchdog = threading.Timer(self.remaining(), self.cut_off)
        self.watchdog.daemon = True
        self.watchdog.start()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def cut_off(self) -> None:
        self.expired.set()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.watchdog.cancel()
        self.conn.close()

    def get(self, limit: int) -> bytes:
        parts = self.parts
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.conn.request("GET", target, headers={"User-Agent": "cliplab-search", "Accept": "image/*"})
        response = self.conn.getresponse()
        if 300 <= response.status < 400:
            raise FetchError(502, "image_url answered with a redirect (redirects are not followed)")
        if response.status != 200:
            raise FetchError(502, f"image_url answered HTTP {response.status}")
        if not (response.getheader("content-type") or "").lower().startswith("image/"):
            raise FetchError(502, "image_url did not answer with an image content type")
        return self._read(response, limit)

    def _read(self, response, limit: int) -> bytes:
        data = bytearray()
        while len(data) <= limit:
            self.sockets[0].settimeout(self.remaining())
            chunk = response.read1(min(65536, limit + 1 - len(data)))
            if not chunk:
                break
            data += chunk
        if self.expired.is_set():
            raise TimeoutError
        if len(data) > limit:
            raise FetchError(502, f"image_url: the image is larger than {limit} bytes")
        return bytes(data)


def _pinned_connection(ip: str, link: _PinnedLink) -> type:
    """An http.client connection class that connects to ``ip`` (TLS verified against the URL's host name)."""
    import http.client
    import ssl

    class Pinned(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.create_connection((ip, self.port), link.remaining())
            link.sockets.append(self.sock)

    class PinnedTLS(http.client.HTTPSConnection):
        def connect(self):
            raw = socket.create_connection((ip, self.port), link.remaining())
            self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=link.parts.hostname)
            link.sockets.append(self.sock)

    return PinnedTLS if link.parts.scheme == "https" else Pinned


def _version() -> str:
    from cliplab import __version__

    return __version__


class _Metrics:
    """Request counts and latency in Prometheus' text format (prometheus_client when installed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, int], int] = {}
        self.seconds: dict[str, float] = {}

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ("/", "/healthz", "/api/search", "/knn-service", "/metadata", "/api/info") else \
            ("/image" if path.startswith("/image/") else "/thumb" if path.startswith("/thumb/") else "other")
        with self.lock:
            self.counts[(route, status)] = self.counts.get((route, status), 0) + 1
            self.seconds[route] = self.seconds.get(route, 0.0) + seconds

    def render(self, images: int) -> str:
        lines = ["# HELP cliplab_requests_total HTTP requests by route and status",
                 "# TYPE cliplab_requests_total counter"]
        with self.lock:
            for (route, status), n in sorted(self.counts.items()):
                lines.append(f'cliplab_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# HELP cliplab_request_seconds_total Time spent answering, by route",
                      "# TYPE cliplab_request_seconds_total counter"]
            for route, s in sorted(self.seconds.items()):
                lines.append(f'cliplab_request_seconds_total{{route="{route}"}} {s:.6f}')
        lines += ["# HELP cliplab_index_images Images in the served index", "# TYPE cliplab_index_images gauge",
                  f"cliplab_index_images {images}"]
        return "\n".join(lines) + "\n"


def uvicorn_limits(max_connections: int = 64) -> dict:
    """Connection-level bounds for uvicorn: concurrent connections (503 beyond), idle keep-alive, header size."""
    return {"http": "h11", "limit_concurrency": max_connections, "timeout_keep_alive": 5,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "proxy_headers": False, "server_header": False,
            "timeout_graceful_shutdown": 5}


def serve(settings: ServerSettings, host: str | None = None, port: int = 8000, log=print,
          no_auth: bool = False) -> None:
    """Run the server with uvicorn (blocking). Off loopback a token is required unless ``no_auth``."""
    uvicorn = require("uvicorn")
    if host is not None:
        settings.host = host
    host = settings.host
    if not is_loopback(host) and not settings.token:
        if not no_auth:
            raise ConfigError(f"refusing to serve on {host} without --token: anyone who can reach this address could "
                              "search and download the indexed images (pass --token, or --no-auth to accept that)")
        log(f"warning: serving on {host} without a token (--no-auth): anyone who can reach this address can "
            "search and download the indexed images")
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {settings.index_dir} on http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs); "
        f"accepted Host names: {', '.join(settings.allowed_hosts)}")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("CLIPLAB_LOG_LEVEL", "warning"), **uvicorn_limits())
