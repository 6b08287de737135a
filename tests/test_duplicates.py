"""Duplicate groups (`cliplab duplicates`, `/api/duplicates`, the review page): exact groups by content hash,
near groups against a brute-force reference, the keep suggestion, the exported list, and that nothing is
ever deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image

pytest.importorskip("faiss")


def brute_force_groups(vectors: np.ndarray, threshold: float, neighbours: int) -> list[list[int]]:
    """Connected components by breadth-first search over the same neighbour rule, written out by hand."""
    sims = vectors @ vectors.T
    n = len(vectors)
    edges = {i: set() for i in range(n)}
    for i in range(n):
        order = sorted(range(n), key=lambda j: -sims[i, j])[: neighbours + 1]
        for j in order:
            if j != i and sims[i, j] >= threshold:
                edges[i].add(j)
                edges[j].add(i)
    seen, groups = set(), []
    for i in range(n):
        if i in seen:
            continue
        stack, comp = [i], []
        seen.add(i)
        while stack:
            k = stack.pop()
            comp.append(k)
            for j in edges[k] - seen:
                seen.add(j)
                stack.append(j)
        if len(comp) > 1:
            groups.append(sorted(comp))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_groups_match_a_brute_force_reference(seed):
    from cliplab.serve.duplicates import near_groups

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 16))
    vectors = np.concatenate([centres, centres[:5] + 0.15 * rng.normal(size=(5, 16)),
                              centres[:2] + 0.3 * rng.normal(size=(2, 16))])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for threshold in (0.9, 0.95, 0.99):
        for neighbours in (2, 20):
            got = near_groups(vectors.astype(np.float32), threshold, neighbours=neighbours, batch=7)
            assert got == brute_force_groups(vectors, threshold, neighbours)
    assert near_groups(vectors[:1], 0.9) == []


def test_pair_precision_and_recall_by_hand():
    from cliplab.serve.duplicates import pair_scores

    # predicted pairs: (0,1) (0,2) (1,2) (5,6); true pairs: (0,1) (3,4) -> 1 hit, precision 1/4, recall 1/2
    m = pair_scores([[0, 1, 2], [5, 6]], [[0, 1], [3, 4]])
    assert (m["precision"], m["recall"], m["predicted_pairs"], m["true_pairs"]) == (0.25, 0.5, 4, 2)
    assert m["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory):
    from cliplab.serve.index import IndexBuilder

    tmp = tmp_path_factory.mktemp("dups")
    photos = tmp / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                         ("yellow", "circle")]):
        make_image(photos / f"{colour}_{shape}.png", colour, shape, size=96, seed=i)
    shutil.copy(photos / "red_circle.png", photos / "sub" / "red_circle copy.png")  # byte-identical
    with Image.open(photos / "blue_square.png") as im:
        im.resize((48, 48), Image.BICUBIC).save(photos / "sub" / "blue_square_small.png")  # fewer pixels
    (photos / "0-favourite.png").symlink_to(photos / "green_triangle.png")  # the same file twice: not a duplicate
    index = tmp / "index"
    IndexBuilder(index, "conse", log=lambda m: None, progress=False).build([photos])
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    return photos, index, before


@pytest.mark.slow  # builds an index (make test runs it; the quick tier keeps the unit tests)
def test_exact_and_near_groups_of_an_index(dup_index, cli, tmp_path):
    from cliplab.serve.duplicates import find_duplicates
    from cliplab.serve.index import PhotoIndex

    photos, index_dir, before = dup_index
    index = PhotoIndex(index_dir)
    items = index.all_items()
    report = find_duplicates(index)  # a conse index: exact groups only, and a warning saying why
    assert [[it["path"] for it in g] for g in report.exact] == [["red_circle.png", "sub/red_circle copy.png"]]
    assert report.near_skipped and report.near == [] and "unreliable" in report.warning
    (favourite,) = [g for g in [it for grp in report.exact for it in grp] if g["path"] == "0-favourite.png"] or [None]
    assert favourite is None  # the symlink and its target are one photo, never a duplicate pair
    vectors = np.asarray(index.vectors, dtype=np.float32)
    link_id = next(i for i, it in items.items() if it["path"] == "0-favourite.png")
    copy_id = next(i for i, it in items.items() if it["path"] == "sub/red_circle copy.png")
    for threshold in (0.9, 0.97, 0.999):
        report = find_duplicates(index, threshold=threshold)
        expected = [sorted(int(index.row_to_id[r]) for r in g) for g in brute_force_groups(vectors, threshold, 20)]
        expected = [[i for i in g if i not in (link_id, copy_id)] for g in expected]  # one item per file, content
        assert sorted(sorted(it["id"] for it in g) for g in report.near) == sorted(g for g in expected if len(g) > 1)
        for group in report.near:
            keep = group[0]
            assert keep["keep"] and sum(it["keep"] for it in group) == 1
            assert keep["width"] * keep["height"] == max(it["width"] * it["height"] for it in group)
            for it in group[1:]:  # remove only what is itself that similar to the keeper; the rest: review
                assert it["suggest"] == ("remove" if it["similarity"] >= threshold else "review")
                assert it["similarity"] == pytest.approx(float(vectors[index.id_to_row[it["id"]]] @
                                                               vectors[index.id_to_row[keep["id"]]]), abs=1e-5)
        listed = set(report.suggested_removals())
        assert not listed & {it["file"] for g in report.exact + report.near for it in g if it["suggest"] != "remove"}
        assert str(photos / "0-favourite.png") not in listed  # a second path to a file is never a copy of it
    small = find_duplicates(index, threshold=0.85).near  # conse sees the half-size copy at 0.864 (and more)
    assert any({it["path"] for it in g} >= {"blue_square.png", "sub/blue_square_small.png"} for g in small), small
    import cliplab

    assert cliplab.Index(index_dir).duplicates(0.9).to_dict() == find_duplicates(index, 0.9).to_dict()
    # the CLI: JSON, the list of files to review (a new file only), and no photo touched
    res = cli("duplicates", index_dir, "--threshold", "0.9", "--json")
    assert res.returncode == 0, res.stdout
    assert json.loads(res.stdout) == json.loads(json.dumps(find_duplicates(index, 0.9).to_dict()))
    listing = tmp_path / "review.txt"
    res = cli("duplicates", index_dir, "--list", listing)
    assert res.returncode == 0 and "exact 1" in res.stdout and "deletes nothing" in res.stdout
    assert str(photos / "sub" / "red_circle copy.png") in listing.read_text().splitlines()
    assert str(photos / "red_circle.png") not in listing.read_text().splitlines()  # the keeper (first path)
    res = cli("duplicates", index_dir, "--list", photos / "red_circle.png")
    assert res.returncode == 2 and "never overwrites" in res.stdout
    res = cli("duplicates", tmp_path / "no-index", "--list", photos / "red_circle.png")
    assert res.returncode == 2 and "never overwrites" in res.stdout  # refused before the index is read
    res = cli("duplicates", index_dir, "--threshold", "1.5")
    assert res.returncode == 2 and "threshold must be in (0, 1]" in res.stdout
    res = cli("duplicates", index_dir, "--list", tmp_path / "nowhere" / "list.txt")
    assert res.returncode == 2 and "not a folder" in res.stdout
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def dup_server(dup_index, tmp_path_factory):
    from cliplab.serve.app import ServerSettings, create_app

    _, index, _ = dup_index
    return create_app(ServerSettings(index, thumb_dir=tmp_path_factory.mktemp("thumbs")))


@pytest.mark.slow  # builds an index (make test runs it; the quick tier keeps the unit tests)
def test_duplicates_api(dup_server, dup_index):
    from fastapi.testclient import TestClient

    from cliplab.serve.duplicates import NEAR_THRESHOLD

    photos, index_dir, _ = dup_index
    client = TestClient(dup_server, base_url="http://localhost", raise_server_exceptions=False)
    body = client.get("/api/duplicates").json()
    assert body["threshold"] == NEAR_THRESHOLD and body["images"] == 7 and body["roots"] == [str(photos.resolve())]
    assert body["near_skipped"] and body["near"] == []  # conse: exact groups only unless a threshold is given
    (group,) = body["exact"]
    assert [it["path"] for it in group] == ["red_circle.png", "sub/red_circle copy.png"] and group[0]["keep"]
    assert "file" not in group[0] and "sha256" not in group[0] and group[0]["thumb"] == f"/thumb/{group[0]['id']}"
    near = client.get("/api/duplicates", params={"threshold": 0.9}).json()
    assert near["near"] and not near["near_skipped"]
    assert client.get("/api/duplicates", params={"threshold": 0.9, "limit": 1}).json()["groups_total"] == \
        len(near["exact"]) + len(near["near"])
    assert len(client.get("/api/duplicates", params={"threshold": 0.9, "limit": 1}).json()["near"]) == 0
    for bad in ({"threshold": 2}, {"threshold": "x"}, {"threshold": 0}, {"limit": 0}):
        assert client.get("/api/duplicates", params=bad).status_code == 422, bad
    page = client.get("/duplicates")
    assert page.status_code == 200 and "<title>cliplab duplicates</title>" in page.text and "<!DOCTYPE html>" in page.text


@pytest.mark.slow  # builds an index (make test runs it; the quick tier keeps the unit tests)
def test_a_shared_duplicates_link_with_the_token_lands_on_that_page(dup_index, tmp_path):
    from fastapi.testclient import TestClient

    from cliplab.serve.app import ServerSettings, create_app

    token = "a-token-of-sufficient-length"
    app = create_app(ServerSettings(dup_index[1], token=token, thumb_dir=tmp_path / "thumbs"))
    client = TestClient(app, base_url="http://localhost", follow_redirects=False)
    r = client.get("/duplicates", params={"token": token, "threshold": "0.9"})
    assert r.status_code == 303 and r.headers["location"] == "/duplicates?threshold=0.9"
    assert client.get("/api/duplicates").status_code == 200  # the cookie set by that answer


@pytest.mark.browser
def test_duplicates_review_page_in_headless_chromium(dup_server, dup_index, tmp_path):
    import httpx
    from playwright.sync_api import expect, sync_playwright

    from tests.conftest import live_server, open_page

    photos, _, before = dup_index
    errors = []
    with live_server(dup_server) as base, sync_playwright() as p:
        browser, page = open_page(p, 1280, 900, errors)
        page.goto(base + "/duplicates")
        expect(page.locator("#status")).to_contain_text("1 exact and")
        expect(page.locator("#info")).to_contain_text("7 images")
        expect(page.locator(".group").first).to_contain_text("exact (same content)")
        page.wait_for_function("Array.from(document.querySelectorAll('.photo img')).every(i => i.complete && i.naturalWidth > 0)")
        keep = page.get_by_label("keep red_circle.png", exact=True)
        expect(keep).to_be_visible()
        answer = httpx.get(base + "/api/duplicates").json()
        root = photos.resolve()
        suggested = list(dict.fromkeys(str(root / it["path"]) for g in answer["exact"] + answer["near"]
                                       for it in g if not it["keep"]))
        assert str(root / "sub/red_circle copy.png") in suggested and str(root / "red_circle.png") not in suggested
        with page.expect_download() as download:
            page.locator("#export").click()
        assert Path(download.value.path()).read_text().splitlines() == suggested
        keep.click()  # the keeper marked remove, its copy kept instead
        page.get_by_label("remove sub/red_circle copy.png", exact=True).click()
        with page.expect_download() as download:
            page.locator("#export").click()
        swapped = [str(root / "red_circle.png") if f == str(root / "sub/red_circle copy.png") else f for f in suggested]
        assert Path(download.value.path()).read_text().splitlines() == swapped
        page.locator("#threshold").fill("0.5")
        page.locator("#controls button[type=submit]").click()
        expect(page.locator("#status")).to_contain_text("similarity ≥ 0.5")
        browser.close()
    assert errors == []
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before  # nothing deleted
