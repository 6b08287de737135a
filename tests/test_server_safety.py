"""Abuse tests of the search server (issue #24): DNS rebinding (Host), tokens and the session cookie, the
event loop kept free during uploads, decoders and pixel limits for uploads, image_url fetching (SSRF), a
rebuilt index with another model, out-of-range ids, list/size/time limits, traversal, malformed bodies."""

import http.server
import io
import json
import os
import shutil
import socket
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import COLOURS, SHAPES, live_server, make_image, tiny_hf_clip

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

TOKEN = "correct-horse-battery-staple"  # 16+ characters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, towers):
    """A small index (8 photos, a tiny random CLIP) and a file outside its root."""
    from cliplab.serve.index import IndexBuilder

    tmp = tmp_path_factory.mktemp("safety")
    _, folder = tiny_hf_clip(tmp, towers[1].tokenizer)
    photos = tmp / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, (c, s) in enumerate([(c, s) for c in COLOURS for s in SHAPES]):
        make_image(photos / ("sub" if i % 2 else "") / f"{c}_{s}.{'png' if i % 3 == 0 else 'jpg'}", c, s, seed=i)
    (tmp / "secret.txt").write_text("outside the root")
    IndexBuilder(tmp / "index", f"clip:{folder}", log=lambda m: None, progress=False).build([photos])
    return tmp


def make_client(tiny, base_url="http://127.0.0.1", **kw):
    from fastapi.testclient import TestClient

    from cliplab.serve.app import ServerSettings, create_app

    settings = ServerSettings(tiny / "index", thumb_dir=tiny / "thumbs", **kw)
    return TestClient(create_app(settings), base_url=base_url, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny):
    return make_client(tiny, max_k=20)


def png(size=(64, 64), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, "PNG")
    return buf.getvalue()


def upload(data: bytes, name="q.png", ctype="image/png"):
    return {"files": {"image": (name, data, ctype)}}


def assert_json_error(r, status, fragment=""):
    assert r.status_code == status, (r.status_code, r.text)
    assert set(r.json()) == {"error"} and fragment in r.json()["error"], r.text
    assert r.headers["x-content-type-options"] == "nosniff"


# -- item 5: Host header (DNS rebinding), tokens, session cookie, off-loopback refusal
def test_wrong_host_header_is_refused(tiny, client):
    r = client.get("/api/search", params={"q": "dog"}, headers={"Host": "evil.example:8000"})
    assert_json_error(r, 400, "Host")
    assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"Host": "127.0.0.1.evil.example"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1:1", "[::1]:8000", "LOCALHOST", "localhost."):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    extra = make_client(tiny, host="192.168.7.9", token=TOKEN, allowed_hosts=["photos.lan", "*.example.org"])
    for host in ("192.168.7.9:8000", "photos.lan", "a.example.org:80"):
        assert extra.get("/healthz", headers={"Host": host}).status_code == 200, host
    assert extra.get("/healthz", headers={"Host": "example.org.evil"}).status_code == 400
    # the Host header also builds this server's own image URLs: only a name or address and a port pass
    for host in ("localhost:@evil.example", "localhost:80/x", "localhost evil", "localhost:99999999", "user@localhost"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 400, host
    hits = client.post("/knn-service", json={"text": "dog", "num_images": 2}, headers={"Host": "localhost:8000"}).json()
    assert [h["url"] for h in hits] == [f"http://localhost:8000/image/{h['id']}" for h in hits]
    meta = client.post("/metadata", json={"ids": [hits[0]["id"]]}, headers={"Host": "127.0.0.1:8000"}).json()
    assert meta[0]["metadata"]["url"] == f"http://127.0.0.1:8000/image/{hits[0]['id']}"


def test_short_or_odd_tokens_are_refused(tiny):
    from cliplab.errors import ConfigError
    from cliplab.serve.app import ServerSettings

    for bad in ("s3cret", "x" * 15, "with space in the token", "é" * 20):
        with pytest.raises(ConfigError, match="at least 16"):
            ServerSettings(tiny / "index", token=bad)
    assert ServerSettings(tiny / "index", token="x" * 16).token == "x" * 16


def test_off_loopback_without_token_is_refused(tiny, monkeypatch):
    from cliplab.errors import ConfigError
    from cliplab.serve import app as app_module

    ran, lines = [], []
    monkeypatch.setattr(app_module, "require", lambda m, f=None: type("U", (), {"run": lambda *a, **k: ran.append(k)}))
    monkeypatch.setattr(app_module, "create_app", lambda s: object())
    with pytest.raises(ConfigError, match="without --token"):
        app_module.serve(app_module.ServerSettings(tiny / "index"), host="0.0.0.0", port=1, log=lines.append)
    assert ran == []
    app_module.serve(app_module.ServerSettings(tiny / "index"), host="0.0.0.0", port=1, log=lines.append,
                     no_auth=True)
    assert "--no-auth" in lines[0] and ran[0]["host"] == "0.0.0.0"
    settings = app_module.ServerSettings(tiny / "index", token=TOKEN, allowed_hosts=["photos.lan"])
    app_module.serve(settings, host="10.1.2.3", port=1, log=lines.append)
    assert settings.allowed_hosts[:3] == ["localhost", "127.0.0.1", "::1"]
    assert "10.1.2.3" in settings.allowed_hosts and "photos.lan" in settings.allowed_hosts
    # connection-level bounds reach uvicorn
    assert ran[1]["limit_concurrency"] > 0 and ran[1]["timeout_keep_alive"] <= 5
    assert ran[1]["h11_max_incomplete_event_size"] <= 64 * 1024 and ran[1]["http"] == "h11"
    assert TOKEN not in "".join(lines)


def test_cli_serve_refuses_exposure_and_short_tokens(tiny, cli, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    res = cli("serve", tiny / "index", "--host", "0.0.0.0")
    assert res.returncode == 2 and "without --token" in res.stdout and len(res.stdout.strip().splitlines()) <= 3
    res = cli("serve", tiny / "index", "--token", "short")
    assert res.returncode == 2 and "at least 16" in res.stdout


def test_token_becomes_an_http_only_cookie(tiny):
    c = make_client(tiny, token=TOKEN)
    assert_json_error(c.get("/api/search", params={"q": "dog"}), 401, "bearer token")
    # the token is never accepted in an API or image URL (it would land in logs and histories)
    assert c.get("/api/search", params={"q": "dog", "token": TOKEN}).status_code == 401
    ok = c.get("/api/search", params={"q": "dog"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    cookie = ok.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and TOKEN not in cookie
    item = ok.json()["results"][0]["id"]
    assert c.get(f"/thumb/{item}").status_code == 200  # <img src="/thumb/1">: the cookie, no token in the URL
    assert c.get(f"/image/{item}").status_code == 200
    assert c.get("/healthz").status_code == 200
    # a wrong bearer is refused even with a valid cookie
    assert c.get(f"/image/{item}", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    c.cookies.clear()
    assert c.get(f"/image/{item}").status_code == 401
    c.cookies.set("cliplab_session", TOKEN)  # the token itself is not a session value
    assert c.get(f"/image/{item}").status_code == 401
    c.cookies.clear()
    # a shared link ?token= on the page load: swapped for the cookie, the token dropped from the URL
    r = c.get("/", params={"token": TOKEN, "q": "red"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?q=red" and "httponly" in r.headers["set-cookie"].lower()
    assert c.get(f"/image/{item}").status_code == 200
    c.cookies.clear()
    assert c.get("/", params={"token": "wrong-token-xxxxxxxx"}).status_code == 401
    page = c.get("/")
    assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "token=" not in page.text  # the page never puts the token in a URL


@pytest.mark.browser
def test_web_page_with_a_token_in_chromium(tiny):
    """The page opened with ?token= (a shared link): thumbnails load through the cookie, and no request the
    browser makes after the first carries the token."""
    pytest.importorskip("playwright")
    from playwright.sync_api import expect, sync_playwright

    from cliplab.serve.app import ServerSettings, create_app
    from tests.conftest import open_page

    app = create_app(ServerSettings(tiny / "index", token=TOKEN, thumb_dir=tiny / "thumbs"))
    errors, urls = [], []
    with live_server(app) as base, sync_playwright() as p:
        browser, page = open_page(p, 1000, 800, errors)
        page.on("request", lambda req: urls.append(req.url))
        page.goto(f"{base}/?token={TOKEN}")
        expect(page.locator("#info")).to_contain_text("8 images")
        page.locator("#q").fill("a red circle")
        page.keyboard.press("Enter")
        expect(page.locator(".tile img")).to_have_count(8)
        page.wait_for_function("Array.from(document.querySelectorAll('.tile img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        browser.close()
    assert errors == []
    assert [u for u in urls[1:] if TOKEN in u] == [] and any("/thumb/" in u for u in urls)


# -- item 10: headers and ids
def test_every_response_says_nosniff(client):
    item = client.get("/api/search", params={"q": "red"}).json()["results"][0]["id"]
    for url in ("/", "/healthz", f"/image/{item}", f"/thumb/{item}", "/image/123456", "/nowhere", "/openapi.json"):
        r = client.get(url)
        assert r.headers.get("x-content-type-options") == "nosniff", url
    assert "sandbox" in client.get(f"/image/{item}").headers["content-security-policy"]


@pytest.mark.parametrize("url", ["/image/99999999999999999999", "/thumb/99999999999999999999",
                                 "/image/9223372036854775808", "/thumb/-9223372036854775809", "/image/-1"])
def test_ids_out_of_range_are_not_found(client, url):
    assert_json_error(client.get(url), 404, "no image with id")


def test_out_of_range_ids_in_bodies(client):
    item = client.get("/api/search", params={"q": "red"}).json()["results"][0]["id"]
    meta = client.post("/metadata", json={"ids": [2**70, -(2**70), 2**63, item]})
    assert meta.status_code == 200 and [m["id"] for m in meta.json()] == [item]
    assert_json_error(client.post("/api/search", json={"id": 2**70}), 404, "no indexed image")
    assert_json_error(client.post("/api/search", json={"id": -1}), 404, "no indexed image")


def test_list_fields_are_bounded_by_the_schema(client):
    assert_json_error(client.post("/metadata", json={"ids": list(range(21))}), 422, "at most 20")
    assert_json_error(client.post("/knn-service", json={"embedding_input": [0.5] * 5000}), 422, "at most 4096")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_embeddings_are_refused(client, value):
    dim = client.get("/api/info").json()["dim"]
    body = '{"embedding_input": [' + ", ".join([value] + ["0.5"] * (dim - 1)) + "]}"
    r = client.post("/knn-service", content=body, headers={"content-type": "application/json"})
    assert_json_error(r, 422, "finite")


def test_huge_finite_embeddings_are_normalised(client):
    dim = client.get("/api/info").json()["dim"]
    small = client.post("/knn-service", json={"embedding_input": [0.5] * dim, "num_images": 3}).json()
    huge = client.post("/knn-service", json={"embedding_input": [1e37] * dim, "num_images": 3}).json()
    assert [h["id"] for h in huge] == [h["id"] for h in small]


# -- limits on queries and bodies
@pytest.mark.parametrize("method,url,kwargs,status,fragment", [
    ("get", "/api/search", {"params": {"q": "x" * 501}}, 422, "longer than 500"),
    ("get", "/api/search", {"params": {"q": "dog", "k": -5}}, 422, "k must be >= 1"),
    ("post", "/api/search", {"json": {"text": "x" * 501}}, 422, "longer than 500"),
    ("post", "/api/search", {"json": {"text": "dog", "minus_text": "y" * 600}}, 422, "longer than 500"),
    ("post", "/knn-service", {"json": {"text": "z" * 501}}, 422, "longer than 500"),
    ("post", "/knn-service", {"json": {"text": "dog", "num_images": 0}}, 422, "num_images"),
    ("post", "/api/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("post", "/api/search", {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("post", "/api/search", {"content": b"\xff\xfe{}", "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("post", "/api/search", {"json": [1, 2]}, 422, "JSON"),
    ("post", "/knn-service", {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400, ""),
    ("post", "/metadata", {"content": b'{"ids": "1,2"}', "headers": {"content-type": "application/json"}}, 422, "ids"),
    ("post", "/api/search", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, ""),
    ("post", "/api/search", {"content": b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nabc",
                             "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422, "'image' file"),
    ("post", "/api/search", {"content": b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\n"
                                        b"abc\r\n--b--\r\n",
                             "headers": {"content-type": "multipart/form-data; boundary=b"}}, 415, "not a readable"),
    ("post", "/api/search", {"files": [("image", ("a.png", b"1", "image/png")), ("image", ("b.png", b"2", "image/png"))]},
     400, "Too many files"),
    ("post", "/api/search", {"content": b"x" * 10, "headers": {"content-length": "99999999999"}}, 413, "too large"),
    ("post", "/api/search", {"content": b"x" * 10, "headers": {"content-length": "-1"}}, 413, "too large"),
    ("post", "/api/search", {"content": b"x" * 10, "headers": {"content-length": b"\xb2"}}, 413, "too large"),
])
def test_bad_bodies_and_limits_are_json_4xx(client, method, url, kwargs, status, fragment):
    assert_json_error(getattr(client, method)(url, **kwargs), status, fragment)


def test_k_is_capped(client):
    assert client.get("/api/search", params={"q": "dog", "k": 10**30}).json()["k"] == 20
    assert len(client.post("/knn-service", json={"text": "dog", "num_images": 10**6}).json()) == 8


# -- items 6 and 7: uploads (decoders, pixels, reduction, the event loop, the gate)
def tiny_eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with a tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_only_safe_decoders_see_uploads(client, monkeypatch):
    from PIL import EpsImagePlugin, TiffImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append("eps") or 1 / 0)
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", lambda self: opened.append("tiff") or 1 / 0)
    assert_json_error(client.post("/api/search", **upload(tiny_eps(), "q.eps", "application/postscript")),
                      415, "not a readable image")
    tiff = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tiff, "TIFF")
    assert_json_error(client.post("/api/search", **upload(tiff.getvalue(), "q.tif", "image/tiff")), 415)
    assert opened == []  # the EPS (Ghostscript) and TIFF parsers were never reached
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 20, 20)).save(buf, fmt)
        assert client.post("/api/search", **upload(buf.getvalue(), f"q.{fmt.lower()}")).status_code == 200, fmt


def test_decompression_bombs_and_pixel_limits(tiny, client):
    from cliplab.errors import DataError
    from cliplab.serve.query import decode_image_bytes

    for w, h in ((100_000, 100_000), (6000, 5000), (2**31 - 1, 1)):
        assert_json_error(client.post("/api/search", **upload(png_declaring(w, h))), 413, "too large")
    # the default cap is 25 MP decoded: a PNG decodes in full, a JPEG at 1/2-1/8 scale
    jpeg = io.BytesIO()
    Image.new("RGB", (1600, 1000), (10, 200, 10)).save(jpeg, "JPEG")
    with pytest.raises(DataError, match="too large"):
        decode_image_bytes(png((1600, 1000)), max_pixels=1_000_000)
    assert decode_image_bytes(jpeg.getvalue(), max_pixels=1_000_000).size == (800, 500)  # drafted at 1/2
    with pytest.raises(DataError, match="too large"):
        decode_image_bytes(jpeg.getvalue(), max_pixels=300_000)  # declares more than 4x the cap


def test_query_images_are_reduced_while_decoding():
    from cliplab.serve.query import QUERY_SIDE, decode_image_bytes

    jpeg = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 10)).save(jpeg, "JPEG", quality=70)
    im = decode_image_bytes(jpeg.getvalue(), max_pixels=25_000_000)
    assert im.mode == "RGB" and im.size == (1000, 750)  # JPEG draft: decoded at 1/4 scale
    im = decode_image_bytes(png((3000, 2000)), max_pixels=25_000_000)
    assert im.size == (750, 500)  # PNG: decoded in full, then reduced by 4
    for im in (decode_image_bytes(jpeg.getvalue(), 25_000_000), decode_image_bytes(png((5000, 900)), 25_000_000)):
        assert QUERY_SIDE <= min(im.size) < 2 * QUERY_SIDE
    assert decode_image_bytes(png((300, 200)), max_pixels=25_000_000).size == (300, 200)  # small: untouched


@pytest.mark.slow
def test_healthz_answers_while_uploads_decode(tiny, monkeypatch):
    """Four parallel uploads of a large-pixel PNG; the decoder is held (a threading.Event) until /healthz has
    answered, so /healthz must be served WHILE uploads are in progress; at most image_workers decode at once."""
    import httpx

    from cliplab.serve import app as app_module
    from cliplab.serve.app import ServerSettings, create_app

    real = app_module.decode_image_bytes
    entered, healthz_done, lock = threading.Event(), threading.Event(), threading.Lock()
    running = {"now": 0, "max": 0}

    def held_decode(data, max_pixels):
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        entered.set()
        try:
            healthz_done.wait(60)
            return real(data, max_pixels)
        finally:
            with lock:
                running["now"] -= 1

    monkeypatch.setattr(app_module, "decode_image_bytes", held_decode)
    big = png((3000, 3000), "blue")
    app = create_app(ServerSettings(tiny / "index", thumb_dir=tiny / "thumbs", image_workers=1))
    statuses, done = [], []
    with live_server(app) as base:
        def send():
            with httpx.Client(base_url=base, timeout=120) as h:
                statuses.append(h.post("/api/search", files={"image": ("big.png", big, "image/png")}).status_code)
            done.append(1)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        assert entered.wait(60), "no upload reached the decoder"
        try:
            health = httpx.get(base + "/healthz", timeout=20)
            in_progress = len(done) < 4
            text = httpx.get(base + "/api/search", params={"q": "a red circle"}, timeout=20)
        finally:
            healthz_done.set()
        for t in threads:
            t.join(120)
    assert health.status_code == 200 and health.json()["status"] == "ok" and in_progress
    assert text.status_code == 200  # text queries too
    assert statuses == [200] * 4 and running["max"] == 1


def test_a_full_image_gate_answers_429(tiny, monkeypatch):
    from cliplab.serve import app as app_module

    release, entered = threading.Event(), threading.Event()
    real = app_module.decode_image_bytes
    monkeypatch.setattr(app_module, "decode_image_bytes",
                        lambda d, m: (entered.set(), release.wait(60), real(d, m))[2])
    c = make_client(tiny, image_workers=1, max_waiting_images=0)
    first = []
    t = threading.Thread(target=lambda: first.append(c.post("/api/search", **upload(png()))))
    t.start()
    try:
        assert entered.wait(60)
        busy = c.post("/api/search", **upload(png()))
    finally:
        release.set()
        t.join(60)
    assert_json_error(busy, 429, "retry")
    assert busy.headers["retry-after"] == "1" and first[0].status_code == 200


def test_text_queue_is_bounded(tiny):
    """The batcher stuck in a model call (its lock held), one text per batch: of 5 texts at most 1 is taken
    and 2 wait; the others get QueryBusy at once. After the release every accepted text is answered."""
    from cliplab.models.factory import load_model
    from cliplab.serve.index import PhotoIndex
    from cliplab.serve.query import QueryBusy, QueryEncoder

    enc = QueryEncoder(load_model(PhotoIndex(tiny / "index").info["model"]), max_batch=1, max_pending=2)
    busy, answered = [], []

    def ask(i):
        try:
            answered.append(enc.text(f"query {i}"))
        except QueryBusy:
            busy.append(i)

    with enc.lock:
        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(busy) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert len(busy) >= 2 and len(answered) == 5 - len(busy) and enc.pending.maxsize == 2


def _read_answer(s: socket.socket) -> str:
    """One whole HTTP answer from a raw socket (headers and body may arrive in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_stalled_body_is_cut_off(tiny):
    from cliplab.serve.app import ServerSettings, create_app

    app = create_app(ServerSettings(tiny / "index", thumb_dir=tiny / "thumbs", body_timeout=0.5))
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"text\": ")
            answer = _read_answer(s)
        assert answer.startswith("HTTP/1.1 408") and "not received within" in answer
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
            answer = _read_answer(s)
        assert answer.startswith("HTTP/1.1 431")


# -- item 8: image_url fetching
class _Upstream(http.server.BaseHTTPRequestHandler):
    hosts: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Upstream.hosts.append(self.headers.get("Host"))
        if self.path == "/ok.png":
            self._send(200, "image/png", png((48, 48), "green"))
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/page":
            self._send(200, "text/html", b"<html></html>")
        elif self.path == "/big":
            self._send(200, "image/png", b"\0" * 400_000)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        else:
            self._send(404, "text/plain", b"no")

    def _send(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_image_url_refuses_non_public_targets(tiny, upstream):
    c = make_client(tiny, allow_urls=True, max_upload_bytes=300_000)
    for url in (f"http://127.0.0.1:{upstream}/ok.png", f"http://localhost:{upstream}/ok.png",
                "http://[::1]:1/x.png", "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png",
                "http://0x7f000001/x.png", "http://[::ffff:127.0.0.1]/x.png", "http://100.64.0.1/x.png"):
        r = c.post("/knn-service", json={"image_url": url})
        assert_json_error(r, 400, "not allowed")
        assert str(upstream) not in r.json()["error"]
    for url in ("file:///etc/passwd", "ftp://example.org/x.png", "http://user:pw@example.org/x.png", "http:///x",
                "gopher://127.0.0.1:70/", "http://[::1/x"):
        assert_json_error(c.post("/knn-service", json={"image_url": url}), 400, "image_url")
    assert _Upstream.hosts == []  # nothing was ever requested


def test_image_url_fetch_when_the_target_is_public(tiny, upstream, monkeypatch):
    """The resolver's verdict patched to accept loopback (as if it were public): the fetch itself."""
    from cliplab.serve import app as app_module

    monkeypatch.setattr(app_module, "is_public_address", lambda ip: True)
    c = make_client(tiny, allow_urls=True, max_upload_bytes=300_000, url_timeout=1.5)
    _Upstream.hosts.clear()
    ok = c.post("/knn-service", json={"image_url": f"http://localhost:{upstream}/ok.png", "num_images": 2})
    assert ok.status_code == 200 and len(ok.json()) == 2
    assert _Upstream.hosts == [f"localhost:{upstream}"]  # the pinned connection names the URL's host
    for path, fragment in (("/redirect", "redirect"), ("/page", "content type"), ("/big", "larger than"),
                           ("/missing", "HTTP 404"), ("/slow", "could not be fetched")):
        r = c.post("/knn-service", json={"image_url": f"http://127.0.0.1:{upstream}{path}"})
        assert_json_error(r, 502, fragment)
        assert str(upstream) not in r.json()["error"]
    with socket.socket() as s:  # a closed port: the same message as any other failure (no port mapping)
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = c.post("/knn-service", json={"image_url": f"http://127.0.0.1:{closed}/x.png"})
    assert_json_error(r, 502, "could not be fetched")


def test_image_url_whose_lookup_uses_up_the_deadline_is_a_502(tiny, upstream, monkeypatch):
    """A resolver slow enough to leave no time for the connection: a 502, never a 500."""
    from cliplab.serve import app as app_module

    real_resolve = app_module._resolve

    def slow_resolve(host, port, timeout):
        time.sleep(timeout + 0.05)  # the lookup itself used the whole deadline
        return real_resolve(host, port, timeout)

    monkeypatch.setattr(app_module, "is_public_address", lambda ip: True)
    monkeypatch.setattr(app_module, "_resolve", slow_resolve)
    c = make_client(tiny, allow_urls=True, url_timeout=0.2)
    r = c.post("/knn-service", json={"image_url": f"http://localhost:{upstream}/ok.png"})
    assert_json_error(r, 502, "could not be fetched")


def test_public_address_rule():
    import ipaddress

    from cliplab.serve.app import is_public_address

    public = ["8.8.8.8", "2606:4700:4700::1111", "93.184.216.34"]
    private = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "224.0.0.1",
               "255.255.255.255"]
    assert all(is_public_address(ipaddress.ip_address(a)) for a in public)
    assert not any(is_public_address(ipaddress.ip_address(a)) for a in private)


# -- item 9: a rebuilt index with another model
def _commit_generation(index: Path, current: dict, generation: int, fingerprint: str | None = None,
                       broken: bool = False) -> None:
    """A new generation made from the files of ``current`` (metadata edited), committed like a build does."""
    names = {k: current[k] for k in ("db", "vectors", "faiss")}
    new = {k: v.replace(f"-{current['generation']}.", f"-{generation}.") for k, v in names.items()}
    for k in names:
        shutil.copy(index / names[k], index / new[k])
    if fingerprint:
        con = sqlite3.connect(index / new["db"])
        con.execute("UPDATE info SET value = ? WHERE key = 'model_fingerprint'", (json.dumps(fingerprint),))
        con.commit()
        con.close()
    if broken:
        (index / new["vectors"]).write_bytes(b"not numpy")
    tmp = index / ".CURRENT.tmp"
    tmp.write_text(json.dumps({**current, **new, "generation": generation}))
    os.replace(tmp, index / "CURRENT")


def test_a_rebuilt_index_with_another_model_is_not_loaded(tiny, tmp_path, monkeypatch):
    from cliplab.serve import app as app_module

    index = tmp_path / "index"
    shutil.copytree(tiny / "index", index)
    opened = []
    real = app_module.PhotoIndex
    monkeypatch.setattr(app_module, "PhotoIndex", lambda folder: opened.append(1) or real(folder))
    from fastapi.testclient import TestClient

    c = TestClient(app_module.create_app(app_module.ServerSettings(index, thumb_dir=tmp_path / "t")),
                   base_url="http://localhost", raise_server_exceptions=False)
    before = c.get("/api/search", params={"q": "a red circle"}).json()["results"]
    assert c.get("/healthz").json() == {"status": "ok", "images": 8} and len(opened) == 1
    first = json.loads((index / "CURRENT").read_text())
    generation = first["generation"]

    _commit_generation(index, first, generation + 1, fingerprint="0" * 64)  # another model's vectors
    for _ in range(5):
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "another model" in health.json()["reason"] and str(index) not in health.json()["reason"]
        assert c.get("/api/search", params={"q": "a red circle"}).json()["results"] == before
    assert len(opened) == 2  # tried once for this CURRENT, not on every request

    _commit_generation(index, first, generation + 2, broken=True)
    for _ in range(3):
        assert "could not be opened" in c.get("/healthz").json()["reason"]
        assert c.get("/api/search", params={"q": "a red circle"}).status_code == 200
    assert len(opened) == 3

    _commit_generation(index, first, generation + 3)  # the same model again: loaded, healthy
    assert c.get("/healthz").json() == {"status": "ok", "images": 8} and len(opened) == 4


# -- traversal in every path parameter
@pytest.mark.parametrize("url", [
    "/image/../../etc/passwd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image/%252e%252e%252fetc%252fpasswd",
    "/image//etc/passwd", "/image/%2Fetc%2Fpasswd", "/image/..%5c..%5csecret.txt", "/image/1%00.jpg",
    "/thumb/..%2f..%2fsecret.txt", "/thumb/%252e%252e%252fsecret.txt", "/thumb//etc/passwd",
    "/static/..%2f..%2fapp.py", "/static/%252e%252e%252fapp.py", "/static/%2Fetc%2Fpasswd", "/static/%2e%2e",
    "/static/index.html%00", "/static/.%2e/app.py", "/static//etc/passwd", "/static/..%5capp.py",
])
def test_traversal_in_path_parameters(client, url):
    r = client.get(url)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert "root:" not in r.text and "outside the root" not in r.text and "import" not in r.text
    assert set(r.json()) == {"error"}


def test_replaced_files_are_not_served(tiny, tmp_path, towers):
    """Indexed files replaced after indexing: by a symlink out of the root (a 404 for the image and the
    thumbnail), by a decompression bomb or an EPS (no thumbnail decoded: a 404, never a 500)."""
    from cliplab.serve.index import IndexBuilder

    photos = tmp_path / "photos"
    photos.mkdir()
    make_image(photos / "a.jpg", "red", "circle")
    make_image(photos / "b.jpg", "blue", "square")
    _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    IndexBuilder(tmp_path / "index", f"clip:{folder}", log=lambda m: None, progress=False).build([photos])
    from fastapi.testclient import TestClient

    from cliplab.serve.app import ServerSettings, create_app

    c = TestClient(create_app(ServerSettings(tmp_path / "index", thumb_dir=tmp_path / "t")),
                   base_url="http://localhost", raise_server_exceptions=False)
    hits = c.get("/api/search", params={"q": "x"}).json()["results"]
    victim = next(h for h in hits if h["path"] == "a.jpg")["id"]
    (photos / "a.jpg").unlink()
    (photos / "a.jpg").symlink_to(tiny / "secret.txt")
    for url in (f"/image/{victim}", f"/thumb/{victim}"):
        assert_json_error(c.get(url), 404, "no image with id")
    other = next(h for h in hits if h["path"] == "b.jpg")["id"]
    for content in (png_declaring(100_000, 100_000), tiny_eps()):
        (photos / "b.jpg").write_bytes(content)
        assert_json_error(c.get(f"/thumb/{other}"), 404, "can no longer be read")


# -- issue #28 item 8: clip-retrieval's own client posts JSON without a JSON content type
def clip_retrieval_client():
    """clip-retrieval 2.45.0's ``clip_client.py`` (installed ``--no-deps`` by ``make install``), loaded alone:
    the package's ``__init__`` imports its Flask backend, the client needs only ``requests``."""
    import importlib.util

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None and os.environ.get("CI"):
        pytest.fail("clip-retrieval is not installed (make install puts it in with --no-deps)")
    if spec is None:
        pytest.skip("clip-retrieval not installed (pip install --no-deps clip-retrieval==2.45.0)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_retrieval_client_queries_by_text_image_and_embedding(tiny):
    from cliplab.serve.app import ServerSettings, create_app

    client_module = clip_retrieval_client()
    settings = ServerSettings(tiny / "index", thumb_dir=tiny / "thumbs")
    query_image = next((tiny / "photos").rglob("red_*.jpg"))
    with live_server(create_app(settings)) as url:
        text_client = client_module.ClipClient(f"{url}/knn-service", settings.index_name, num_images=5,
                                               modality=client_module.Modality.IMAGE)
        by_text = text_client.query(text="a red square")
        by_image = text_client.query(image=str(query_image))
        first = by_image[0]
        by_embedding = text_client.query(embedding_input=[0.1] * len(tiny_embedding_dim(tiny)))
    for hits in (by_text, by_image, by_embedding):
        assert isinstance(hits, list) and 1 <= len(hits) <= 5, hits
        assert {"id", "similarity"} <= set(hits[0])
    assert first["similarity"] > 0.99  # the query image itself comes first


def tiny_embedding_dim(tiny) -> list:
    import numpy as np

    from cliplab.serve.index import PhotoIndex

    return list(np.zeros(PhotoIndex(tiny / "index").vectors.shape[1]))


def test_clip_retrieval_routes_take_json_sent_as_text_and_cors_is_opt_in(tiny, client):
    from cliplab.errors import ConfigError

    body = json.dumps({"text": "dog", "num_images": 3})
    for ctype in ("text/plain;charset=UTF-8", None):
        r = client.post("/knn-service", content=body, headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 200 and len(r.json()) == 3, r.text
    r = client.post("/metadata", content=json.dumps({"ids": [0]}), headers={"content-type": "text/plain"})
    assert r.status_code == 200, r.text
    assert_json_error(client.post("/knn-service", content=b"not json", headers={"content-type": "text/plain"}), 422)
    origin = "http://localhost:3005"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/knn-service", headers=preflight).headers
    cors = make_client(tiny, cors_origins=[origin])
    assert cors.options("/knn-service", headers=preflight).headers["access-control-allow-origin"] == origin
    r = cors.post("/knn-service", content=body, headers={"Origin": origin, "content-type": "text/plain"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    other = cors.post("/knn-service", content=body, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    for bad in ("*", "localhost:3005", "http://x/path"):
        with pytest.raises(ConfigError, match="--cors-origin"):
            make_client(tiny, cors_origins=[bad])


@pytest.mark.browser
def test_clip_retrieval_front_end_shows_results_from_cliplab_serve(tiny):
    """clip-retrieval 2.45.0's packaged front end (``front/build`` in its wheel), served from another origin and
    pointed at `cliplab serve` (``?back=``), as its users run it: it must list the index, query and show images."""
    import functools
    import http.server
    import importlib.util

    from playwright.sync_api import expect, sync_playwright

    from cliplab.serve.app import ServerSettings, create_app
    from tests.conftest import open_page

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None:
        pytest.skip("clip-retrieval not installed (pip install --no-deps clip-retrieval==2.45.0)")
    front = Path(spec.submodule_search_locations[0]).parent / "front" / "build"
    assert (front / "index.html").is_file(), f"no front end in the clip-retrieval wheel at {front}"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(front))
    handler.log_message = lambda *a: None
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=static.serve_forever, daemon=True).start()
    front_origin = f"http://127.0.0.1:{static.server_address[1]}"
    settings = ServerSettings(tiny / "index", thumb_dir=tiny / "thumbs", cors_origins=[front_origin])
    errors, answered = [], []
    try:
        with live_server(create_app(settings)) as back, sync_playwright() as p:
            browser, page = open_page(p, 1280, 900, errors)
            page.on("response", lambda r: answered.append((r.url, r.status)))
            page.goto(f"{front_origin}/?back={back}&index={settings.index_name}&query=a%20red%20square")
            pics = page.locator("img.pic")
            expect(pics.first).to_be_visible(timeout=30_000)
            page.wait_for_function("""() => { const host = document.querySelector('clip-front');
                const imgs = Array.from(host.shadowRoot.querySelectorAll('img.pic'));
                return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""", timeout=30_000)
            assert pics.first.get_attribute("src").startswith(f"{back}/image/")
            browser.close()
    finally:
        static.shutdown()
    ours = [(u, status) for u, status in answered if u.startswith(back)]
    assert (f"{back}/indices-list", 200) in ours and (f"{back}/knn-service", 200) in ours
    assert all(status == 200 for _, status in ours), ours
    # the only failures are files the wheel's front end asks for and does not ship (vendor/webcomponents-loader.js)
    missing = [u for u, status in answered if status == 404]
    assert all(u.startswith(front_origin) for u in missing), missing
    assert [e for e in errors if "Failed to load resource" not in e] == []  # (404s: that file and the favicon)
