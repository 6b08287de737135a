"""The notebook API (``import cliplab``) gives the CLI's numbers on the same tiny data."""

from __future__ import annotations

import json

import pytest
from cliplab import rundir


def _no_seconds(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def test_top_level_verbs_are_callable_and_packages_stay_importable():
    import cliplab
    import cliplab.caption.train as caption_train_module
    import cliplab.train.config  # noqa: F401  (the package attribute must stay the callable package)

    assert callable(cliplab.train) and callable(cliplab.caption.train)
    assert cliplab.train.RunConfig is cliplab.train.config.RunConfig  # still the package
    assert caption_train_module.train_captioner is cliplab.caption.train_captioner
    for name in ("load_model", "zeroshot", "probe", "evaluate", "sweep", "report", "Index", "datasets"):
        assert getattr(cliplab, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cliplab.nope


@pytest.mark.slow
def test_zeroshot_and_probe_match_the_commands(labelled_splits, tmp_path, cli):
    import cliplab

    cache = tmp_path / "cache"
    res = cli("eval", "zeroshot", labelled_splits, "-v", "photo", "--similarity", "both", "--run-dir",
              tmp_path / "zs", cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    model = cliplab.load_model("conse")
    zs = cliplab.zeroshot(model, labelled_splits, prompts=["photo"], similarity="both", cache=cache)
    cli_zs = json.loads((tmp_path / "zs" / rundir.ZEROSHOT).read_text())
    assert json.loads(json.dumps(zs.results)) == cli_zs["results"]
    assert set(zs.results) == {"photo|cosine", "photo|dot"}
    assert "<table" in zs._repr_html_() and len(zs.table()) == 2
    from matplotlib.figure import Figure

    assert isinstance(zs.confusion(), Figure) and isinstance(zs.top5(), Figure)
    assert zs.confusion().axes[0].get_title().startswith(f"zero-shot, {zs.best_variant()}")

    res = cli("eval", "probe", labelled_splits, "--method", "logistic", "--variant", "photo", "--run-dir",
              tmp_path / "pr", cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    pr = cliplab.probe(model, labelled_splits, methods=["logistic"], variant="photo", cache=cache)
    cli_pr = json.loads((tmp_path / "pr" / rundir.PROBE).read_text())
    assert json.loads(json.dumps(pr.results)) == cli_pr["results"]
    assert pr.results["probe:logistic"]["accuracy"] == cli_pr["results"]["probe:logistic"]["accuracy"]


@pytest.mark.slow
def test_train_and_evaluate_match_the_commands(caption_dir, tmp_path, cli):
    import cliplab

    data, cache = caption_dir / "captions.csv", tmp_path / "cache"
    sets = {"train.epochs": 2, "train.batch_size": 4, "model.head.embed_dim": 16, "data.cache_dir": cache}
    res = cli("train", data, "--run-dir", tmp_path / "cli-run", *[a for k, v in sets.items() for a in ("-s", f"{k}={v}")],
              cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    run = cliplab.train(overrides=sets, data=str(data), run_dir=tmp_path / "api-run", log=lambda m: None)
    cli_results = json.loads((tmp_path / "cli-run" / rundir.RESULTS).read_text())
    assert json.loads(json.dumps(run.results["test"])) == cli_results["test"]
    assert run.best_epoch == cli_results["fit"]["best_epoch"]
    assert len(run.epochs().rows) == 2 and "dev_rsum" in run.epochs().rows[0]

    res = cli("eval", "retrieval", data, "-m", tmp_path / "cli-run", "--run-dir", tmp_path / "ev", cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    ev = cliplab.evaluate(str(tmp_path / "api-run"), str(data), cache=cache)
    cli_metrics = json.loads((tmp_path / "ev" / rundir.EVAL_METRICS).read_text())
    assert ev.results[str(tmp_path / "api-run")] == cli_metrics[str(tmp_path / "cli-run")]
    assert ev.results[str(tmp_path / "api-run")]["t2i_r1"] == cli_results["test"]["trained"]["t2i_r1"]
    from matplotlib.figure import Figure

    for figure in (ev.recall_at_k(), ev.map("pca"), ev.gallery("t2i"), ev.gallery("i2t")):
        assert isinstance(figure, Figure) and figure.axes
    lines = ev.recall_at_k(max_k=3).axes[0].get_lines()
    assert lines[0].get_ydata()[0] == pytest.approx(cli_metrics[str(tmp_path / "cli-run")]["t2i_r1"])


def test_dataset_subsets_for_quick_notebooks(caption_dir, labelled_splits, tmp_path):
    import cliplab

    out = cliplab.datasets.caption_subset(caption_dir / "captions.csv", tmp_path / "small.csv", train=3, test=2)
    full = {s: cliplab.datasets.captions(caption_dir / "captions.csv", s) for s in ("train", "dev", "test")}
    small = {s: cliplab.datasets.captions(out, s) for s in ("train", "dev", "test")}
    assert (small["train"].num_images, small["dev"].num_images, small["test"].num_images) == (3, 4, 2)
    for s in small:  # the first images with every caption of theirs, nothing else
        n = small[s].num_images
        assert [p.name for p in small[s].image_paths()] == [p.name for p in full[s].image_paths()[:n]]
        assert small[s].captions == [c for c, i in zip(full[s].captions, full[s].caption_image) if i < n]
    labelled = cliplab.datasets.labelled(labelled_splits, "train")
    sample = labelled.subset(len(labelled.class_names) * 2, seed=1)
    assert len(sample) == 2 * len(labelled.class_names)
    assert sorted(set(sample.labels.tolist())) == list(range(len(labelled.class_names)))
    assert labelled.subset(len(labelled.class_names) * 2, seed=1).images.paths == sample.images.paths
    from cliplab.errors import DataError

    with pytest.raises(DataError, match="at least one image"):
        small["train"].subset(0)
