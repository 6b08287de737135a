"""cliplab writes runs only into folders it made and replaces only files it wrote (by their marks); two runs
never write one folder at once."""

from __future__ import annotations

import csv
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from cliplab import rundir
from cliplab.errors import ConfigError, DataError


def test_a_new_or_empty_folder_is_claimed_with_the_marker(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut").mkdir()  # a marker write killed before its rename leaves cliplab's temp file only
    (tmp_path / "cut" / f".{rundir.RUN_MARKER}.cliplab-0123456789abcdef.tmp").write_text("{")
    for d, state in ((tmp_path / "new" / "run", "missing"), (tmp_path / "empty", "empty"), (tmp_path / "cut", "empty")):
        assert rundir.run_folder_state(d) == state
        assert rundir.claim_run_folder(d, "eval") == d
        assert json.loads((d / rundir.RUN_MARKER).read_text())["format"] == "cliplab-run"
        assert rundir.run_folder_state(d) == "run"
        rundir.claim_run_folder(d, "eval")  # claiming again keeps it


def test_a_folder_of_the_users_is_refused_and_left_untouched(tmp_path):
    home = tmp_path / "project"
    home.mkdir()
    (home / "config.json").write_text('{"my": "settings"}')  # a user's own config.json: never replaced
    (home / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    with pytest.raises(DataError, match=r"--run-dir .*project is not empty and is not a cliplab run folder"):
        rundir.claim_run_folder(home, "train")
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        rundir.claim_run_folder(a_file, "sweep", "--out-dir")
    link = tmp_path / "link"
    link.symlink_to(home)
    assert rundir.run_folder_state(link) == "foreign"


@pytest.mark.parametrize("name, content", [("metrics.json", '{"loss": 1}'), ("results.csv", "epoch,loss\n"),
                                           ("last.pt", "x"), ("metrics.jsonl", "{}\n"), ("results.json", "{}"),
                                           ("config.json", '{"model": "yolo"}'), ("sweep.json", '{"runs": 1}'),
                                           ("config.json", '{"model": {"depth": 50}, "data": {}, "train": {}}')])
def test_files_of_the_same_name_from_other_tools_are_not_taken_for_a_run(tmp_path, name, content):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / name).write_text(content)  # e.g. detectron2's metrics.json, ultralytics' results.csv
    assert rundir.run_folder_state(tmp_path / "theirs") == "foreign"
    with pytest.raises(DataError):
        rundir.claim_run_folder(tmp_path / "theirs", "eval")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == [name]


TRAINING = {"model": {"image": {}, "text": {}}, "data": {}, "train": {}}


@pytest.mark.parametrize("name, content", [
    (rundir.CONFIG, json.dumps(TRAINING)),  # a training run, also one cut short
    (rundir.CONFIG, '{"x": 1, "provenance": {"cliplab": "0"}}'),  # eval, zeroshot, probe, embed, caption runs
    (rundir.SWEEP, json.dumps({"base": TRAINING, "grid": {}, "runs": []})),
    (rundir.WISE, '{"rows": [], "provenance": {}}'),
    (rundir.ENSEMBLE, '{"members": [], "weights": [], "provenance": {}}'),
    (rundir.SEARCH_QUALITY, '{"index": "i", "mode": "hybrid", "metrics": {}, "cutoff": {}, "queries": []}')])
def test_run_folders_from_before_the_marker_are_still_cliplabs(tmp_path, name, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_text(content)
    (tmp_path / "run" / rundir.RESULTS_MD).write_text("| table |")
    assert rundir.run_folder_state(tmp_path / "run") == "legacy"
    kind = {rundir.SWEEP: "sweep", rundir.WISE: "wise", rundir.ENSEMBLE: "ensemble",
            rundir.SEARCH_QUALITY: "search"}.get(name, "train")
    rundir.claim_run_folder(tmp_path / "run", kind)
    assert rundir.run_folder_state(tmp_path / "run") == "run"


def test_a_run_of_one_kind_is_never_written_over_by_another(tmp_path, caption_dir, cli):
    train = rundir.claim_run_folder(tmp_path / "train", "train")
    (train / rundir.CONFIG).write_text('{"model": {"image": {}, "text": {}}, "data": {}, "train": {}}')
    before = (train / rundir.CONFIG).read_bytes()
    res = cli("eval", "retrieval", caption_dir / "captions.csv", "-m", "conse", "--run-dir", train)
    assert res.returncode == 2 and "holds a cliplab train run" in res.stdout and "writes eval runs" in res.stdout
    assert (train / rundir.CONFIG).read_bytes() == before
    older = tmp_path / "older"  # a finished training run from before the marker: its records say train
    older.mkdir()
    for name in (rundir.CONFIG, rundir.RESULTS):
        (older / name).write_bytes(before)
    (older / rundir.METRICS).write_text("{}\n")
    with pytest.raises(DataError, match="holds a cliplab train run"):
        rundir.claim_run_folder(older, "zeroshot")
    rundir.claim_run_folder(older, "train")  # the same kind goes on (a resumed or repeated run)
    assert json.loads((older / rundir.RUN_MARKER).read_text())["kind"] == "train"
    res = cli("eval", "retrieval", caption_dir / "captions.csv", "-m", "conse", "--split", "all", "--run-dir",
              tmp_path / "eval")
    assert res.returncode == 0, res.stdout
    res = cli("eval", "retrieval", caption_dir / "captions.csv", "-m", "conse", "--split", "all", "--run-dir",
              tmp_path / "eval")  # the same command again replaces its own record
    assert res.returncode == 0, res.stdout
    assert json.loads((tmp_path / "eval" / rundir.RUN_MARKER).read_text())["kind"] == "eval"


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    rundir.claim_run_folder(tmp_path / "run", "train")
    with rundir.run_lock(tmp_path / "run", "cliplab train"):
        outcome = []

        def second():
            try:
                with rundir.run_lock(tmp_path / "run", "cliplab train"):
                    outcome.append("ran")
            except DataError as exc:
                outcome.append(str(exc))

        t = threading.Thread(target=second)
        t.start()
        t.join()
        assert "is being written by another cliplab process" in outcome[0] and "`cliplab train`" in outcome[0]
    with rundir.run_lock(tmp_path / "run", "cliplab train"):  # released: the next run goes ahead
        pass
    assert rundir.run_folder_state(tmp_path / "run") == "run"  # the lock file alone is no user content


def test_train_eval_and_sweep_refuse_a_users_folder_before_any_work(tmp_path, caption_dir, cli):
    home = tmp_path / "home"
    home.mkdir()
    (home / "results.md").write_text("my results")
    for args in (("train", caption_dir / "captions.csv", "--run-dir", home),
                 ("eval", "retrieval", caption_dir / "captions.csv", "-m", "conse", "--run-dir", home),
                 ("sweep", "sweep_flickr8k_heads", "--out-dir", home)):
        res = cli(*args)
        assert res.returncode != 0
        assert "is not a cliplab run folder" in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in home.iterdir()) == ["results.md"]
    assert (home / "results.md").read_text() == "my results"
    cache = tmp_path / "cache"  # the cli fixture's $CLIPLAB_CACHE: refused before any feature was computed
    assert not cache.exists() or not any(cache.iterdir())


def test_training_runs_and_sweeps_hold_their_folders_lock(tmp_path):
    from cliplab.caption.train import CaptionRunConfig, train_captioner
    from cliplab.train.config import RunConfig
    from cliplab.train.run import train_run
    from cliplab.train.sweep import run_sweep

    runs = {"train": lambda d: train_run(RunConfig(), d), "caption": lambda d: train_captioner(CaptionRunConfig(), d),
            "sweep": lambda d: run_sweep("sweep_flickr8k_heads", d)}
    for name, call in runs.items():
        d = rundir.claim_run_folder(tmp_path / name, {"caption": "caption", "sweep": "sweep"}.get(name, "train"))
        with rundir.run_lock(d, "another run"):  # as if a second process were writing the folder
            with pytest.raises(DataError, match="is being written by another"):
                call(d)


def test_the_library_calls_refuse_it_too(tmp_path, caption_dir):
    from cliplab.caption.train import CaptionRunConfig, train_captioner
    from cliplab.experiments import run_embed, run_retrieval
    from cliplab.train.config import RunConfig
    from cliplab.train.run import train_run

    home = tmp_path / "home"
    home.mkdir()
    (home / "data.csv").write_text("a,b\n")
    calls = [lambda: train_run(RunConfig(), home),
             lambda: train_captioner(CaptionRunConfig(), home),
             lambda: run_retrieval(caption_dir / "captions.csv", ["conse"], run_dir=home),
             lambda: run_embed(caption_dir / "captions.csv", None, None, run_dir=home)]
    for call in calls:
        with pytest.raises(DataError, match="not a cliplab run folder"):
            call()
    assert [p.name for p in home.iterdir()] == ["data.csv"]


def test_report_files_are_replaced_only_when_cliplab_wrote_them(tmp_path):
    from cliplab.viz.report import (HTML_MARK, check_report_outputs, is_own_pdf, is_own_png, is_own_report,
                                    mark_pdf, write_marked_png)

    page = tmp_path / "report.html"
    page.write_text("<html><body>my own page</body></html>")
    with pytest.raises(DataError, match=r"--out .*report.html exists and is not a file cliplab wrote"):
        check_report_outputs(page)
    page.write_text(f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{HTML_MARK}<title>t</title>')
    assert is_own_report(page)
    check_report_outputs(page)
    old = tmp_path / "old.html"  # a report from before the mark
    old.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>t</title><style></style>'
                   '</head><body><header></header><main><section id="summary"><h2>Runs</h2></section>')
    assert is_own_report(old)

    pypdfium2 = pytest.importorskip("pypdfium2")
    doc = pypdfium2.PdfDocument.new()
    doc.new_page(200, 100)
    buf = io.BytesIO()
    doc.save(buf)
    plain = tmp_path / "plain.pdf"
    plain.write_bytes(buf.getvalue())
    assert not is_own_pdf(plain)
    with pytest.raises(DataError, match="--pdf"):
        check_report_outputs(page, pdf=plain)
    marked = tmp_path / "marked.pdf"
    data = mark_pdf(buf.getvalue())
    marked.write_bytes(data)
    assert is_own_pdf(marked) and len(data) == len(buf.getvalue()) + len(b"%cliplab-report\n")
    xref_at = int(data[data.rindex(b"startxref") + len(b"startxref"):].split()[0])  # offsets unmoved
    assert data[xref_at:xref_at + 4] == b"xref" and xref_at == int(buf.getvalue().split(b"startxref")[-1].split()[0])
    reopened = pypdfium2.PdfDocument(str(marked))  # still a valid PDF: the mark is a comment
    assert len(reopened) == 1 and reopened[0].get_size() == (200, 100)
    reopened.close()

    png = io.BytesIO()
    Image.new("RGB", (8, 4), "red").save(png, format="PNG")
    mine = write_marked_png(tmp_path / "shot.png", png.getvalue())
    assert is_own_png(mine)
    with Image.open(mine) as im:
        assert im.size == (8, 4) and im.getpixel((0, 0)) == (255, 0, 0)
    theirs = tmp_path / "theirs.png"
    theirs.write_bytes(png.getvalue())
    assert not is_own_png(theirs) and not is_own_png(page)
    shots = tmp_path / "shots"  # every screenshot name is checked before the page is built
    shots.mkdir()
    (shots / "report_my-run.png").write_bytes(png.getvalue())
    check_report_outputs(page, screenshots=shots, run_dirs=["runs/other"])
    with pytest.raises(DataError, match="--screenshots .*report_my-run.png exists"):
        check_report_outputs(page, screenshots=shots, run_dirs=["runs/other", "runs/my run"])
    with pytest.raises(ConfigError, match="two sections would share report_best.png"):
        check_report_outputs(page, screenshots=shots, run_dirs=["a/best", "b/best"])


def test_a_caption_bundle_never_replaces_a_users_file(tmp_path):
    from cliplab.caption.train import BUNDLE_FORMAT, CaptionRunConfig, export_bundle, is_own_bundle

    theirs = tmp_path / "features.npz"
    np.savez(theirs, x=np.zeros(3))
    with pytest.raises(DataError, match="--out .*features.npz exists and is not a file cliplab wrote"):
        export_bundle(CaptionRunConfig(), theirs)
    assert np.load(theirs)["x"].shape == (3,)
    ours = tmp_path / "ours.npz"
    np.savez(ours, meta=np.asarray(json.dumps({"format": BUNDLE_FORMAT, "grid": 7})))
    older = tmp_path / "older.npz"
    np.savez(older, meta=np.asarray(json.dumps({"grid": 7, "image_tower": "abc"})))
    assert is_own_bundle(ours) and is_own_bundle(older) and not is_own_bundle(theirs)
    (tmp_path / "text.npz").write_text("not a zip")
    assert not is_own_bundle(tmp_path / "text.npz")


def test_the_feature_cache_has_no_call_that_empties_its_folder():
    from cliplab.embed.cache import FeatureCache

    assert not hasattr(FeatureCache, "clear")  # it removed the whole --cache-dir folder, whatever it held


def test_a_caption_subset_csv_never_replaces_a_users_csv(tmp_path, caption_dir):
    import cliplab

    theirs = tmp_path / "small.csv"
    theirs.write_text("image,caption,split\nmine.jpg,my caption,train\n")
    with pytest.raises(DataError, match="out .*small.csv exists and is not a file cliplab wrote"):
        cliplab.datasets.caption_subset(caption_dir / "captions.csv", theirs, train=2, dev=1, test=1)
    assert "mine.jpg" in theirs.read_text()
    ours = tmp_path / "ours.csv"
    cliplab.datasets.caption_subset(caption_dir / "captions.csv", ours, train=2, dev=1, test=1)
    ds = cliplab.datasets.captions(ours, "train")
    assert ds.num_images == 2 and ours.read_text().splitlines()[0] == "image,caption,split,cliplab_subset_of"
    cliplab.datasets.caption_subset(caption_dir / "captions.csv", ours, train=3, dev=1, test=1)  # its own: replaced
    assert cliplab.datasets.captions(ours, "train").num_images == 3
    from cliplab.data.captions import write_caption_csv

    splits = {name: cliplab.datasets.captions(caption_dir / "captions.csv", name) for name in ("train", "test")}
    for source in ("/data/caps.csv", "/data/my,caps.csv", '/data/a"b.csv'):  # the last two are quoted
        new = write_caption_csv(tmp_path / "new.csv", splits, source=source)
        unmarked = io.StringIO()  # as written before the mark: the same rows without the column
        with open(new, newline="", encoding="utf-8") as f:
            csv.writer(unmarked).writerows(row[:-1] for row in csv.reader(f))
        older = tmp_path / "older.csv"
        older.write_bytes(unmarked.getvalue().replace("train", "tra1n").encode())  # other rows: a user's file
        with pytest.raises(DataError):
            write_caption_csv(older, splits, source=source)
        older.write_bytes(unmarked.getvalue().encode())
        write_caption_csv(older, splits, source=source)
        assert older.read_bytes() == new.read_bytes()
        new.unlink()
