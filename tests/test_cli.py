"""The CLI end to end on tiny synthetic data: one-line errors, --on-error skip, run directories.

Commands run in-process (the ``cli`` fixture); one test runs the real ``python -m cliplab`` subprocess to
check that a user error exits 2 with one line and no traceback.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cliplab import rundir


def run_subprocess(*args, cwd, cache):
    env = {**os.environ, "CLIPLAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cliplab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture()
def broken_dir(caption_dir, tmp_path):
    """The synthetic pairs plus a corrupt JPEG, a missing image and an empty caption."""
    root = tmp_path / "broken"
    shutil.copytree(caption_dir, root)
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    rows = list(csv.reader(open(root / "captions.csv")))
    rows += [["images/corrupt.jpg", "a broken picture", "train"], ["images/gone.jpg", "an image that is not there", "train"],
             ["images/img03.jpg", "   ", "test"]]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


@pytest.mark.subprocess
def test_bad_inputs_give_one_line_errors(broken_dir, tmp_path, cli):
    cache = tmp_path / "cache"
    data = str(broken_dir / "captions.csv")
    res = run_subprocess("embed", data, "--run-dir", str(tmp_path / "r0"), cwd=tmp_path, cache=cache)
    assert res.returncode == 2
    # header + 40 good rows, then corrupt (line 42), missing (43), empty caption (44): the first found is reported
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stdout + res.stderr
    assert "captions.csv:43: image not found" in lines[0] and "gone.jpg" in lines[0]

    # fix the missing image: now the empty caption is reported
    rows = list(csv.reader(open(broken_dir / "captions.csv")))
    no_missing = broken_dir / "no_missing.csv"
    with open(no_missing, "w", newline="") as f:
        csv.writer(f).writerows([r for r in rows if r[0] != "images/gone.jpg"])
    res = cli("embed", no_missing, cache=cache)
    assert res.returncode == 2 and "no_missing.csv:43: empty caption for image 'images/img03.jpg'" in res.stdout

    # only the corrupt image left
    only_corrupt = broken_dir / "only_corrupt.csv"
    with open(only_corrupt, "w", newline="") as f:
        csv.writer(f).writerows([r for r in rows if r[0] != "images/gone.jpg" and r[1].strip()])
    res = cli("embed", only_corrupt, cache=cache)
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
    assert "corrupt image" in res.stdout and "corrupt.jpg" in res.stdout and "only_corrupt.csv:42" in res.stdout
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("error:")]) == 1


@pytest.mark.slow
def test_skip_completes_and_counts(broken_dir, tmp_path, cli):
    run = tmp_path / "embed-run"
    res = cli("embed", broken_dir / "captions.csv", "--on-error", "skip", "--run-dir", run)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped 3 items" in res.stdout
    summary = json.loads((run / rundir.EMBED).read_text())
    assert summary["skipped"] == 3 and summary["images"] == 16
    assert summary["counts"] == {"corrupt image": 1, "missing image": 1, "empty caption": 1}


@pytest.mark.slow
def test_train_and_eval_commands(caption_dir, tmp_path, cli):
    run = tmp_path / "train-run"
    res = cli("train", caption_dir / "captions.csv", "--run-dir", run, "-s", "train.epochs=3",
              "-s", "train.batch_size=4", "-s", "model.head.embed_dim=32")
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((run / rundir.RESULTS).read_text())
    assert set(results["test"]) == {"conse", "trained"}
    assert results["data"]["test"]["images"] == 4 and results["data"]["train"]["images"] == 8
    assert results["provenance"]["cliplab"]
    assert (run / rundir.RESULTS_MD).read_text().count("|") > 10
    assert json.loads((run / rundir.CONFIG).read_text())["train"]["epochs"] == 3
    assert len((run / rundir.METRICS).read_text().splitlines()) == 3
    assert (run / rundir.BEST / rundir.MODEL_WEIGHTS).is_file() and (run / rundir.CHECKPOINT).is_file()
    assert list((run / rundir.TENSORBOARD).iterdir())
    assert "T→I R@1" in res.stdout

    # eval of the saved run on the test split gives exactly the numbers training reported for it
    ev = tmp_path / "eval-run"
    res = cli("eval", "retrieval", caption_dir / "captions.csv", "--split", "test", "-m", run, "-m", "conse",
              "--run-dir", ev)
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((ev / rundir.EVAL_METRICS).read_text())
    for key in ("t2i_r1", "i2t_r1", "t2i_mrr", "i2t_mean_rank"):
        assert metrics[str(run)][key] == pytest.approx(results["test"]["trained"][key], abs=1e-9), key
        assert metrics["conse"][key] == pytest.approx(results["test"]["conse"][key], abs=1e-9), key

    res = cli("train", tmp_path / "nowhere.csv")
    assert res.returncode == 2 and "dataset not found" in res.stdout

    res = cli("train", "-s", "train.nope=1")
    assert res.returncode == 2 and "unknown key 'nope'" in res.stdout


@pytest.mark.slow
def test_zeroshot_and_probe_commands(labelled_splits, tmp_path, cli):
    zs = tmp_path / "zs"
    res = cli("zeroshot", labelled_splits, "-m", "conse", "-v", "photo", "-v", "negated",
              "-v", "a {} coloured shape", "--rename", "red=crimson", "--top5", "3", "--run-dir", zs)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((zs / rundir.ZEROSHOT).read_text())
    assert len(out["results"]) == 6 and out["n_images"] == 12 and "crimson" in out["class_names"]
    assert out["results"]["a {} coloured shape|cosine"]["example"] == "a blue coloured shape"
    assert len(out["top5"]["images"]) == 3 and "explanation" in out["cosine_vs_dot"]
    assert "macro-F1" in (zs / rundir.RESULTS_MD).read_text()

    pr = tmp_path / "pr"
    res = cli("probe", labelled_splits, "-m", "conse", "--variant", "photo", "--run-dir", pr)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((pr / rundir.PROBE).read_text())
    assert set(out["results"]) == {"probe:logistic", "probe:torch", "zeroshot"}
    assert out["dataset"]["n_train"] == 20 and out["dataset"]["n_test"] == 12 and out["feature_dim"] == 1280
    assert out["protocol"]["split"] == "dataset" and "20 train / 12 test images" in res.stdout
    assert out["results"]["probe:logistic"]["accuracy"] >= 75  # colours are easy for ImageNet features
    res = cli("probe", labelled_splits, "-m", "conse", "--method", "logistic", "--flip-train", "--run-dir",
              tmp_path / "pr2")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((tmp_path / "pr2" / rundir.PROBE).read_text())
    assert out["protocol"]["flip_train"] and "its mirror" in res.stdout
    assert out["results"]["probe:logistic"]["fit"]["hyperparameters"]["train_views"] == 2
    res = cli("probe", labelled_splits, "--flip-train", "--no-flip-tta", "--method", "logistic")
    assert res.returncode == 2 and "--flip-train needs --flip-tta" in res.stdout

    st = tmp_path / "st"
    res = cli("zeroshot", labelled_splits, "-m", "conse", "-v", "photo", "--similarity", "cosine",
              "--self-train", "train", "--run-dir", st)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((st / rundir.ZEROSHOT).read_text())
    assert set(out["results"]) == {"photo|cosine", "self-trained photo|cosine"}
    info = out["self_training"]
    assert info["n_pool"] == 20 and info["pool_split"] == "train" and info["feature_dim"] == 1280
    assert "labels never read" in info["protocol"] and len(info["rounds"]) == 5
    assert out["results"]["self-trained photo|cosine"]["n"] == 12 and "self-trained" in (st / rundir.RESULTS_MD).read_text()
    res = cli("zeroshot", labelled_splits, "--self-train", "test")
    assert res.returncode == 2 and "another split" in res.stdout
    res = cli("zeroshot", labelled_splits, "--self-train", "train", "--self-train-selection", "uniform")
    assert res.returncode == 2 and "selection must be one of balanced, proportional" in res.stdout
    res = cli("zeroshot", labelled_splits, "--self-train", "train", "--self-train-fractions", "0.5,x")
    assert res.returncode == 2 and "comma-separated" in res.stdout

    res = cli("zeroshot", labelled_splits, "--rename", "purple=violet")
    assert res.returncode == 2 and "unknown class(es) purple" in res.stdout
    res = cli("zeroshot", labelled_splits, "--split", "val")
    assert res.returncode == 2 and "no split 'val'" in res.stdout and "test, train" in res.stdout


@pytest.mark.slow
def test_probe_on_a_folder_without_splits_holds_out_a_stratified_test_set(labelled_splits, tmp_path, cli):
    """A class-per-folder tree with no split used to be fitted and scored on the same images."""
    flat = labelled_splits / "train"  # 4 classes x 5 images, no split sub-folders
    pr = tmp_path / "flat"
    res = cli("probe", flat, "-m", "conse", "--method", "logistic", "--variant", "photo", "--test-fraction", "0.4",
              "--run-dir", pr)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((pr / rundir.PROBE).read_text())
    assert out["protocol"]["split"] == "held-out" and out["protocol"]["test_fraction"] == 0.4
    assert out["dataset"]["n_train"] == 12 and out["dataset"]["n_test"] == 8  # 2 of 5 per class held out
    assert out["results"]["zeroshot"]["n"] == 8 and "held-out stratified split" in res.stdout
    assert "held-out stratified split" in (pr / rundir.RESULTS_MD).read_text()
    # the same seed gives the same split; asking for a split the folder does not have is an error
    res = cli("probe", flat, "--train-split", "train", "--method", "logistic")
    assert res.returncode == 2 and "has no splits" in res.stdout
    res = cli("probe", labelled_splits, "--few-shot", "1", "--method", "logistic")
    assert res.returncode == 2 and "--few-shot 1" in res.stdout
    res = cli("probe", labelled_splits, "--method", "svm")
    assert res.returncode == 2 and "--method must be one of logistic, torch" in res.stdout


def _json(obj):
    from cliplab.utils import _json_default

    return json.loads(json.dumps(obj, default=_json_default))


@pytest.mark.slow
def test_run_zeroshot_and_run_probe_from_python_match_the_commands(labelled_splits, tmp_path, cli):
    """The library calls behind ``cliplab zeroshot`` / ``probe``, given loaded datasets instead of a path and
    splits, give the commands' numbers; only the recorded split names differ."""
    from cliplab.data.labelled import load_labelled
    from cliplab.errors import CliplabError
    from cliplab.experiments import ProbeRun, ZeroShotRun, run_probe, run_zeroshot

    cache = tmp_path / "cache"
    train, test = (load_labelled(labelled_splits, split=s) for s in ("train", "test"))
    res = cli("zeroshot", labelled_splits, "-v", "photo", "--similarity", "cosine", "--top5", "3", "--self-train",
              "train", "--self-train-fractions", "0.5,1", "--run-dir", tmp_path / "zs", cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    logged = []
    zs = run_zeroshot(test, "conse", variants=["photo"], similarity="cosine", top5=3, self_train=train,
                      self_train_fractions=(0.5, 1), cache=cache, log=logged.append)
    assert isinstance(zs, ZeroShotRun) and zs.run_dir is None and len(logged) == 2
    assert all(line in res.stdout for line in logged)
    cli_zs, lib_zs = json.loads((tmp_path / "zs" / rundir.ZEROSHOT).read_text()), _json(zs.to_dict())
    assert list(lib_zs) == list(cli_zs) and set(zs.results) == {"photo|cosine", "self-trained photo|cosine"}
    assert cli_zs["self_training"].pop("pool_split") == "train" and lib_zs["self_training"].pop("pool_split") == \
        "shapes/train"
    for rec in (cli_zs, lib_zs):
        del rec["seconds"]
    assert lib_zs == cli_zs

    res = cli("probe", labelled_splits, "--method", "logistic", "--variant", "photo", "--few-shot", "3",
              "--run-dir", tmp_path / "pr", cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    pr = run_probe((train, test), "conse", methods=["logistic"], variant="photo", few_shot=3, cache=cache,
                   run_dir=tmp_path / "pr-lib")
    assert isinstance(pr, ProbeRun) and pr.run_dir == tmp_path / "pr-lib"
    cli_pr = json.loads((tmp_path / "pr" / rundir.PROBE).read_text())
    assert json.loads((tmp_path / "pr-lib" / rundir.PROBE).read_text()) == _json(pr.to_dict())
    assert _json(pr.results) == cli_pr["results"] and pr.dataset == cli_pr["dataset"] and pr.feature_dim == 1280
    assert (pr.protocol["train_split"], cli_pr["protocol"]["train_split"]) == ("shapes/train", "train")
    assert pr.protocol_line().replace("shapes/", "") in res.stdout
    with pytest.raises(CliplabError, match="run_dir|pip install"):  # figures need a folder (and the viz extra)
        run_probe((train, test), "conse", plots=True)


def small_sweep(caption_dir: Path, tmp_path: Path, grid: str) -> Path:
    """A sweep file over the test captions: 2 epochs of tiny heads, the given ``grid:`` lines."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"set:\n  data.path: {caption_dir / 'captions.csv'}\n  train.epochs: 2\n  train.batch_size: 4\n"
                     f"  model.head.embed_dim: 16\n  baseline: false\ngrid:\n{grid}")
    return sweep


@pytest.mark.slow
def test_sweep_runs_grid_and_writes_tables(caption_dir, tmp_path, cli):
    sweep = small_sweep(caption_dir, tmp_path, "  train.lr: [1.0e-3, 1.0e-4]\n  train.trainable: [heads, text_head]\n")
    out = tmp_path / "sweep"
    res = cli("sweep", sweep, "--out-dir", out, "--plots")
    assert res.returncode == 0, res.stdout + res.stderr
    overlays = sorted(p.name for p in (out / rundir.PLOTS).glob("overlay_*.png"))
    assert overlays == ["overlay_dev_t2i_r1.png", "overlay_test_i2t_r1.png", "overlay_test_t2i_r1.png"]
    assert all((out / rundir.PLOTS / name).stat().st_size > 2000 for name in overlays)
    rows = list(csv.DictReader(open(out / rundir.SWEEP_RESULTS)))
    assert len(rows) == 4 and {r["train.trainable"] for r in rows} == {"heads", "text_head"}
    selected = json.loads((out / rundir.SWEEP_SELECTED).read_text())
    assert selected["run"] == max(rows, key=lambda r: float(r["dev_rsum"]))["run"]
    curves = list(csv.DictReader(open(out / rundir.CURVES)))
    assert len(curves) == 8 and all(c["test_t2i_r1"] != "" for c in curves)
    assert "best_epoch" in (out / rundir.RESULTS_MD).read_text()
    # a second start skips finished runs
    first = (out / rows[0]["run"] / rundir.RESULTS).stat().st_mtime_ns
    res = cli("sweep", sweep, "--out-dir", out)
    assert res.returncode == 0 and (out / rows[0]["run"] / rundir.RESULTS).stat().st_mtime_ns == first
    # a run folder left by another config is refused, naming the change; --fresh starts it over
    sweep.write_text(sweep.read_text().replace("train.epochs: 2", "train.epochs: 3"))
    res = cli("sweep", sweep, "--out-dir", out)
    assert res.returncode == 2 and "train.epochs: 2 -> 3" in res.stdout
    res = cli("sweep", sweep, "--out-dir", out, "--fresh")
    assert res.returncode == 0, res.stdout
    assert len((out / rows[0]["run"] / rundir.METRICS).read_text().splitlines()) == 3


@pytest.mark.slow
def test_sweep_test_selected_evaluates_test_once_for_the_dev_choice(caption_dir, tmp_path, cli):
    sweep = small_sweep(caption_dir, tmp_path, "  train.lr: [1.0e-2, 1.0e-5]\n")
    out = tmp_path / "sweep"
    res = cli("sweep", sweep, "--out-dir", out, "--test", "selected")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = list(csv.DictReader(open(out / rundir.SWEEP_RESULTS)))
    selected = json.loads((out / rundir.SWEEP_SELECTED).read_text())
    assert selected["run"] == max(rows, key=lambda r: float(r["dev_rsum"]))["run"]
    assert "for this run only, once" in selected["protocol"]
    own = json.loads((out / selected["run"] / rundir.RESULTS).read_text())["test"]
    assert selected["test"]["t2i_r1"] == own["trained"]["t2i_r1"] and 0 <= selected["test"]["t2i_r1"] <= 100
    for r in rows:  # only the dev choice has test numbers, in the tables and in its own results
        has_test = r["test_t2i_r1"] != ""
        assert has_test == (r["run"] == selected["run"])
        assert bool(json.loads((out / r["run"] / rundir.RESULTS).read_text())["test"]) == has_test
    assert all(c["test_t2i_r1"] == "" for c in csv.DictReader(open(out / rundir.CURVES)))  # never tracked
    assert "test_t2i_r1" in res.stdout  # the console table names the selected run's test columns


def test_sweep_vary_is_one_factor_at_a_time(tmp_path):
    from cliplab.errors import ConfigError
    from cliplab.train.config import RunConfig
    from cliplab.train.sweep import load_sweep, sweep_settings

    (tmp_path / "s.yaml").write_text("set: {train.lr: 1.0e-4}\nvary:\n  train.lr: [1.0e-4, 1.0e-5]\n"
                                     "  train.loss: [triplet]\n")
    base, grid, fixed, kind = load_sweep(tmp_path / "s.yaml")
    runs = sweep_settings(base.with_overrides(fixed), grid, kind)
    assert kind == "vary" and runs == [{"train.lr": 1e-4, "train.loss": "infonce"},
                                       {"train.lr": 1e-5, "train.loss": "infonce"},
                                       {"train.lr": 1e-4, "train.loss": "triplet"}]
    (tmp_path / "bad.yaml").write_text("grid: {train.lr: [1]}\nvary: {train.lr: [2]}\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_sweep(tmp_path / "bad.yaml")
    assert base.to_dict() == RunConfig().to_dict()  # no 'base:' in the file: the defaults


def test_overrides_read_exponent_floats_without_a_dot():
    from cliplab.errors import ConfigError
    from cliplab.train.config import RunConfig

    cfg = RunConfig().with_overrides(["train.lr=1e-05", "train.tower_lr=2e-4", "train.grad_clip=1"])
    assert cfg.train.lr == 1e-5 and cfg.train.tower_lr == 2e-4 and isinstance(cfg.train.grad_clip, float)
    with pytest.raises(ConfigError, match="expected a number"):
        RunConfig().with_overrides(["train.lr=fast"])
