"""The search server: FastAPI over a read-only photo index (``cliplab serve``).

Endpoints: ``/`` (the web page), ``/healthz``, ``/api/info``, ``/api/search`` (GET text; POST JSON text /
indexed id for "more like this", or a multipart image upload), ``/image/{id}``, ``/thumb/{id}``,
clip-retrieval's ``/indices-list``, ``/knn-service`` and ``/metadata`` (same field names, so its front end
can point here), ``/metrics`` (Prometheus) and the OpenAPI schema (``/docs``, ``/openapi.json``).

Safety: files are served by index id only (never a path from a request) and must resolve inside their
indexed root; uploads are size-limited and checked for pixel count before decoding; query length and k
are capped; no URL is fetched unless ``allow_urls``; an optional bearer token guards everything but
``/healthz`` and the page itself; every error is a JSON 4xx, never a traceback.
"""


import base64
import hmac
import io
import os
import threading
import time
from pathlib import Path

from cliplab.extras import require
from cliplab.serve.index import PhotoIndex
from cliplab.serve.query import QueryEncoder, QueryTerm, decode_image_bytes

STATIC = Path(__file__).with_name("static")


class ServerSettings:
    def __init__(self, index_dir: str | Path, *, token: str | None = None, max_upload_bytes: int = 10 * 2**20,
                 max_pixels: int = 50_000_000, max_query_chars: int = 500, max_k: int = 200,
                 allow_urls: bool = False, thumb_dir: str | Path | None = None, thumb_size: int = 256,
                 device: str = "cpu", index_name: str | None = None) -> None:
        from cliplab.utils import default_cache_dir

        self.index_dir = Path(index_dir)
        self.token = token or None
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.max_query_chars, self.max_k = max_query_chars, max_k
        self.allow_urls, self.thumb_size, self.device = allow_urls, thumb_size, device
        self.index_name = index_name or self.index_dir.resolve().name
        self.thumb_dir = Path(thumb_dir) if thumb_dir else default_cache_dir() / "thumbs"


class SearchService:
    """The index, its model and the query encoder; reopens the index when a newer generation is committed."""

    def __init__(self, settings: ServerSettings) -> None:
        from cliplab.models.factory import load_model

        self.settings = settings
        self.lock = threading.Lock()
        self.index = PhotoIndex(settings.index_dir)
        self.model = load_model(self.index.info["model"], device=settings.device)
        if self.model.fingerprint() != self.index.info["model_fingerprint"]:
            from cliplab.errors import ConfigError

            raise ConfigError(f"the model {self.index.info['model']!r} no longer matches the one that built "
                              f"{settings.index_dir} (its weights changed); rebuild the index")
        self.encoder = QueryEncoder(self.model)

    def current(self) -> PhotoIndex:
        if self.index.stale():
            with self.lock:
                if self.index.stale():
                    self.index = PhotoIndex(self.settings.index_dir)
        return self.index


def create_app(settings: ServerSettings):
    """The FastAPI application for one index."""
    require("fastapi")
    require("multipart", "image uploads")
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = SearchService(settings)
    app = FastAPI(title="cliplab search", version=_version(),
                  description="Search a photo folder by text or image with a cliplab model.")
    metrics = _Metrics()

    class ApiError(Exception):
        def __init__(self, status: int, message: str) -> None:
            self.status, self.message = status, message

    # -- errors: always JSON, never a traceback
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x not in ("body", "query"))
        return JSONResponse({"error": f"invalid request: {where or 'input'}: {first.get('msg', 'invalid')}"},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged by uvicorn; the client gets no traceback
        return JSONResponse({"error": "internal error"}, status_code=500)

    # -- limits and auth, before any handler runs
    @app.middleware("http")
    async def _guard(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_upload_bytes):
            return JSONResponse({"error": f"request body too large (limit {settings.max_upload_bytes} bytes)"},
                                status_code=413)
        if request.method in ("POST", "PUT") and length is None and request.headers.get("transfer-encoding"):
            return JSONResponse({"error": "send a Content-Length (chunked uploads are not accepted)"}, status_code=411)
        if settings.token and request.url.path not in ("/", "/healthz") and not request.url.path.startswith("/static/"):
            given = request.headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), settings.token.encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        metrics.observe(request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    def check_k(k: int) -> int:
        if k < 1:
            raise ApiError(422, "k must be >= 1")
        return min(k, settings.max_k)

    def check_text(q: str) -> str:
        if not q.strip():
            raise ApiError(422, "empty query")
        if len(q) > settings.max_query_chars:
            raise ApiError(422, f"query longer than {settings.max_query_chars} characters")
        return q

    def run_search(terms: list[QueryTerm], k: int) -> dict:
        from cliplab.errors import CliplabError

        index = service.current()
        t0 = time.perf_counter()
        try:
            vector, used = service.encoder.compose(terms, index)
        except CliplabError as exc:
            raise ApiError(404 if "no indexed image" in str(exc) else 422, str(exc)) from None
        results = index.search(vector, k, exclude=used)
        took = (time.perf_counter() - t0) * 1000
        return {"k": k, "took_ms": round(took, 2), "count": len(index),
                "results": [_public_hit(h) for h in results]}

    def load_upload(data: bytes):
        from cliplab.errors import CliplabError

        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, f"image larger than {settings.max_upload_bytes} bytes")
        try:
            return decode_image_bytes(data, settings.max_pixels)
        except CliplabError as exc:
            raise ApiError(413 if "too large" in str(exc) else 415, str(exc)) from None

    # -- pages and health
    @app.get("/", include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # served by name from a fixed list
        if name not in files:
            raise ApiError(404, "not found")
        return FileResponse(files[name])

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "images": len(service.current())}

    @app.get("/api/info")
    def info():
        index = service.current()
        return {**index.summary(), "name": settings.index_name, "max_k": settings.max_k,
                "max_upload_bytes": settings.max_upload_bytes, "version": _version()}

    # -- search
    @app.get("/api/search")
    def search_get(q: str = Query(..., description="text query"), k: int = Query(10)):
        return run_search([QueryTerm(1.0, "text", check_text(q))], check_k(k))

    class SearchBody(BaseModel):
        text: str | None = Field(None, description="text query")
        id: int | None = Field(None, description="an indexed image: 'more like this'")
        minus_text: str | None = Field(None, description="text to subtract from the query")
        k: int = 10

    @app.post("/api/search")
    async def search_post(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=10)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "multipart search needs an 'image' file field")
            data = await upload.read(settings.max_upload_bytes + 1)
            terms = [QueryTerm(1.0, "image", load_upload(data))]
            text = form.get("text")
            if isinstance(text, str) and text.strip():
                terms.append(QueryTerm(1.0, "text", check_text(text)))
            try:
                k = int(form.get("k") or 10)
            except ValueError:
                raise ApiError(422, "k must be an integer") from None
            return run_search(terms, check_k(k))
        try:
            body = SearchBody.model_validate(await request.json())
        except ValueError as exc:
            raise ApiError(422, f"invalid JSON body: {str(exc).splitlines()[0]}") from None
        terms = []
        if body.text:
            terms.append(QueryTerm(1.0, "text", check_text(body.text)))
        if body.id is not None:
            terms.append(QueryTerm(1.0, "item", body.id))
        if body.minus_text:
            terms.append(QueryTerm(-1.0, "text", check_text(body.minus_text)))
        if not terms:
            raise ApiError(422, "give text, id (more like this) or an uploaded image")
        return run_search(terms, check_k(body.k))

    # -- files by id only
    def item_file(item_id: int) -> Path:
        path = service.current().file_path(item_id)
        if path is None:
            raise ApiError(404, f"no image with id {item_id}")
        return path

    @app.get("/image/{item_id}")
    def image(item_id: int):
        return FileResponse(item_file(item_id), headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/thumb/{item_id}")
    def thumb(item_id: int):
        index = service.current()
        item = index.item(item_id)
        if item is None:
            raise ApiError(404, f"no image with id {item_id}")
        cached = _thumbnail(item_file(item_id), item["sha256"], settings.thumb_dir, settings.thumb_size)
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    # -- clip-retrieval compatible API
    @app.get("/indices-list")
    def indices_list():
        return [settings.index_name]

    class KnnBody(BaseModel):
        text: str | None = None
        image: str | None = None
        image_url: str | None = None
        embedding_input: list[float] | None = None
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

    @app.post("/knn-service")
    def knn_service(body: KnnBody):
        if body.indice_name not in (None, "", settings.index_name):
            raise ApiError(404, f"unknown indice_name {body.indice_name!r}; see /indices-list")
        if body.modality != "image":
            raise ApiError(422, "only the image modality is indexed (modality must be 'image')")
        given = [x is not None for x in (body.text, body.image, body.image_url, body.embedding_input)]
        if sum(given) != 1:
            raise ApiError(422, "give exactly one of text, image (base64), image_url or embedding_input")
        k = check_k(body.num_result_ids or body.num_images)
        index = service.current()
        if body.embedding_input is not None:
            import numpy as np

            v = np.asarray(body.embedding_input, dtype=np.float32)
            if v.shape != (index.info["dim"],) or not np.isfinite(v).all() or np.linalg.norm(v) == 0:
                raise ApiError(422, f"embedding_input must be {index.info['dim']} finite numbers, not all zero")
            hits = index.search(v / np.linalg.norm(v), k)
        else:
            if body.text is not None:
                terms = [QueryTerm(1.0, "text", check_text(body.text))]
            elif body.image is not None:
                try:
                    data = base64.b64decode(body.image, validate=True)
                except ValueError:
                    raise ApiError(422, "image is not valid base64") from None
                terms = [QueryTerm(1.0, "image", load_upload(data))]
            else:
                if not settings.allow_urls:
                    raise ApiError(403, "image_url queries are disabled on this server (start it with --allow-urls)")
                terms = [QueryTerm(1.0, "image", load_upload(_fetch(body.image_url, settings.max_upload_bytes)))]
            hits = run_search(terms, k)["results"]
        out = []
        for h in hits[: body.num_images]:
            out.append({"id": h["id"], "similarity": h["score"], "url": f"/image/{h['id']}",
                        "caption": (h.get("captions") or [""])[0], "image_path": h["path"]})
        return out

    class MetadataBody(BaseModel):
        ids: list[int]
        indice_name: str | None = None

    @app.post("/metadata")
    def metadata(body: MetadataBody):
        if len(body.ids) > settings.max_k:
            raise ApiError(422, f"at most {settings.max_k} ids per request")
        found = service.current().items(body.ids)
        return [{"id": i, "metadata": {"url": f"/image/{i}", "caption": (found[i]["captions"] or [""])[0],
                                       "image_path": found[i]["path"], "width": found[i]["width"],
                                       "height": found[i]["height"]}} for i in body.ids if i in found]

    @app.get("/metrics", include_in_schema=False)
    def prometheus():
        return Response(metrics.render(len(service.current())), media_type="text/plain; version=0.0.4")

    return app


def _public_hit(hit: dict) -> dict:
    return {"id": hit["id"], "score": round(hit["score"], 6), "path": hit["path"], "width": hit["width"],
            "height": hit["height"], "captions": hit["captions"], "image": f"/image/{hit['id']}",
            "thumb": f"/thumb/{hit['id']}"}


def _thumbnail(path: Path, sha256: str, folder: Path, size: int) -> Path:
    """A JPEG thumbnail keyed by content hash and size, generated once (atomically) and reused."""
    from PIL import Image

    from cliplab.utils import atomic_write

    out = folder / sha256[:2] / f"{sha256}-{size}.jpg"
    if not out.is_file():
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
        atomic_write(out, lambda p: p.write_bytes(buf.getvalue()))
    return out


def _fetch(url: str, limit: int) -> bytes:
    """Download an image (only when the server was started with --allow-urls): http(s) only, size-limited."""
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError("only http(s) URLs")
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - scheme checked above
        data = r.read(limit + 1)
    if len(data) > limit:
        raise ValueError("image too large")
    return data


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


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log=print) -> None:
    """Run the server with uvicorn (blocking)."""
    uvicorn = require("uvicorn")
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        log(f"warning: serving on {host} without --token: anyone who can reach this address can search and "
            "download the indexed images")
    app = create_app(settings)
    log(f"serving {settings.index_dir} on http://{host}:{port}/  (API docs: http://{host}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("CLIPLAB_LOG_LEVEL", "warning"))
