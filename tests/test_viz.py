"""Figures render from small synthetic runs; the HTML report opens in headless Chromium without errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data import load_caption_dataset
from cliplab.viz.classification import confusion_matrix_plot, top5_bars
from cliplab.viz.curves import recall_at_k, sweep_overlay, training_curves
from cliplab.viz.galleries import image_to_text_gallery, pick_examples, text_to_image_gallery
from cliplab.viz.maps import class_map, modality_map
from tests.conftest import open_page
from cliplab import rundir


def png_size(path):
    assert path.is_file() and path.stat().st_size > 2000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def fake_rows(n=6):
    return [{"epoch": e, "train_loss": 3.0 - 0.3 * e, "dev": {"t2i_r1": 10 + e, "i2t_r1": 12 + e},
             "test": {"t2i_r1": 9 + e, "i2t_r1": 11 + e}} for e in range(n)]


def spaces(seed=0, n_images=40):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_images), 2)
    img = rng.normal(size=(n_images, 8)).astype(np.float32)
    aligned = img[owner] + 0.3 * rng.normal(size=(len(owner), 8)).astype(np.float32)
    random = rng.normal(size=(len(owner), 8)).astype(np.float32)
    return owner, img, aligned, random


def test_curves_and_recall_plots(tmp_path):
    assert png_size(training_curves(fake_rows(), tmp_path / "curves.png")) == (1000, 560)
    assert "dev_t2i_r1" in (tmp_path / rundir.CURVES).read_text()
    overlay = {f"lr={lr}": [{"epoch": e, "train_loss": 2 - e * lr * 1e3, "dev_t2i_r1": 10 + e} for e in range(5)]
               for lr in (1e-4, 1e-5)}
    assert png_size(sweep_overlay(overlay, tmp_path / "overlay.png")) == (1200, 500)
    ranks = {"baseline": (np.arange(1, 101), np.arange(1, 51)), "trained": (np.ones(100), np.ones(50))}
    assert png_size(recall_at_k(ranks, tmp_path / "rk.png")) == (1200, 500)
    rows = (tmp_path / "rk.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 50 and "trained,t2i,1,100.0" in rows


@pytest.mark.slow
def test_embedding_maps(tmp_path):
    owner, img, aligned, random = spaces()
    for method in ("tsne", "pca"):
        path = modality_map({"before": (img, random), "after": (img, aligned)}, owner, tmp_path / f"m_{method}.png",
                            method=method, max_images=30)
        assert png_size(path) == (1200, 600)
        data = json.loads(path.with_suffix(".json").read_text())
        assert len(data["panels"]["after"]["image_xy"]) == 30
    labels = np.arange(40) % 4
    assert png_size(class_map(img, labels, ["a", "b", "c", "d"], tmp_path / "classes.png", method="pca")) == (800, 700)


def test_classification_figures(tmp_path):
    cm = np.array([[8, 2, 0, 0], [1, 9, 0, 0], [0, 0, 5, 5], [0, 1, 0, 9]])
    assert png_size(confusion_matrix_plot(cm, ["cat", "dog", "car", "ship"], tmp_path / "cm.png")) == (500, 500)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    probs = np.array([[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    assert png_size(top5_bars(images, probs, ["cat", "dog", "car", "ship"], tmp_path / "t5.png", [0, 2])) == (900, 420)
    data = json.loads((tmp_path / "t5.json").read_text())
    assert data[1]["top5"][0] == {"class": "ship", "probability": 0.7} and data[1]["true"] == "car"


@pytest.mark.slow
def test_galleries_pick_successes_and_failures(caption_dir, tmp_path):
    scores = np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.8], [0.1, 0.3, 0.5]])
    correct = np.eye(3, dtype=bool)
    ok, bad = pick_examples(scores, correct, 2)
    assert ok == [0, 2] and bad == [1]  # successes by margin, failures by rank

    ds = load_caption_dataset(str(caption_dir / "captions.csv"), "all")
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(len(ds.image_paths()), 8), dim=-1)
    txt = torch.nn.functional.normalize(img[ds.caption_image] + 0.8 * torch.randn(len(ds.captions), 8), dim=-1)
    path = image_to_text_gallery(ds, img, txt, tmp_path / "i2t.png", n=3)
    data = json.loads(path.with_suffix(".json").read_text())
    assert {d["kind"] for d in data} == {"success", "failure"}
    assert all(len(d["top3"]) == 3 for d in data)
    assert data[0]["kind"] == "success" and data[0]["top3"][0]["correct"] and data[-1]["first_correct_rank"] > 1
    assert png_size(path) == (1100, 180 * len(data) + 50)
    path = text_to_image_gallery(ds, img, txt, tmp_path / "t2i.png", n=3)
    data = json.loads(path.with_suffix(".json").read_text())
    assert png_size(path) == (1000, 200 * len(data) + 50)


@pytest.mark.browser
def test_plots_flags_and_report_in_headless_chromium(caption_dir, labelled_splits, tmp_path, cli):
    runs = {name: tmp_path / name for name in ("train", "eval", "zeroshot", "probe")}
    res = cli("train", caption_dir / "captions.csv", "--run-dir", runs["train"], "--plots", "--track-test",
              "-s", "train.epochs=3", "-s", "train.batch_size=4", "-s", "model.head.embed_dim=32")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("eval", "retrieval", caption_dir / "captions.csv", "--split", "all", "-m", "conse",
              "-m", runs["train"], "--run-dir", runs["eval"], "--plots")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("zeroshot", labelled_splits, "-v", "photo", "-v", "name", "--top5", "3", "--run-dir",
              runs["zeroshot"], "--plots", "--self-train", "train")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("probe", labelled_splits, "--method", "logistic", "--variant", "photo", "--run-dir", runs["probe"],
              "--plots")
    assert res.returncode == 0, res.stdout + res.stderr

    expected = {"train": {"curves", "recall_at_k", "map_tsne", "map_pca", "gallery_i2t", "gallery_t2i"},
                "eval": {"recall_at_k", "map_tsne", "map_pca", "gallery_i2t", "gallery_t2i"},
                "zeroshot": {"confusion_zeroshot", "zeroshot_top5"},
                "probe": {"confusion_probe_logistic", "confusion_zeroshot", "map_classes_tsne"}}
    for name, stems in expected.items():
        plots = runs[name] / rundir.PLOTS
        assert {p.stem for p in plots.glob("*.png")} == stems, name
        for stem in stems:
            assert png_size(plots / f"{stem}.png")[0] >= 500
            assert list(plots.glob(f"{stem}.json")) or list(plots.glob(f"{stem}.csv")), stem
    tsne = json.loads((runs["train"] / rundir.PLOTS / "map_tsne.json").read_text())
    assert set(tsne["panels"]) == {"conse (before)", "trained (after)"}

    report = tmp_path / "report.html"
    res = cli("report", *runs.values(), "--out", report)
    assert res.returncode == 0, res.stdout + res.stderr
    page = report.read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: opens offline
    assert "Self-training: zero-shot (photo, cosine)" in page and "labels never read" in page
    assert page.count("<img ") == sum(len(s) for s in expected.values())

    pdf = tmp_path / "report.pdf"  # the same page printed: its first page shows the comparison's metrics
    res = cli("report", *runs.values(), "--out", tmp_path / "report2.html", "--pdf", pdf)
    assert res.returncode == 0, res.stdout + res.stderr
    import pypdfium2

    from cliplab.viz.report import is_own_pdf

    assert is_own_pdf(pdf)  # marked as cliplab's, so the same command may replace it
    res = cli("report", *runs.values(), "--out", tmp_path / "report2.html", "--pdf", pdf)
    assert res.returncode == 0, res.stdout + res.stderr
    document = pypdfium2.PdfDocument(str(pdf))
    assert len(document) > 1
    first = document[0]
    text = first.get_textpage().get_text_range()
    trained = json.loads((runs["train"] / rundir.RESULTS).read_text())["test"]["trained"]
    assert "cliplab report" in text and "R@1" in text and f"{trained['t2i_r1']:.2f}" in text
    picture = np.asarray(first.render(scale=1).to_pil().convert("L"))
    assert picture.std() > 10  # a rendered page, not a blank one
    document.close()

    from cliplab.viz.report import is_own_png, screenshot_sections

    shots_dir = tmp_path / "shots"  # a PNG per section, marked; the same call replaces its own shots
    shots = screenshot_sections(report, shots_dir)
    assert [p.name for p in shots] == ["report_overview.png"] + [f"report_{n}.png" for n in runs]
    assert all(is_own_png(p) and png_size(p)[0] >= 500 for p in shots)
    assert screenshot_sections(report, shots_dir) == shots

    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser, page = open_page(p, 1400, 900, errors)
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert page.title() == "cliplab report"
        assert page.locator("section#summary").is_visible() and page.locator("section#comparison").is_visible()
        headings = page.locator("section h2").all_inner_texts()
        assert [h.split()[0] for h in headings[2:]] == ["train", "eval", "zeroshot", "probe"]
        broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
        assert broken == 0
        assert page.locator("#comparison table").count() == 2  # retrieval and classification
        rows = page.locator("#comparison table").first.locator("tbody tr").count()
        assert rows == 2 + 2  # train: conse + trained; eval: conse + the trained run
        page.locator("figure").first.click()
        assert "zoom" in page.locator("figure").first.get_attribute("class")
        page.locator("#comparison th").nth(1).click()  # sorting runs without errors
        browser.close()
    assert errors == []
