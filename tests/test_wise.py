"""WiSE-FT weight interpolation: the mix is exact at both ends and linear between, over heads and tuned tower
tensors; `cliplab interpolate` evaluates in and out of domain and its run shows in the report."""

import json

import pytest
import torch

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


def test_interpolation_is_exact_at_the_ends_and_linear_between(pair):
    from cliplab.models.factory import load_model
    from cliplab.train.wise import interpolate_state, mixed_keys, model_at

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


def test_ensemble_specs_and_members_are_checked(pair):
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
    with pytest.raises(ConfigError, match="preprocesses images differently"):
        ScoreEnsemble([conse, other], [1, 1])


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
