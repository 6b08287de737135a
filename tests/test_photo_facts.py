"""EXIF facts recorded at index time (date taken, camera, orientation, GPS) and the search filters built on them
(--after/--before/--camera/--folder): parsed from files this test writes with Pillow, applied before ranking so
that k results come back whenever k photos match."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")

PHOTOS = {  # relative path: (date taken, make, model, orientation, gps, size)
    "a/2019_canon.jpg": ("2019:06:01 10:00:00", "Canon", "Canon EOS 5D", 1, False, (64, 48)),
    "a/2021_nikon.jpg": ("2021:03:15 08:30:00", "NIKON CORPORATION", "NIKON D750", 1, True, (64, 48)),
    "b/2021_canon_portrait.jpg": ("2021:08:20 18:00:00", "Canon", "Canon EOS R", 6, False, (60, 20)),
    "c/2022_phone.jpg": ("2022:01:01 00:00:00", "Apple", "iPhone 12", 1, True, (48, 64)),
}


def write_photo_to(out, taken, make, model, orientation, gps, size, colour=(180, 40, 40)) -> None:
    """A JPEG with these EXIF facts, written by Pillow to a path or a file object."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = make, model, orientation
    exif.get_ifd(0x8769)[0x9003] = taken
    if gps:
        exif.get_ifd(0x8825)[1] = "N"
    Image.new("RGB", size, colour).save(out, "JPEG", exif=exif, quality=90)


def write_photo(path: Path, *facts, colour=(180, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_photo_to(path, *facts, colour=colour)


@pytest.fixture(scope="module")
def facts_index(tmp_path_factory):
    from cliplab.serve.index import IndexBuilder

    tmp = tmp_path_factory.mktemp("facts")
    photos = tmp / "photos"
    for i, (rel, facts) in enumerate(PHOTOS.items()):
        write_photo(photos / rel, *facts, colour=(40 * i, 200 - 40 * i, 90))
    Image.new("RGB", (50, 50), (10, 120, 200)).save(photos / "b" / "nodate.png")  # no EXIF at all
    index = tmp / "index"
    IndexBuilder(index, "conse", log=lambda m: None, progress=False).build([photos])
    return photos, index


def by_path(index) -> dict[str, dict]:
    return {it["path"]: it for it in index.all_items().values()}


@pytest.mark.slow
def test_facts_are_read_from_the_exif_and_stored(facts_index):
    from cliplab.serve.index import PhotoIndex

    items = by_path(PhotoIndex(facts_index[1]))
    assert {k: items["a/2019_canon.jpg"][k] for k in ("taken", "camera", "orientation", "gps")} == \
        {"taken": "2019-06-01T10:00:00", "camera": "Canon EOS 5D", "orientation": 1, "gps": False}
    assert items["a/2021_nikon.jpg"]["camera"] == "NIKON D750"  # the make is not repeated and items["a/2021_nikon.jpg"]["gps"]
    assert items["b/2021_canon_portrait.jpg"]["orientation"] == 6
    assert items["c/2022_phone.jpg"]["camera"] == "Apple iPhone 12"
    assert {k: items["b/nodate.png"][k] for k in ("taken", "camera", "orientation", "gps")} == \
        {"taken": None, "camera": None, "orientation": 1, "gps": False}


@pytest.mark.slow
@pytest.mark.parametrize("filters,expected", [
    ({"after": "2021-01-01"}, {"a/2021_nikon.jpg", "b/2021_canon_portrait.jpg", "c/2022_phone.jpg"}),
    ({"before": "2021-01-01"}, {"a/2019_canon.jpg"}),
    ({"after": "2021-03-15T08:30:00", "before": "2022-01-01"}, {"a/2021_nikon.jpg", "b/2021_canon_portrait.jpg"}),
    ({"camera": "CANON"}, {"a/2019_canon.jpg", "b/2021_canon_portrait.jpg"}),
    ({"camera": "eos_"}, set()),  # LIKE's wildcards are literal text here
    ({"folder": "b"}, {"b/2021_canon_portrait.jpg", "b/nodate.png"}),
    ({"folder": "./b/"}, {"b/2021_canon_portrait.jpg", "b/nodate.png"}),
    ({"folder": "b", "camera": "canon"}, {"b/2021_canon_portrait.jpg"}),
])
def test_filters_rank_exactly_the_matching_photos(facts_index, filters, expected):
    from cliplab.serve.index import PhotoFilter, PhotoIndex

    index = PhotoIndex(facts_index[1])
    items = index.all_items()
    query = np.asarray(index.vectors[0], dtype=np.float32)
    hits = index.search(query, k=10, filters=PhotoFilter(**filters))  # fewer match than k: all of them
    assert {h["path"] for h in hits} == expected
    scores = {i: float(np.asarray(index.vectors[index.id_to_row[i]], dtype=np.float32) @ query) for i in items}
    want = sorted((i for i in items if items[i]["path"] in expected), key=lambda i: -scores[i])
    assert [h["id"] for h in hits] == want and [h["score"] for h in hits] == pytest.approx([scores[i] for i in want])
    if expected:
        assert [h["id"] for h in index.search(query, k=1, filters=PhotoFilter(**filters))] == want[:1]


def test_bad_filters_are_one_line_errors():
    from cliplab.errors import DataError
    from cliplab.serve.index import PhotoFilter

    with pytest.raises(DataError, match="after: not a date"):
        PhotoFilter(after="last summer")
    with pytest.raises(DataError, match="folder: a path inside an indexed folder"):
        PhotoFilter(folder="../elsewhere")
    assert PhotoFilter(folder="./b//c/", camera="x_%!").sql() == (
        "1 AND lower(camera) LIKE ? ESCAPE '!' AND relpath LIKE ? ESCAPE '!'", ["%x!_!%!!%", "b/c/%"])


def test_photo_facts_from_a_header():
    from cliplab.data.images import photo_facts

    buf = io.BytesIO()
    write_photo_to(buf, "2021:07:04 10:20:30", "Canon", "Canon EOS 5D", 6, True, (40, 30))
    with Image.open(buf) as im:
        assert photo_facts(im) == {"taken": "2021-07-04T10:20:30", "camera": "Canon EOS 5D", "orientation": 6,
                                   "gps": True}
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with Image.open(buf) as im:
        assert photo_facts(im) == {"taken": None, "camera": None, "orientation": 1, "gps": False}


@pytest.mark.slow  # the module's index (make test runs these; the quick tier keeps the unit tests above)
def test_a_bad_date_through_the_cli(facts_index, cli):
    res = cli("search", facts_index[1], "a photo", "--before", "2021-13-01")
    assert res.returncode == 2 and "before: not a date" in res.stdout


@pytest.mark.slow
def test_filters_through_the_cli_the_api_and_python(facts_index, cli, tmp_path):
    from fastapi.testclient import TestClient

    import cliplab
    from cliplab.serve.app import ServerSettings, create_app

    photos, index = facts_index
    res = cli("search", index, "a red photo", "--camera", "canon", "--after", "2020-01-01", "--json")
    assert res.returncode == 0, res.stdout
    (hit,) = json.loads(res.stdout)
    assert hit["path"] == "b/2021_canon_portrait.jpg" and hit["taken"] == "2021-08-20T18:00:00"
    rows = cliplab.Index(index).search("a red photo", folder="a", k=5).rows
    assert {r["path"] for r in rows} == {"a/2019_canon.jpg", "a/2021_nikon.jpg"}
    client = TestClient(create_app(ServerSettings(index, thumb_dir=tmp_path / "thumbs")), base_url="http://localhost",
                        raise_server_exceptions=False)
    got = client.get("/api/search", params={"q": "a photo", "camera": "canon", "k": 10}).json()["results"]
    assert {h["path"] for h in got} == {"a/2019_canon.jpg", "b/2021_canon_portrait.jpg"}
    assert {h["camera"] for h in got} == {"Canon EOS 5D", "Canon EOS R"}
    got = client.post("/api/search", json={"text": "a photo", "after": "2021-06-01", "k": 10}).json()["results"]
    assert {h["path"] for h in got} == {"b/2021_canon_portrait.jpg", "c/2022_phone.jpg"}
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 120, 200)).save(buf, "PNG")
    up = client.post("/api/search", files={"image": ("q.png", buf.getvalue(), "image/png")},
                     data={"k": "10", "folder": "b"})
    assert up.status_code == 200 and {h["path"] for h in up.json()["results"]} == {"b/2021_canon_portrait.jpg",
                                                                                 "b/nodate.png"}
    bad = client.get("/api/search", params={"q": "x", "after": "soon"})
    assert bad.status_code == 422 and "after: not a date" in bad.json()["error"]
    # thumbnails stand the way the camera's orientation tag says (a 60x20 landscape shot tagged "rotate 90")
    portrait = next(h for h in client.get("/api/search", params={"q": "x", "folder": "b", "k": 5}).json()["results"]
                    if h["path"] == "b/2021_canon_portrait.jpg")
    with Image.open(io.BytesIO(client.get(portrait["thumb"]).content)) as im:
        assert im.size[1] > im.size[0]


@pytest.mark.slow
def test_an_index_from_before_the_facts_refuses_date_filters_then_an_update_records_them(facts_index, tmp_path):
    from cliplab.errors import ConfigError
    from cliplab.serve.index import CURRENT, IndexBuilder, PhotoFilter, PhotoIndex

    photos, index = facts_index
    old = tmp_path / "old-index"
    shutil.copytree(index, old)
    db = old / json.loads((old / CURRENT).read_text())["db"]
    con = sqlite3.connect(db)  # rewrite items as the schema was before the facts: those columns dropped
    with con:
        for column in ("taken", "camera", "orientation", "gps"):
            con.execute("DROP INDEX IF EXISTS items_taken")
            con.execute(f"ALTER TABLE items DROP COLUMN {column}")
    con.close()
    legacy = PhotoIndex(old)
    with pytest.raises(ConfigError, match="run `cliplab index` on it again"):
        legacy.search(np.asarray(legacy.vectors[0]), k=3, filters=PhotoFilter(after="2020-01-01"))
    assert {h["path"] for h in legacy.search(np.asarray(legacy.vectors[0]), k=9, filters=PhotoFilter(folder="c"))} \
        == {"c/2022_phone.jpg"}  # folders need no facts
    report = IndexBuilder(old, log=lambda m: None, progress=False).build([photos])
    assert report.embedded == 0 and report.unchanged == 5  # the facts are read, nothing re-embedded
    assert by_path(PhotoIndex(old))["a/2021_nikon.jpg"]["taken"] == "2021-03-15T08:30:00"
