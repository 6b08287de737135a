"""The search app: incremental, crash-safe indexing (real kill -9 of indexing subprocesses), the CLI, the
HTTP API with every bad input, the web page in headless Chromium, and many concurrent clients."""

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS, SHAPES, make_image, tiny_hf_clip

pytest.importorskip("faiss")
pytest.importorskip("fastapi")


def photo_folder(root: Path, n_rep: int = 2) -> Path:
    """Coloured shapes in nested folders, mixed-case extensions, plus files that must be skipped."""
    i = 0
    for c in COLOURS:
        for s in SHAPES:
            for rep in range(n_rep):
                sub = root / ("nested/deeper" if i % 3 == 0 else "nested" if i % 3 == 1 else "")
                sub.mkdir(parents=True, exist_ok=True)
                ext = ".JPG" if i % 4 == 0 else ".png" if i % 4 == 1 else ".jpeg"
                make_image(sub / f"{c}_{s}_{rep}{ext}", c, s, seed=i)
                i += 1
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    good = (root / "red_circle_0.jpeg") if (root / "red_circle_0.jpeg").exists() else next(root.rglob("*.jpeg"))
    data = good.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (700, 700), (90, 90, 90)).save(root / "huge.png")  # over the test's pixel limit
    (root / "readme.txt").write_text("not an image extension: ignored")
    return root


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    from cliplab.serve.index import IndexBuilder

    tmp = tmp_path_factory.mktemp("search")
    photos = photo_folder(tmp / "photos")
    outside = tmp / "outside.jpg"
    make_image(outside, "red", "circle")
    (photos / "escape.jpg").symlink_to(outside)
    index = tmp / "index"
    report = IndexBuilder(index, "conse", max_pixels=400 * 400, log=lambda m: None, progress=False).build([photos])
    return tmp, photos, index, report


@pytest.mark.slow
def test_index_walks_recursively_and_skips_bad_files(indexed):
    from cliplab.serve.index import PhotoIndex

    _, photos, index, report = indexed
    assert report.total == 16 and report.new == 16 + 3 and report.embedded == 16  # 3 decode failures
    reasons = dict(report.skipped)
    assert set(reasons) == {"empty.jpg", "notes.jpg", "truncated.jpg", "huge.png", "escape.jpg"}
    assert "empty file" in reasons["empty.jpg"] and "too large" in reasons["huge.png"]
    assert "outside the indexed folder" in reasons["escape.jpg"] and "corrupt" in reasons["notes.jpg"]
    idx = PhotoIndex(index)
    assert len(idx) == 16 and idx.info["faiss"] == "flat" and idx.info["model"] == "conse"
    item = idx.item(1)
    assert set(item) >= {"path", "width", "height", "size", "sha256", "captions", "added"}
    assert item["width"] == 64 and not item["path"].startswith("/")
    assert idx.db.execute("SELECT COUNT(*) FROM skipped").fetchone()[0] == 5
    # stored vectors are the model's embeddings: an image query finds the image itself with score 1
    from cliplab.data.images import load_rgb
    from cliplab.models.factory import load_model
    from cliplab.serve.query import QueryEncoder, QueryTerm

    enc = QueryEncoder(load_model("conse"))
    path = idx.file_path(5)
    vec, _ = enc.compose([QueryTerm(1.0, "image", load_rgb(path))], idx)
    top = idx.search(vec, 3)
    assert top[0]["id"] == 5 and top[0]["score"] == pytest.approx(1.0, abs=1e-3)
    # search equals brute force over the stored vectors
    q, _ = enc.compose([QueryTerm(1.0, "text", "a green square")], idx)
    brute = np.argsort(-(np.asarray(idx.vectors) @ q), kind="stable")[:5]
    assert [h["id"] for h in idx.search(q, 5)] == [int(idx.row_to_id[r]) for r in brute]


@pytest.mark.slow
def test_incremental_update_embeds_only_new_and_changed_files(indexed, tmp_path, monkeypatch):
    from cliplab.serve.index import IndexBuilder, PhotoIndex

    _, photos, index, _ = indexed
    work = tmp_path / "copy"
    shutil.copytree(index, work / "index")
    shutil.copytree(photos, work / "photos", symlinks=True)
    first = PhotoIndex(work / "index")
    before = {first.item(int(i))["path"]: (int(i), np.asarray(first.vectors[r]))
              for r, i in enumerate(first.row_to_id)}
    build = lambda: IndexBuilder(work / "index", max_pixels=400 * 400, log=lambda m: None,  # noqa: E731
                                 progress=False).build([work / "photos"])
    # copytree kept mtimes: nothing to embed. Touching a file (same bytes) costs no forward pass either.
    os.utime(next(p for p in (work / "photos").rglob("*.png") if p.name != "huge.png"))
    calls = []
    from cliplab.embed import pipeline

    original = pipeline.embed_images
    monkeypatch.setattr(pipeline, "embed_images", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    report = build()
    assert report.embedded == 0 and report.unchanged == 16 and calls == []  # failed files are not retried either
    assert report.skipped_known == 3 and len(report.skipped) == 5
    # change one file, add one, delete one
    changed = next((work / "photos").rglob("blue_square_0*"))
    make_image(changed, "yellow", "circle", seed=99)
    make_image(work / "photos" / "nested" / "added.jpg", "green", "circle", seed=98)
    removed = next((work / "photos").rglob("red_square_1*"))
    removed.unlink()
    report = build()
    assert (report.new, report.changed, report.removed, report.embedded) == (1, 1, 1, 2) and calls == [2]
    after = PhotoIndex(work / "index")
    assert len(after) == 16 and after.current["generation"] == 3
    rel = lambda p: p.relative_to(work / "photos").as_posix()  # noqa: E731
    for r, i in enumerate(after.row_to_id):
        path = after.item(int(i))["path"]
        if path in before and path != rel(changed):
            old_id, old_vec = before[path]
            assert int(i) == old_id and np.array_equal(after.vectors[r], old_vec)  # ids and vectors kept
    assert after.item(before[rel(changed)][0]) is not None  # a changed file keeps its id, with a new vector
    assert not np.allclose(after.vector(before[rel(changed)][0]), before[rel(changed)][1])
    assert rel(removed) not in {after.item(int(i))["path"] for i in after.row_to_id}
    assert sorted(p.name for p in (work / "index").iterdir() if p.name.startswith("vectors")) == ["vectors-3.npy"]


def test_a_model_change_is_refused_unless_rebuild(indexed, tmp_path, towers):
    from cliplab.errors import ConfigError
    from cliplab.serve.index import IndexBuilder

    _, photos, index, _ = indexed
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    with pytest.raises(ConfigError, match="Pass --rebuild"):
        IndexBuilder(copy, f"clip:{folder}", log=lambda m: None, progress=False).build([photos])
    report = IndexBuilder(copy, f"clip:{folder}", rebuild=True, log=lambda m: None, progress=False,
                          max_pixels=400 * 400).build([photos])
    assert report.embedded == 16 and report.unchanged == 0


def _index_cmd(index: Path, photos: Path, model: str, crash_at: str):
    """`cliplab index` in a subprocess that kills itself with SIGKILL at ``crash_at`` (tests/crash_points.py)."""
    cmd = [sys.executable, "-m", "tests.crash_points", crash_at, "index", str(photos), "--out", str(index), "-m",
           model, "--chunk-size", "8", "--batch-size", "4", "--device", "cpu"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "CLIPLAB_CACHE": str(index.parent / "cache")})


@pytest.mark.subprocess
def test_kill_9_at_any_point_leaves_the_previous_index_usable(tmp_path, towers):
    """Real indexing subprocesses killed with SIGKILL at several points; the previous generation stays whole
    and searchable, and the next run completes the work (equal to an uninterrupted build)."""
    from cliplab.serve.index import WORK, IndexBuilder, PhotoIndex

    _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    model = f"clip:{folder}"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        make_image(photos / f"a{i:03d}.jpg", list(COLOURS)[i % 4], SHAPES[i % 2], seed=i, size=32)
    index = tmp_path / "index"
    IndexBuilder(index, model, log=lambda m: None, progress=False).build([photos])  # generation 1: 12 images
    for i in range(12, 120):
        make_image(photos / f"b{i:03d}.jpg", list(COLOURS)[i % 4], SHAPES[i % 2], seed=i, size=32)

    def check_previous_generation_whole():
        idx = PhotoIndex(index)
        assert len(idx) in (12, 120) and idx.faiss.ntotal == len(idx) == len(idx.vectors)
        hits = idx.search(idx.vector(int(idx.row_to_id[0])), 3)
        assert hits[0]["id"] == int(idx.row_to_id[0]) and idx.file_path(hits[0]["id"]).is_file()
        return len(idx)

    # 1) killed in the middle of embedding (SIGKILL while decoding the 21st new image)
    proc = _index_cmd(index, photos, model, crash_at="image-20")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    assert check_previous_generation_whole() == 12
    done = list((index / WORK).rglob("part-*.npz"))  # finished chunks of the 108 new images, kept for the next run
    assert done and sum(len(np.load(p)["valid"]) for p in done) <= 20
    # 2-4) killed inside the commit sequence, by the process itself (a real SIGKILL at a named point)
    for point in ("before-vectors", "after-vectors", "before-commit"):
        proc = _index_cmd(index, photos, model, crash_at=point)
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, out[-2000:]
        assert check_previous_generation_whole() == 12, point
        assert json.loads((index / "CURRENT").read_text())["generation"] == 1
    # 5) killed right after the commit: the new generation is live and whole
    proc = _index_cmd(index, photos, model, crash_at="after-commit")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL and check_previous_generation_whole() == 120
    # the next run finds nothing to do, removes the leftovers, and equals an uninterrupted build
    report = IndexBuilder(index, model, log=lambda m: None, progress=False).build([photos])
    assert report.embedded == 0 and report.total == 120
    ref = tmp_path / "ref"
    IndexBuilder(ref, model, log=lambda m: None, progress=False).build([photos])
    a, b = PhotoIndex(index), PhotoIndex(ref)
    paths = lambda idx: [idx.item(int(i))["path"] for i in idx.row_to_id]  # noqa: E731
    assert paths(a) == paths(b)
    np.testing.assert_allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-5)
    assert not (index / WORK).exists()
    assert not [p for p in index.iterdir() if p.name.startswith(".")]


def test_search_cli_text_image_and_combinations(indexed, cli, monkeypatch):
    _, photos, index, _ = indexed
    res = cli("search", index, "a red circle", "-k", "3", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    hits = json.loads(res.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(Path(h["file"]).is_file() for h in hits)
    image = next(photos.rglob("green_square_0*"))
    res = cli("search", index, "--image", image, "-k", "1", "--json")
    assert json.loads(res.stdout)[0]["file"] == str(image.resolve())
    res = cli("search", index, "square", "+", image, "-", "red", "-k", "4")
    assert res.returncode == 0 and "score" in res.stdout
    res = cli("search", index, "-k", "0", "x")
    assert res.returncode == 2 and "-k must be >= 1" in res.stdout
    res = cli("search", index.parent / "nowhere", "x")
    assert res.returncode == 2 and "not a cliplab index" in res.stdout
    # rclip's habits: -t/--top for -k, -f prints only the files, the index from $CLIPLAB_INDEX
    res = cli("search", index, "a red circle", "-t", "3", "-f")
    assert res.returncode == 0 and res.stdout.splitlines() == [h["file"] for h in hits]
    monkeypatch.setenv("CLIPLAB_INDEX", str(index))
    res = cli("search", "a red circle", "--top", "3", "--filepath-only")
    assert res.returncode == 0 and res.stdout.splitlines() == [h["file"] for h in hits]
    monkeypatch.delenv("CLIPLAB_INDEX")
    res = cli("search")
    assert res.returncode == 2 and "CLIPLAB_INDEX" in res.stdout


# -- the HTTP API
@pytest.fixture(scope="module")
def server(indexed, tmp_path_factory):
    from cliplab.serve.app import ServerSettings, create_app

    _, _, index, _ = indexed
    settings = ServerSettings(index, thumb_dir=tmp_path_factory.mktemp("thumbs"), max_upload_bytes=300_000,
                              max_pixels=500 * 500, max_k=20)
    return settings, create_app(settings)


@pytest.fixture(scope="module")
def client(server):
    from fastapi.testclient import TestClient

    return TestClient(server[1], base_url="http://localhost", raise_server_exceptions=False)


def png_bytes(colour="red", size=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buf, "PNG")
    return buf.getvalue()


def test_api_search_endpoints(client, indexed):
    _, photos, index, _ = indexed
    assert client.get("/healthz").json() == {"status": "ok", "images": 16}
    info = client.get("/api/info").json()
    assert info["images"] == 16 and info["model"] == "conse" and info["name"] == "index"
    r = client.get("/api/search", params={"q": "a blue square", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert len(body["results"]) == 5 and set(body["results"][0]) == {
        "id", "score", "path", "width", "height", "captions", "image", "thumb", "taken", "camera", "generated"}
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    same = client.post("/api/search", json={"text": "a blue square", "k": 5}).json()
    assert [h["id"] for h in same["results"]] == [h["id"] for h in body["results"]]
    first = body["results"][0]["id"]
    more = client.post("/api/search", json={"id": first, "k": 5}).json()["results"]
    assert first not in [h["id"] for h in more] and len(more) == 5  # "more like this" leaves the query out
    up = client.post("/api/search", files={"image": ("q.png", png_bytes("green"), "image/png")}, data={"k": "4"})
    assert up.status_code == 200 and len(up.json()["results"]) == 4
    assert client.get("/api/search", params={"q": "x", "k": 999}).json()["k"] == 20  # capped
    image = client.get(f"/image/{first}")
    assert image.status_code == 200 and image.content == (Path(photos) / body["results"][0]["path"]).read_bytes()
    thumb = client.get(f"/thumb/{first}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert max(im.size) <= 256
    assert client.get(f"/thumb/{first}").content == thumb.content  # cached
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/knn-service", "/metadata"}
    metrics = client.get("/metrics").text
    assert 'cliplab_requests_total{route="/api/search",status="200"}' in metrics and "cliplab_index_images 16" in metrics
    page = client.get("/")
    assert page.status_code == 200 and "<title>cliplab search</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: everything served locally


def test_rocchio_feedback_against_a_hand_computation():
    from cliplab.errors import DataError
    from cliplab.serve.query import refine_with_feedback

    q, a, b, c = np.array([1.0, 0, 0]), np.array([0, 2.0, 0]), np.array([0, 0, 1.0]), np.array([0, 0.6, 0.8])
    # 1*q + 0.5*mean(a/|a|, b) - 0.25*c = (1, 0.25, 0.25) - (0, 0.15, 0.2) = (1, 0.1, 0.05)
    got = refine_with_feedback(q, [a, b], [c], weights=(1.0, 0.5, 0.25))
    want = np.array([1.0, 0.1, 0.05]) / np.linalg.norm([1.0, 0.1, 0.05])
    assert np.allclose(got, want, atol=1e-7) and got.dtype == np.float32
    assert np.allclose(refine_with_feedback(None, [a], [], weights=(1, 1, 1)), [0, 1, 0])  # only "more like these"
    with pytest.raises(DataError, match="cancel out"):
        refine_with_feedback(q, [], [q], weights=(1.0, 0.5, 1.0))
    with pytest.raises(DataError, match="at least one liked"):
        refine_with_feedback(None, [], [c])


def test_feedback_through_the_api_the_cli_and_the_python_index(client, indexed, cli):
    import cliplab
    from cliplab.serve.index import PhotoIndex
    from cliplab.serve.query import FEEDBACK_WEIGHTS, QueryEncoder, refine_with_feedback

    _, _, index_dir, _ = indexed
    base = client.post("/api/search", json={"text": "a red circle", "k": 16, "mode": "semantic"}).json()["results"]
    like, unlike = base[3]["id"], base[0]["id"]
    body = {"text": "a red circle", "positive_ids": [like], "negative_ids": [unlike], "k": 16, "mode": "semantic"}
    refined = client.post("/api/search", json=body).json()["results"]
    index = PhotoIndex(index_dir)  # the same ranking by hand: Rocchio on the indexed vectors, then FAISS
    query = QueryEncoder(cliplab.load_model("conse")).text("a red circle")
    vector = refine_with_feedback(query, [index.vector(like)], [index.vector(unlike)], FEEDBACK_WEIGHTS)
    assert [h["id"] for h in refined] == [h["id"] for h in index.search(vector, 16, exclude={unlike})]
    assert len(refined) == 15 and unlike not in [h["id"] for h in refined]  # marked not relevant: not shown again
    assert [h["id"] for h in refined].index(like) < 3
    only_liked = client.post("/api/search", json={"positive_ids": [like], "k": 3, "mode": "semantic"}).json()["results"]
    assert only_liked[0]["id"] == like  # no text: "more like these", the liked image itself first
    assert client.post("/api/search", json={"negative_ids": [like]}).status_code == 422
    assert client.post("/api/search", json={**body, "positive_ids": [10**6]}).status_code == 404
    too_many = client.post("/api/search", json={**body, "positive_ids": list(range(21))})  # more than max_k
    assert too_many.status_code == 422 and too_many.json()["error"].startswith("invalid JSON body: positive_ids: ")
    res = cli("search", index_dir, "a red circle", "-k", "16", "--like", f"id:{like}", "--unlike", str(unlike), "--json",
              "--mode", "semantic")
    assert res.returncode == 0, res.stdout
    assert [h["id"] for h in json.loads(res.stdout)] == [h["id"] for h in refined]
    table = cliplab.Index(index_dir).search("a red circle", k=16, like=[like], unlike=[unlike], mode="semantic")
    assert [row["id"] for row in table.rows] == [h["id"] for h in refined]
    res = cli("search", index_dir, "x", "--like", "12a")
    assert res.returncode == 2 and "--like takes indexed ids like id:12" in res.stdout
    res = cli("search", index_dir, "x", "--unlike", "id:999999")
    assert res.returncode == 2 and "no indexed image with id 999999" in res.stdout


def test_keyword_text_and_fts_queries():
    from cliplab.serve.index import fts_query, searchable_text

    assert searchable_text("trips/2020/beach_day-01.JPG", ["A dog runs."], "Canon EOS").split("\n") == \
        ["trips 2020 beach day 01", "Canon EOS", "A dog runs."]
    assert fts_query('a "dog" OR NEAR(x) beach* dog') == '"a" OR "dog" OR "or" OR "near" OR "x" OR "beach"'
    assert fts_query("  --- ") is None


def test_reciprocal_rank_fusion_by_hand():
    from cliplab.serve.query import fuse_rankings

    # a: 1/(10+1) + 1/(10+3); b: 1/(10+2) + 1/(10+1); c: 1/(10+3); d: 1/(10+2)
    got = fuse_rankings([["a", "b", "c"], ["b", "d", "a"]], constant=10)
    want = {"a": 1 / 11 + 1 / 13, "b": 1 / 12 + 1 / 11, "c": 1 / 13, "d": 1 / 12}
    assert [i for _, i in got] == ["b", "a", "d", "c"] and all(s == pytest.approx(want[i]) for s, i in got)
    assert [i for _, i in fuse_rankings([["x", "y"], ["y", "x"]], constant=5)] == ["x", "y"]  # tie: first seen
    weighted = fuse_rankings([["a", "b"], ["b"]], constant=10, weights=[1.0, 4.0])  # a: 1/11; b: 1/12 + 4/11
    assert [i for _, i in weighted] == ["b", "a"] and weighted[0][0] == pytest.approx(1 / 12 + 4 / 11)


def test_words_in_half_the_photos_are_left_out_of_keyword_matches(indexed):
    """Such words weigh ~0 in BM25 (FTS5 clamps their IDF to 1e-6): dropping them keeps the scores of the photos
    matching the other words and skips the photos matching only them; a query of only such words keeps them."""
    from cliplab.serve.index import PhotoIndex

    _, _, index, _ = indexed
    idx = PhotoIndex(index)
    assert "nested" in idx.common_words and "red" not in idx.common_words  # 2 of 3 photos are in nested/
    full = {int(i): -float(b) for i, b in idx.db.execute(
        "SELECT rowid, bm25(items_text) FROM items_text WHERE items_text MATCH ?", ('"red" OR "nested"',))}
    red = {int(r[0]) for r in idx.db.execute("SELECT rowid FROM items_text WHERE items_text MATCH '\"red\"'")}
    got = dict((i, s) for s, i in idx.keyword_rank("red nested", 100))
    assert set(got) == red and len(full) > len(red)
    assert all(abs(got[i] - full[i]) < 1e-4 for i in red)
    assert len(idx.keyword_rank("nested", 100)) == sum(1 for it in idx.all_items().values()
                                                       if it["path"].startswith("nested/"))


def test_keyword_mode_on_an_index_without_the_keyword_table_says_how_to_add_it(indexed, tmp_path):
    """An index written before keyword search: keyword mode is a one-line error (422 in the API), not an empty
    list; hybrid ranks semantically; an update adds the table without embedding anything again."""
    import sqlite3

    from fastapi.testclient import TestClient

    from cliplab.errors import CliplabError
    from cliplab.serve.app import ServerSettings, create_app
    from cliplab.serve.index import CURRENT, IndexBuilder, PhotoIndex
    from cliplab.serve.query import ranked_hits

    _, photos, index, _ = indexed
    old = tmp_path / "index"
    shutil.copytree(index, old)
    with sqlite3.connect(old / json.loads((old / CURRENT).read_text())["db"]) as con:
        con.execute("DROP TABLE items_text")  # as releases before keyword search wrote it
    idx = PhotoIndex(old)
    with pytest.raises(CliplabError, match="no keyword table.*cliplab index"):
        ranked_hits(idx, None, "red circle", 3, mode="keyword")
    vector = np.asarray(idx.vectors[0], dtype=np.float32)
    assert [h["id"] for h in ranked_hits(idx, vector, "red circle", 3, mode="hybrid")] == \
        [h["id"] for h in ranked_hits(idx, vector, "red circle", 3, mode="semantic")]
    client = TestClient(create_app(ServerSettings(old, thumb_dir=tmp_path / "thumbs")), base_url="http://localhost")
    res = client.get("/api/search", params={"q": "red circle", "k": 3, "mode": "keyword"})
    assert res.status_code == 422 and "no keyword table" in res.json()["error"]
    report = IndexBuilder(old, max_pixels=400 * 400, log=lambda m: None, progress=False).build([photos])
    assert report.embedded == 0
    assert ranked_hits(PhotoIndex(old), None, "red circle", 3, mode="keyword")


def test_keyword_and_hybrid_modes(indexed, client, cli):
    from cliplab.serve.index import PhotoIndex
    from cliplab.serve.query import FUSION_DEPTH, KEYWORD_WEIGHT, RRF_CONSTANT, QueryEncoder, fuse_rankings

    import cliplab

    _, _, index_dir, _ = indexed
    index = PhotoIndex(index_dir)
    words = client.get("/api/search", params={"q": "green square", "k": 4, "mode": "keyword"}).json()["results"]
    assert {h["path"].rsplit("/", 1)[-1].split("_")[0] for h in words} == {"green"}  # the rare word decides (BM25)
    assert len(words) == 4
    vector = QueryEncoder(cliplab.load_model("conse")).text("green square")
    semantic = [i for _, i in index.semantic_rank(vector, FUSION_DEPTH)]
    keyword = [i for _, i in index.keyword_rank("green square", FUSION_DEPTH)]
    fused = [i for _, i in fuse_rankings([semantic, keyword], RRF_CONSTANT, [1.0, KEYWORD_WEIGHT])][:8]
    hybrid = client.get("/api/search", params={"q": "green square", "k": 8, "mode": "hybrid"}).json()["results"]
    assert [h["id"] for h in hybrid] == fused
    nowords = client.get("/api/search", params={"q": "zebra", "k": 5, "mode": "hybrid"}).json()["results"]
    assert [h["id"] for h in nowords] == [h["id"] for h in client.get(
        "/api/search", params={"q": "zebra", "k": 5, "mode": "semantic"}).json()["results"]]  # no keyword hit
    res = cli("search", index_dir, "green square", "--mode", "keyword", "-k", "4", "--json")
    assert res.returncode == 0 and [h["id"] for h in json.loads(res.stdout)] == [h["id"] for h in words]
    assert client.get("/api/search", params={"q": "x", "mode": "fuzzy"}).status_code == 422
    assert client.post("/api/search", json={"id": words[0]["id"], "mode": "keyword"}).status_code == 422
    res = cli("search", index_dir, "x", "--mode", "fuzzy")
    assert res.returncode == 2 and "--mode must be one of semantic, keyword, hybrid" in res.stdout


def test_clip_retrieval_compatible_api(client):
    assert client.get("/indices-list").json() == ["index"]
    hits = client.post("/knn-service", json={"text": "a red circle", "modality": "image", "num_images": 3,
                                             "indice_name": "index"}).json()
    assert len(hits) == 3 and set(hits[0]) == {"id", "similarity", "url", "caption", "image_path"}
    b64 = base64.b64encode(png_bytes("yellow")).decode()
    assert len(client.post("/knn-service", json={"image": b64, "num_images": 2}).json()) == 2
    meta = client.post("/metadata", json={"ids": [hits[0]["id"], 999999], "indice_name": "index"}).json()
    assert [m["id"] for m in meta] == [hits[0]["id"]] and meta[0]["metadata"]["image_path"] == hits[0]["image_path"]
    dim = client.get("/api/info").json()["dim"]
    emb = client.post("/knn-service", json={"embedding_input": [0.1] * dim, "num_images": 2}).json()
    assert len(emb) == 2


@pytest.mark.parametrize("method,url,kwargs,status,message", [
    ("get", "/api/search", {"params": {"k": 3}}, 422, "q"),
    ("get", "/api/search", {"params": {"q": "   "}}, 422, "empty query"),
    ("get", "/api/search", {"params": {"q": "x" * 501}}, 422, "longer than 500"),
    ("get", "/api/search", {"params": {"q": "dog", "k": 0}}, 422, "k must be >= 1"),
    ("get", "/api/search", {"params": {"q": "dog", "k": "many"}}, 422, "k"),
    ("post", "/api/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("post", "/api/search", {"json": {}}, 422, "give text, id"),
    ("post", "/api/search", {"json": {"id": 987654}}, 404, "no indexed image with id 987654"),
    ("post", "/api/search", {"files": {"image": ("x.png", b"not an image", "image/png")}}, 415, "not a readable image"),
    ("post", "/api/search", {"files": {"image": ("x.png", b"0" * 400_000, "image/png")}}, 413, "too large"),
    ("post", "/api/search", {"files": {"image": ("x.png", png_bytes("red", 600), "image/png")}}, 413, "pixels"),
    ("post", "/api/search", {"files": {"other": ("x.png", b"1", "image/png")}}, 422, "'image' file field"),
    ("get", "/image/999999", {}, 404, "no image with id"),
    ("get", "/image/abc", {}, 422, "item_id"),
    ("get", "/image/../../etc/passwd", {}, 404, ""),
    ("get", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}, 404, ""),
    ("get", "/image//etc/passwd", {}, 404, ""),
    ("get", "/thumb/-1", {}, 404, "no image with id"),
    ("get", "/static/..%2f..%2fapp.py", {}, 404, ""),
    ("post", "/knn-service", {"json": {"image_url": "http://127.0.0.1:1/x.jpg"}}, 403, "disabled"),
    ("post", "/knn-service", {"json": {"text": "a", "image": "aGk="}}, 422, "exactly one of"),
    ("post", "/knn-service", {"json": {"text": "a", "indice_name": "other"}}, 404, "unknown indice_name"),
    ("post", "/knn-service", {"json": {"text": "a", "modality": "text"}}, 422, "modality"),
    ("post", "/knn-service", {"json": {"image": "***"}}, 422, "base64"),
    ("post", "/knn-service", {"json": {"embedding_input": [1.0, 2.0]}}, 422, "finite numbers"),
    ("post", "/metadata", {"json": {"ids": list(range(50))}}, 422, "at most 20"),
    ("get", "/no/such/route", {}, 404, "Not Found"),
])
def test_every_bad_request_is_a_json_4xx(client, method, url, kwargs, status, message):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and message in body["error"] and "Traceback" not in r.text


def test_files_never_leave_the_indexed_root(indexed, server, tmp_path):
    """A file replaced by a symlink out of its root after indexing is not served."""
    from fastapi.testclient import TestClient

    from cliplab.serve.app import ServerSettings, create_app

    tmp, photos, index, _ = indexed
    copy = tmp_path / "photos"
    shutil.copytree(photos, copy, symlinks=True)
    idx_copy = tmp_path / "index"
    shutil.copytree(index, idx_copy)
    db = next(idx_copy.glob("meta-*.sqlite"))
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("UPDATE info SET value = ? WHERE key = 'roots'", (json.dumps([str(copy.resolve())]),))
    con.commit()
    con.close()
    client = TestClient(create_app(ServerSettings(idx_copy, thumb_dir=tmp_path / "t")), base_url="http://localhost",
                        raise_server_exceptions=False)
    item = client.get("/api/search", params={"q": "red", "k": 1}).json()["results"][0]
    assert client.get(f"/image/{item['id']}").status_code == 200
    target = copy / item["path"]
    target.unlink()
    target.symlink_to("/etc/hostname")
    r = client.get(f"/image/{item['id']}")
    assert r.status_code == 404 and r.json() == {"error": f"no image with id {item['id']}"}


def test_bearer_token_and_read_only_index(indexed, tmp_path):
    from fastapi.testclient import TestClient

    from cliplab.serve.app import ServerSettings, create_app

    _, _, index, _ = indexed
    before = {p.name: p.stat().st_mtime_ns for p in index.iterdir()}
    token = "s3cret-s3cret-s3cret"
    client = TestClient(create_app(ServerSettings(index, token=token, thumb_dir=tmp_path / "t")),
                        base_url="http://localhost", raise_server_exceptions=False)
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    r = client.get("/api/search", params={"q": "dog"})
    assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
    assert client.get("/api/search", params={"q": "dog"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = client.get("/api/search", params={"q": "dog"}, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    item = ok.json()["results"][0]["id"]
    assert client.get(f"/thumb/{item}").status_code == 200  # <img> tags: the session cookie set by that answer
    client.cookies.clear()
    assert client.get(f"/image/{item}").status_code == 401
    assert client.get(f"/image/{item}", params={"token": token}).status_code == 401  # never a token in a URL
    assert {p.name: p.stat().st_mtime_ns for p in index.iterdir()} == before  # the server never writes the index


def test_serve_refuses_exposure_without_token_unless_no_auth(indexed, monkeypatch):
    from cliplab.errors import ConfigError
    from cliplab.serve import app as app_module

    _, _, index, _ = indexed
    ran, lines = [], []
    monkeypatch.setattr(app_module, "require", lambda m, f=None: type("U", (), {"run": lambda *a, **k: ran.append(k)}))
    monkeypatch.setattr(app_module, "create_app", lambda s: object())
    with pytest.raises(ConfigError, match="without --token"):
        app_module.serve(app_module.ServerSettings(index), host="0.0.0.0", port=1, log=lines.append)
    assert ran == []
    app_module.serve(app_module.ServerSettings(index), host="0.0.0.0", port=1, log=lines.append, no_auth=True)
    assert "without a token" in lines[0] and ran[0]["host"] == "0.0.0.0"
    lines.clear()
    app_module.serve(app_module.ServerSettings(index), log=lines.append)
    assert not any("without" in ln for ln in lines) and ran[1]["host"] == "127.0.0.1"


# -- a live server: the web page in Chromium, and concurrent clients
@pytest.fixture(scope="module")
def live(server):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(server[1], host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_many_concurrent_clients_get_correct_answers(live, client):
    import httpx

    queries = ["a red circle", "a blue square", "green", "yellow shape", "a photo of a dog", "circle", "square",
               "something bright"]
    expected = {q: [h["id"] for h in client.get("/api/search", params={"q": q, "k": 5}).json()["results"]]
                for q in queries}
    errors, answers, stop = [], [], time.time() + 3.0

    def worker(n):
        with httpx.Client(base_url=live, timeout=30) as http:
            i = n
            while time.time() < stop:
                q = queries[i % len(queries)]
                r = http.get("/api/search", params={"q": q, "k": 5})
                if r.status_code != 200:
                    errors.append(r.status_code)
                elif [h["id"] for h in r.json()["results"]] != expected[q]:
                    errors.append(f"wrong answer for {q!r}")
                else:
                    answers.append(q)
                i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(answers) >= 16


@pytest.mark.browser
def test_web_page_in_headless_chromium(live, indexed):
    import httpx
    from playwright.sync_api import expect, sync_playwright

    from tests.conftest import open_page

    _, photos, _, _ = indexed
    errors = []
    with sync_playwright() as p:
        browser, page = open_page(p, 1280, 900, errors)
        page.goto(live + "/")
        expect(page.locator("#info")).to_contain_text("16 images")
        expect(page.locator("#info")).to_contain_text("conse")
        page.locator("#q").fill("a red circle")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("results for")
        tiles = page.locator(".tile img")
        expect(tiles).to_have_count(16)
        page.wait_for_function("Array.from(document.querySelectorAll('.tile img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        # keyboard: open the first result, close with Escape
        page.locator(".tile .open").first.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#lightbox")).to_have_class("open")
        page.wait_for_function("document.getElementById('lbimg').naturalWidth > 0")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Escape")
        expect(page.locator("#lightbox")).not_to_have_class("open")
        # more like this
        page.locator(".tile .more").first.click()
        expect(page.locator("#status")).to_contain_text("images like #")
        # relevance feedback: mark results, refine; the page sends exactly the marks with the query
        page.locator("#q").fill("a red circle")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("results for “a red circle”")
        expect(page.locator("#feedback")).not_to_have_class("on")
        ids = page.evaluate("Array.from(document.querySelectorAll('.judge.yes')).map(b => b.getAttribute('aria-label'))")
        like, unlike = int(ids[1].split("#")[1]), int(ids[0].split("#")[1])
        page.get_by_label(f"relevant #{like}", exact=True).click()
        page.get_by_label(f"not relevant #{unlike}", exact=True).click()
        expect(page.get_by_label(f"relevant #{like}", exact=True)).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#judged")).to_have_text("1 relevant, 1 not relevant")
        with page.expect_request(lambda r: r.url.endswith("/api/search") and r.method == "POST") as sent:
            page.locator("#refine").click()
        assert json.loads(sent.value.post_data) == {"text": "a red circle", "positive_ids": [like], "mode": "hybrid",
                                                    "negative_ids": [unlike], "k": int(page.locator("#k").input_value())}
        expect(page.locator("#status")).to_contain_text("refined query (1 relevant, 1 not)")
        expected = [h["id"] for h in httpx.post(live + "/api/search", json=json.loads(sent.value.post_data)).json()["results"]]
        shown = page.evaluate("Array.from(document.querySelectorAll('.judge.yes')).map(b => +b.getAttribute('aria-label').split('#')[1])")
        assert shown == expected
        expect(page.get_by_label(f"relevant #{like}", exact=True)).to_have_attribute("aria-pressed", "true")  # kept
        page.locator("#clearjudged").click()
        expect(page.locator("#feedback")).not_to_have_class("on")
        # filters: only the photos in one folder are ranked (the request carries the filter)
        page.locator("#filters summary").click()
        page.locator("#folder").fill("nested/deeper")
        with page.expect_request(lambda r: "/api/search?" in r.url) as sent:
            page.locator("#q").fill("a red circle")
            page.keyboard.press("Enter")
        assert "folder=nested%2Fdeeper" in sent.value.url
        deeper = len(list((photos / "nested" / "deeper").rglob("*.*"))) - 0
        expect(page.locator("#status")).to_contain_text(" results for")
        shown = page.evaluate("Array.from(document.querySelectorAll('.tile .open')).map(b => b.getAttribute('aria-label'))")
        assert shown and all(label.startswith("open nested/deeper/") for label in shown) and len(shown) <= deeper
        page.locator("#folder").fill("")
        # the mode switch: keyword search reads the words of file names
        page.locator("#mode").select_option("keyword")
        with page.expect_request(lambda r: "/api/search?" in r.url) as sent:
            page.locator("#q").fill("yellow")
            page.keyboard.press("Enter")
        assert "mode=keyword" in sent.value.url
        expect(page.locator("#status")).to_contain_text("4 results for")
        shown = page.evaluate("Array.from(document.querySelectorAll('.tile .open')).map(b => b.getAttribute('aria-label'))")
        assert all("yellow_" in label for label in shown)
        page.locator("#mode").select_option("hybrid")
        # an uploaded image as the query
        page.locator("#file").set_input_files(str(next(photos.rglob("blue_circle_0*"))))
        expect(page.locator("#status")).to_contain_text("results for the image")
        expect(page.locator(".tile img")).to_have_count(16)
        browser.close()
    assert errors == []
