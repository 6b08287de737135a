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
