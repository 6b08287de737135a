"""WiSE-FT weight interpolation: the mix is exact at both ends and linear between, over heads and tuned tower
tensors; `cliplab interpolate` evaluates in and out of domain and its run shows in the report."""

import json

import pytest
import torch

from cliplab.errors import ConfigError
from cliplab.train.config import RunConfig
from cliplab.train.run import train_run


@pytest.fixture(scope="module")
def pair(caption_dir, tmp_path_factory):
    """An initial two-tower (heads on frozen towers) and a model fine-tuned from it (last block + heads)."""
    tmp = tmp_path_factory.mktemp("wise")
    common = {"model": {"head": {"kind": "linear", "embed_dim": 16}},
              "data": {"path": str(caption_dir / "captions.csv"), "cache_dir": str(tmp / "cache")}, "baseline": False}
    initial = RunConfig.from_dict({**common, "train": {"epochs": 2, "batch_size": 4, "device": "cpu"}})
    train_run(initial, tmp / "initial", progress=False, log=lambda *a: None)
    tuned = RunConfig.from_dict({**common, "train": {"epochs": 2, "batch_size": 4, "device": "cpu", "lr": 1e-2,
                                                      "init_from": str(tmp / "initial"),
                                                      "image_tower": {"mode": "last_n", "last_n": 1}}})
    train_run(tuned, tmp / "tuned", progress=False, log=lambda *a: None)
    return tmp


@pytest.mark.slow
def test_interpolation_is_exact_at_the_ends_and_linear_between(pair):
    from cliplab.models.factory import load_model
    from cliplab.studies.wise import interpolate_state, mixed_keys, model_at

    a, b = load_model(str(pair / "initial")), load_model(str(pair / "tuned"))
    keys = mixed_keys(a, b)
    assert any(k.startswith("image_tower.model.conv_head") for k in keys) and "image_head.proj.weight" in keys
    sa, sb = a.state_dict(), b.state_dict()
    for alpha in (0.0, 0.3, 1.0):
        mixed = interpolate_state(a, b, alpha)
        for k in keys:
            assert torch.allclose(mixed[k], (1 - alpha) * sa[k].float() + alpha * sb[k].float(), atol=1e-6), k
    m0, m1 = model_at(a, b, 0.0), model_at(a, b, 1.0)
    assert all(torch.equal(m0.state_dict()[k], sa[k]) for k in keys)
    assert all(torch.equal(m1.state_dict()[k], sb[k]) for k in keys)
    # the tower fingerprint follows the mix, so feature caches never mix alphas
    assert m0.image_tower.fingerprint() != m1.image_tower.fingerprint() != model_at(a, b, 0.5).image_tower.fingerprint()


@pytest.mark.slow
def test_interpolate_command_in_and_out_of_domain(pair, caption_dir, labelled_splits, tmp_path, cli):
    out = tmp_path / "wise"
    res = cli("interpolate", pair / "initial", pair / "tuned", "--alpha", "0,0.5,1", "--data", caption_dir / "captions.csv",
              "--classify", labelled_splits, "--captions2", caption_dir / "captions.csv", "--run-dir", out, "--plots",
              cache=pair / "cache")
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((out / "wise.json").read_text())
    assert [r["alpha"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert set(result["rows"][0]) == {"alpha", "in_t2i_r1", "in_i2t_r1", "in_rsum", "ood_t2i_r1", "ood_i2t_r1",
                                      "ood_rsum", "ood_zeroshot_acc"}
    # the ends reproduce the two models' own test numbers
    initial = json.loads((pair / "initial" / "results.json").read_text())["test"]["trained"]
    tuned = json.loads((pair / "tuned" / "results.json").read_text())["test"]["trained"]
    assert result["rows"][0]["in_rsum"] == pytest.approx(initial["rsum"], abs=1e-6)
    assert result["rows"][-1]["in_rsum"] == pytest.approx(tuned["rsum"], abs=1e-6)
    assert (out / "plots" / "wise_tradeoff.png").is_file() and "WiSE-FT" in (out / "results.md").read_text()
    report = tmp_path / "report.html"
    assert cli("report", out, "--out", report).returncode == 0 and "WiSE-FT" in report.read_text()
    res = cli("interpolate", "conse", pair / "tuned", "--alpha", "0,1", "--data", caption_dir / "captions.csv",
              "--run-dir", tmp_path / "bad", cache=pair / "cache")
    assert res.returncode == 2 and "cannot interpolate a ConSE" in res.stdout
    res = cli("interpolate", pair / "initial", pair / "tuned", "--alpha", "0,2", "--run-dir", tmp_path / "bad2")
    assert res.returncode == 2 and "alphas must be numbers in [0, 1]" in res.stdout


@pytest.mark.slow
def test_score_ensemble_is_the_weighted_sum_of_member_similarities(pair):
    """Brute force: ensemble image . text == sum_i w_i cos_i, for tower-sharing and general members."""
    from cliplab.models.base import TowerModel
    from cliplab.models.ensemble import ScoreEnsemble, TowerScoreEnsemble
    from cliplab.models.factory import load_model

    torch.manual_seed(0)
    images = torch.randn(3, 3, 224, 224)
    texts = ["a red circle", "a blue square on grey", "something green"]

    def cos(m):
        with torch.inference_mode():
            return (torch.nn.functional.normalize(m.encode_image(images), dim=-1)
                    @ torch.nn.functional.normalize(m.encode_text(texts), dim=-1).T)

    conse, initial, tuned = load_model("conse"), load_model(str(pair / "initial")), load_model(str(pair / "tuned"))
    shared = load_model(f"ensemble:0.25*conse+0.75*{pair / 'initial'}")
    assert isinstance(shared, TowerScoreEnsemble) and isinstance(shared, TowerModel)
    general = load_model(f"ensemble:2*{pair / 'initial'}+6*{pair / 'tuned'}")  # tuned tower: not shared
    assert type(general) is ScoreEnsemble and not isinstance(general, TowerModel)
    assert general.weights == (0.25, 0.75)
    for ens, (a, b), w in ((shared, (conse, initial), 0.25), (general, (initial, tuned), 0.25)):
        with torch.inference_mode():
            img, txt = ens.encode_image(images), ens.encode_text(texts)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(img @ txt.T, w * cos(a) + (1 - w) * cos(b), atol=1e-5)
    with torch.inference_mode():  # cached-feature path == image path
        assert torch.allclose(shared.project_image(shared.image_tower(images)), shared.encode_image(images), atol=1e-5)


def test_ensemble_specs_and_members_are_checked():
    import copy

    from cliplab.errors import ConfigError
    from cliplab.models.ensemble import ScoreEnsemble
    from cliplab.models.factory import load_model

    for spec, message in (("ensemble:0.5*conse+conse", "a weight for every model or for none"),
                          ("ensemble:-1*conse+1*conse", "weights must be finite, >= 0"),
                          ("ensemble:conse", "at least two models"),
                          ("ensemble:x*conse+conse", "'x' is not a weight"),
                          ("ensemble:conse++conse", "empty model name")):
        with pytest.raises(ConfigError, match=message):
            load_model(spec)
    conse = load_model("conse")
    other = copy.deepcopy(conse)
    other.image_tower.image_size = 200
    assert ScoreEnsemble([conse, conse], [1, 1]).shared_input
    mixed = ScoreEnsemble([conse, other], [1, 1])  # allowed: datasets are embedded member by member
    with pytest.raises(ConfigError, match="preprocess images differently"):
        mixed.preprocess()


@pytest.mark.slow
def test_interpolate_outputs_space_combines_conse_and_heads(pair, caption_dir, labelled_splits, tmp_path, cli):
    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.pipeline import encode_dataset
    from cliplab.eval.retrieval import retrieval_metrics
    from cliplab.models.factory import load_model

    out = tmp_path / "ens"
    res = cli("interpolate", "conse", pair / "initial", "--space", "outputs", "--alpha", "0,1", "--data",
              caption_dir / "captions.csv", "--classify", labelled_splits, "--run-dir", out, cache=pair / "cache")
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((out / "wise.json").read_text())
    assert result["space"] == "outputs" and result["mixed_tensors"] == 0
    initial = json.loads((pair / "initial" / "results.json").read_text())["test"]["trained"]
    img, txt, used = encode_dataset(load_model("conse"), load_caption_dataset(caption_dir / "captions.csv", "test"),
                                    progress=False)
    conse = retrieval_metrics(img, txt, used.caption_image).metrics
    assert result["rows"][0]["in_rsum"] == pytest.approx(conse["rsum"], abs=1e-6)
    assert result["rows"][-1]["in_rsum"] == pytest.approx(initial["rsum"], abs=1e-6)
    assert "Output ensemble" in (out / "results.md").read_text()
    res = cli("interpolate", "conse", pair / "initial", "--space", "both", "--run-dir", tmp_path / "bad")
    assert res.returncode == 2 and "--space must be one of weights, outputs" in res.stdout


def test_search_weights_reaches_a_grid_optimum_no_single_change_improves():
    """Brute force over the grid: the greedy search ends where no one weight change helps, beats every single
    member and scores each distinct weighting once (a local search: not always the grid's global optimum)."""
    import itertools

    from cliplab.studies.ensemble import search_weights

    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    target = torch.tensor([0.5, 0.2, 0.3])
    calls = []

    def score(w):
        calls.append(w)
        return -float(((torch.tensor(w) - target) ** 2).sum())

    found = search_weights(score, 3, grid)
    assert abs(sum(found.weights) - 1) < 1e-9 and len(calls) == len(set(calls)) == found.evaluated
    assert found.score == pytest.approx(score(found.weights))
    for i in range(3):
        assert found.score >= score(tuple(float(j == i) for j in range(3)))
        for g in grid:
            w = list(found.raw)
            w[i] = g
            if sum(w) > 0:
                assert score(tuple(x / sum(w) for x in w)) <= found.score + 1e-9
    every = [score(tuple(x / sum(w) for x in w)) for w in itertools.product(grid, repeat=3) if sum(w) > 0]
    assert found.score >= sorted(every)[len(every) * 9 // 10]  # a local optimum, and among the best tenth here
    # minimising walks to the other end; a member that never helps keeps weight 0
    low = search_weights(lambda w: float(w[0]) + 0.5 * float(w[1]), 3, grid, maximize=False)
    assert low.weights == (0.0, 0.0, 1.0)
    with pytest.raises(ConfigError, match="non-negative"):
        search_weights(score, 3, (-1.0, 1.0))


@pytest.mark.slow
def test_ensemble_of_models_with_different_inputs_embeds_member_by_member(pair, caption_dir):
    """Members at 224 and 200 px: datasets are embedded per member (brute force: ensemble dot product = weighted sum
    of each member's own cosines); one shared image batch or preprocess() is refused with one line."""
    import copy

    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.pipeline import encode_dataset, encode_images
    from cliplab.errors import ConfigError
    from cliplab.models.ensemble import ScoreEnsemble
    from cliplab.models.factory import load_model

    a = load_model(str(pair / "initial"))
    b = copy.deepcopy(a)
    b.image_tower.image_size = 200
    ens = ScoreEnsemble([a, b], [1, 3])
    assert not ens.shared_input
    with pytest.raises(ConfigError, match="preprocess images differently"):
        ens.preprocess()
    with pytest.raises(ConfigError, match="one image batch per member"):
        ens.encode_image(torch.zeros(1, 3, 224, 224))
    with torch.inference_mode():
        xa, xb = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 200, 200)
        joined = ens.encode_image([xa, xb])
        want = torch.cat([0.5 * a.encode_image(xa), 0.75 ** 0.5 * b.encode_image(xb)], -1)
    assert torch.allclose(joined, want, atol=1e-5)
    ds = load_caption_dataset(caption_dir / "captions.csv", "test")
    img, txt, used = encode_dataset(ens, ds, cache=None, progress=False)
    ia, ta, _ = encode_dataset(a, ds, progress=False)
    ib, tb, _ = encode_dataset(b, ds, progress=False)
    assert not torch.allclose(ia, ib, atol=1e-3)  # the input size matters
    assert torch.allclose(txt @ img.T, 0.25 * (ta @ ia.T) + 0.75 * (tb @ ib.T), atol=1e-5)
    z = encode_images(ens, ds.image_paths(), progress=False)
    assert torch.allclose(z, img, atol=1e-5)


@pytest.mark.slow
def test_ensemble_command_chooses_weights_on_dev_and_reports_test_once(pair, caption_dir, tmp_path, cli):
    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.pipeline import encode_dataset
    from cliplab.eval.retrieval import retrieval_metrics
    from cliplab.models.ensemble import join_embeddings
    from cliplab.models.factory import load_model
    from cliplab.viz.report import describe_run

    data = caption_dir / "captions.csv"
    out = tmp_path / "runs" / "ens"
    specs = ["conse", str(pair / "initial"), str(pair / "tuned")]
    res = cli("ensemble", *specs, "--data", data, "--test", "--grid", "0,0.5,1", "--run-dir", out, cache=pair / "cache")
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads((out / "ensemble.json").read_text())
    assert rec["split"] == "dev" and rec["select_metric"] == "rsum" and rec["test"]
    assert abs(sum(rec["weights"]) - 1) < 1e-9 and all(w > 0 for w in rec["weights"])
    assert rec["dev"]["rsum"] >= max(m["rsum"] for m in rec["members_dev"].values())
    # brute force: the recorded dev figure is the weighted sum of the members' own dev similarities
    dev = load_caption_dataset(data, "dev")
    parts = [encode_dataset(load_model(s), dev, progress=False) for s in specs]
    w = [rec["all_weights"][s] for s in specs]
    keep = [i for i in range(3) if w[i] > 0]
    img = join_embeddings([parts[i][0] for i in keep], [w[i] for i in keep])
    txt = join_embeddings([parts[i][1] for i in keep], [w[i] for i in keep])
    assert retrieval_metrics(img, txt, dev.caption_image).metrics["rsum"] == pytest.approx(rec["dev"]["rsum"])
    # the folder is a model (from any working directory): local members are stored relative to it
    assert all(not m.startswith("/") for m in rec["members"])
    res = cli("eval", "retrieval", data, "-m", out, "--run-dir", tmp_path / "ev", cache=pair / "cache")
    assert res.returncode == 0, res.stdout + res.stderr
    test = json.loads((tmp_path / "ev" / "metrics.json").read_text())[str(out)]
    assert test["rsum"] == pytest.approx(rec["test"]["rsum"])
    assert describe_run(out)["kind"] == "ensemble" and "T→I R@1" in (out / "results.md").read_text()
    # refused before any work, one line each
    for args, message in ((("--split", "test", "--test"), "must report another split"),
                          (("--split", "dev", "--test", "--test-split", "dev"), "must report another split"),
                          ((), "at least two models")):
        models = specs[:2] if message != "at least two models" else specs[:1]
        res = cli("ensemble", *models, "--data", data, *args, "--run-dir", tmp_path / "bad", cache=pair / "cache")
        assert res.returncode != 0 and message in res.stdout + res.stderr and "Traceback" not in res.stderr
    res = cli("ensemble", out, "conse", "--data", data, "--run-dir", tmp_path / "bad", cache=pair / "cache")
    assert res.returncode != 0 and "do not nest" in res.stdout + res.stderr


def test_overlapping_splits_are_refused(tmp_path, caption_dir):
    import csv

    from cliplab.data.captions import check_disjoint_splits
    from cliplab.errors import ConfigError

    rows = list(csv.reader(open(caption_dir / "captions.csv")))
    header, body = rows[0], rows[1:]
    leak = next(r for r in body if r[2] == "dev")
    path = caption_dir / "leaky.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *body, [leak[0], "the same image again", "test"]])
    check_disjoint_splits(caption_dir / "captions.csv", {"train": "train", "dev": "dev", "test": "test"})
    with pytest.raises(ConfigError, match=r"the dev split \('dev'\) and the test split \('test'\) share 1 image"):
        check_disjoint_splits(path, {"train": "train", "dev": "dev", "test": "test"})


@pytest.mark.slow
def test_flip_tta_averages_each_image_with_its_mirror(pair, caption_dir, tmp_path):
    """Brute force: with flip TTA an image embedding is normalise(e(x) + e(mirror(x))) from the model's own
    encode_image; an ensemble folder records the setting and applies it wherever it is loaded."""
    from PIL import Image

    from cliplab.data.captions import load_caption_dataset
    from cliplab.embed.pipeline import encode_dataset, encode_images, image_embeddings
    from cliplab.models.factory import load_model
    from cliplab.models.wrappers import FlipTTA, has_flip_tta

    m = load_model(str(pair / "tuned"))
    ds = load_caption_dataset(caption_dir / "captions.csv", "test")
    img, txt, used = encode_dataset(m, ds, cache=None, progress=False, flip_tta=True)
    plain, txt0, _ = encode_dataset(m, ds, progress=False)
    tf = m.preprocess()
    with torch.inference_mode():
        views = [Image.open(p).convert("RGB") for p in used.image_paths()]
        a = m.encode_image(torch.stack([tf(v) for v in views]))
        b = m.encode_image(torch.stack([tf(v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for v in views]))
    want = torch.nn.functional.normalize(a + b, dim=-1)
    assert torch.allclose(img, want, atol=1e-4) and torch.equal(txt, txt0) and not torch.allclose(img, plain, atol=1e-3)
    assert torch.allclose(encode_images(m, used.image_paths(), normalize=True, progress=False, flip_tta=True), want,
                          atol=1e-4)
    z, valid, _ = image_embeddings(FlipTTA(m), used.image_paths(), progress=False)
    assert valid.all() and torch.allclose(torch.from_numpy(z), want, atol=1e-4)
    folder = tmp_path / "ens"
    folder.mkdir()
    (folder / "ensemble.json").write_text(json.dumps({"members": ["conse", str(pair / "tuned")], "weights": [0.5, 0.5],
                                                      "flip_tta": True}))
    ens = load_model(folder)
    assert has_flip_tta(ens) and all(isinstance(m, FlipTTA) for m in ens.members)  # each member flip-averaged
    e_img, _, _ = encode_dataset(ens, ds, progress=False)
    c_img, _, _ = encode_dataset(load_model("conse"), ds, progress=False, flip_tta=True)
    assert torch.allclose(e_img, torch.cat([0.5 ** 0.5 * c_img, 0.5 ** 0.5 * img], -1), atol=1e-5)
    (folder / "ensemble.json").write_text(json.dumps({"members": ["conse"], "weights": [1], "flip_tta": "yes"}))
    with pytest.raises(ConfigError, match="'flip_tta' must be true or false"):
        load_model(folder)


@pytest.mark.slow
def test_search_queries_by_image_match_the_index_for_mixed_input_ensembles(pair, caption_dir):
    """An image query under an ensemble of members with different inputs (and flip TTA) is embedded exactly as
    the index embeds that image, so the image finds itself with score 1."""
    import copy

    import numpy as np

    from cliplab.data.images import load_rgb
    from cliplab.embed.pipeline import image_embeddings
    from cliplab.models.ensemble import ScoreEnsemble
    from cliplab.models.factory import load_model
    from cliplab.models.wrappers import with_flip_tta
    from cliplab.serve.query import QueryEncoder

    a = load_model(str(pair / "tuned"))
    b = copy.deepcopy(load_model(str(pair / "initial")))
    b.image_tower.image_size = 200
    paths = sorted((caption_dir / "images").glob("*.jpg"))[:3]
    for flip in (False, True):
        ens = with_flip_tta(ScoreEnsemble([a, b], [0.3, 0.7]), flip)
        stored, valid, _ = image_embeddings(ens, paths, progress=False)
        enc = QueryEncoder(ens)
        for row, path in enumerate(paths):
            q = enc.image(load_rgb(path))
            assert float(np.dot(q, stored[row])) == pytest.approx(1.0, abs=1e-4), (flip, path.name)


@pytest.mark.slow
def test_probe_features_of_an_ensemble_are_its_members_features_side_by_side(labelled_splits, tmp_path, cli):
    """ConSE over Lite0 (224 px) and Lite1 (240 px): probe features concatenate the two towers' features, and
    `cliplab probe` runs on the ensemble."""
    import numpy as np

    from cliplab.data.labelled import load_labelled
    from cliplab.embed.pipeline import image_tower_features
    from cliplab.models.factory import load_model

    spec = "ensemble:conse+conse:efficientnet_lite1"
    ens = load_model(spec)
    assert not ens.shared_input
    images = load_labelled(labelled_splits, split="test").images
    both = image_tower_features(ens, images, progress=False, flip_tta=True)
    parts = [image_tower_features(load_model(s), images, progress=False, flip_tta=True)
             for s in ("conse", "conse:efficientnet_lite1")]
    assert both.shape == (len(images), 2560) and np.allclose(both, np.concatenate(parts, 1))
    res = cli("probe", labelled_splits, "-m", spec, "--method", "logistic", "--run-dir", tmp_path / "p")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["feature_dim"] == 2560


@pytest.mark.slow
def test_ensemble_command_for_zero_shot_chooses_on_a_labelled_split(pair, labelled_splits, tmp_path, cli):
    """`--task zeroshot`: the weights are chosen by accuracy on the train split; the search's closed-form scores
    equal ZeroShotClassifier on the ensemble model (brute force), and test is reported once."""
    from cliplab.data.labelled import load_labelled
    from cliplab.embed.pipeline import encode_images
    from cliplab.eval.classification import classification_metrics
    from cliplab.eval.zeroshot import ZeroShotClassifier
    from cliplab.models.ensemble import score_ensemble
    from cliplab.models.factory import load_model
    from cliplab.studies.ensemble import _ZeroShot

    specs = ["conse", str(pair / "initial"), str(pair / "tuned")]
    models = [load_model(s) for s in specs]
    objective = _ZeroShot(str(labelled_splits), "train", "test", "simple7")
    with torch.inference_mode():
        parts = [objective.embed(m, progress=False) for m in models]
        for weights in ([0.2, 0.8, 0.0], [0.5, 0.25, 0.25]):
            keep = [i for i in range(3) if weights[i] > 0]
            ens = score_ensemble([models[i] for i in keep], [weights[i] for i in keep])
            emb = encode_images(ens, objective.ds.images, progress=False)
            want = ZeroShotClassifier(ens, objective.ds.class_names, "simple7").scores(emb).numpy()
            got = objective.metrics([parts[i] for i in keep], [weights[i] for i in keep])
            assert got["accuracy"] == classification_metrics(objective.ds.labels, want, objective.ds.class_names)["accuracy"]
            num = sum(weights[i] * (parts[i][0] @ parts[i][1].T) for i in keep)
            den = sum(weights[i] * (parts[i][1] ** 2).sum(-1) for i in keep).sqrt()
            assert torch.allclose(num / den, torch.from_numpy(want), atol=1e-5)
    out = tmp_path / "zs"
    res = cli("ensemble", *specs, "--task", "zeroshot", "--data", labelled_splits, "--split", "train",
              "--templates", "simple7", "--grid", "0,0.5,1", "--test", "--run-dir", out, cache=pair / "cache")
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads((out / "ensemble.json").read_text())
    assert rec["task"] == "zeroshot" and rec["select_metric"] == "accuracy" and rec["test"]
    assert rec["dev"]["accuracy"] >= max(m["accuracy"] for m in rec["members_dev"].values())
    test = load_labelled(labelled_splits, split="test")
    model = load_model(out)
    scores = ZeroShotClassifier(model, test.class_names, "simple7").scores(
        encode_images(model, test.images, progress=False)).numpy()
    assert classification_metrics(test.labels, scores, test.class_names)["accuracy"] == rec["test"]["accuracy"]
    res = cli("ensemble", *specs[:2], "--task", "zeroshot", "--data", labelled_splits, "--split", "train",
              "--metric", "rsum", "--run-dir", tmp_path / "bad", cache=pair / "cache")
    assert res.returncode != 0 and "unknown classification metric" in res.stdout + res.stderr


@pytest.mark.slow
def test_an_ensemble_refuses_dot_product_and_both_means_cosine(tmp_path, cli, labelled_splits):
    """An ensemble's score is a weighted sum of member cosines: --similarity dot is refused with one line (not
    silently the cosine numbers), and 'both' reports cosine alone."""
    from cliplab.eval.zeroshot import ZeroShotClassifier, similarities_for
    from cliplab.models.factory import load_model

    ens = load_model("ensemble:0.5*conse+0.5*conse:efficientnet_lite0@192")
    assert similarities_for(ens, "both") == ("cosine",) and similarities_for(load_model("conse"), "both") == (
        "cosine", "dot")
    with pytest.raises(ConfigError, match="dot product is not defined"):
        ZeroShotClassifier(ens, ["red", "green"], "photo", "dot")
    res = cli("zeroshot", labelled_splits, "-m", "ensemble:0.5*conse+0.5*conse:efficientnet_lite0@192",
              "--similarity", "dot", "-v", "photo", "--run-dir", tmp_path / "zs")
    assert res.returncode == 2 and "dot product is not defined" in res.stdout
    res = cli("zeroshot", labelled_splits, "-m", "ensemble:0.5*conse+0.5*conse:efficientnet_lite0@192",
              "-v", "photo", "--run-dir", tmp_path / "zs2")
    assert res.returncode == 0, res.stdout
    results = json.loads((tmp_path / "zs2" / "zeroshot.json").read_text())["results"]
    assert set(results) == {"photo|cosine"}
