"""Flip TTA and score ensembles as model wrappers, and the probe's stacked image features, on tiny random models.

``tests/data/embeddings_before_wrappers.npz`` holds the numbers every embedding path gave before flip TTA and
ensembles became wrappers (recorded with that code on the same tiny models and images): the wrappers keep them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cliplab.data.captions import load_caption_dataset
from cliplab.data.images import ImageFiles, load_rgb
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import (encode_dataset, encode_images, image_embeddings, image_outputs,
                                    image_tower_features)
from cliplab.errors import ConfigError
from cliplab.eval.zeroshot import ZeroShotClassifier, similarities_for
from cliplab.models import factory
from cliplab.models.base import ComposedModel, EmbeddingModel
from cliplab.models.ensemble import ScoreEnsemble, TowerScoreEnsemble, score_ensemble
from cliplab.models.registry import register_model_kind, unregister_model_kind
from cliplab.models.wrappers import (FeatureStack, FlipTTA, has_flip_tta, text_side, with_flip_tta,
                                     without_flip_tta)
from cliplab.serve.query import QueryEncoder
from tests.tiny_models import TinyImageTower, tiny_captions, tiny_models

RECORDED = Path(__file__).parent / "data" / "embeddings_before_wrappers.npz"


def _paths(folder: Path) -> tuple[list[Path], list[Path]]:
    images = folder / "data" / "images"
    good = sorted(images.glob("noise*.png"))
    return good, good + [images / "broken.png"]


def _models(flip: bool) -> dict:
    ms = tiny_models()
    models = {"T": ms["T"], "C": ms["C"], "S": score_ensemble([ms["T"], ms["T2"]], [0.3, 0.7]),
              "M": score_ensemble([ms["T"], ms["C"]], [0.4, 0.6])}
    return {name: with_flip_tta(m, flip) for name, m in models.items()}


def _outputs(model, ds, good, every, cache) -> dict:
    kw = dict(cache=cache, progress=False)
    img, txt, used = encode_dataset(model, ds, on_error="skip", **kw)
    z, valid, _ = image_embeddings(model, every, **kw)
    enc = QueryEncoder(model)
    return {"dataset_img": img.numpy(), "dataset_txt": txt.numpy(), "dataset_n": np.array(used.num_images),
            "images_raw": encode_images(model, good, **kw).numpy(),
            "images_unit": encode_images(model, good, normalize=True, **kw).numpy(),
            "features": image_tower_features(model, good, **kw), "index": z, "index_valid": valid,
            "query": np.stack([enc.image(load_rgb(p)) for p in good])}


def test_every_embedding_path_gives_the_numbers_recorded_before_the_wrappers(tmp_path):
    """Dataset, raw / unit image embeddings, probe features, the photo index and query images, for a tower model,
    an end-to-end model, a tower-sharing and a mixed-input ensemble, with and without flip TTA: today's numbers.
    One deliberate change: a query image under a mixed-input ensemble with flip TTA is now embedded as the index
    embeds that image (before, the whole joined embedding was flip-averaged: off by up to 0.003)."""
    recorded = np.load(RECORDED)
    ds = load_caption_dataset(tiny_captions(tmp_path / "data"), "test", on_error="skip")
    good, every = _paths(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    for flip in (False, True):
        for name, model in _models(flip).items():
            got = _outputs(model, ds, good, every, cache)
            assert got["dataset_n"] == 3 and got["index_valid"].tolist() == [True, True, True, False]
            for key, value in got.items():
                want = recorded[f"{name}|{int(flip)}|{key}"]
                if (name, flip, key) == ("M", True, "query"):
                    assert np.abs(value - want).max() > 1e-3  # the recorded query missed its own index row
                    want = got["index"][:3]
                assert value.shape == want.shape and np.allclose(value, want, atol=1e-6, rtol=0), (name, flip, key)
    plain = _models(False)["M"]  # the flip_tta= keyword wraps the model once, the same way
    img, _, _ = encode_dataset(plain, ds, on_error="skip", cache=cache, progress=False, flip_tta=True)
    assert np.allclose(img.numpy(), recorded["M|1|dataset_img"], atol=1e-6)
    raw = encode_images(plain, good, cache=cache, progress=False, flip_tta=True)
    assert np.allclose(raw.numpy(), recorded["M|1|images_raw"], atol=1e-6)


def test_flip_tta_has_the_model_interface_and_one_definition():
    """The wrapper is an EmbeddingModel: a batch and its width-flip averaged at the asked level (unit: the mean
    of unit embeddings renormalised; raw: the mean), texts, preprocessing and logit scale as the model's."""
    model = tiny_models()["T"]
    flip = FlipTTA(model)
    assert isinstance(flip, EmbeddingModel) and isinstance(flip, ComposedModel)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        u, um = model.encode_image(x), model.encode_image(torch.flip(x, dims=[-1]))
        z, zm = model.encode_image(x, normalize=False), model.encode_image(torch.flip(x, dims=[-1]), normalize=False)
        assert torch.allclose(flip.encode_image(x), torch.nn.functional.normalize(u + um, dim=-1), atol=1e-6)
        assert torch.allclose(flip.encode_image(x, normalize=False), (z + zm) / 2, atol=1e-6)
        assert torch.equal(flip.encode_text(["a red square"]), model.encode_text(["a red square"]))
    assert repr(flip.preprocess()) == repr(model.preprocess())
    assert flip.fingerprint() != model.fingerprint() and flip.fingerprint() == FlipTTA(model).fingerprint()
    assert text_side(FlipTTA(flip)) is model  # the server's text fast path sees the TowerModel beneath
    assert float(flip.logit_scale.exp()) == pytest.approx(100.0)


def test_with_flip_tta_wraps_once_unwraps_and_flips_ensemble_members():
    ms = tiny_models()
    t = ms["T"]
    assert with_flip_tta(t, None) is t and with_flip_tta(t, False) is t
    flipped = with_flip_tta(t, True)
    assert isinstance(flipped, FlipTTA) and with_flip_tta(flipped, True) is flipped
    assert with_flip_tta(flipped, None) is flipped and without_flip_tta(flipped) is t
    mixed = with_flip_tta(score_ensemble([t, ms["C"]], [1, 1]), True)  # own towers: each member flipped
    assert type(mixed) is ScoreEnsemble and all(isinstance(m, FlipTTA) for m in mixed.members)
    assert has_flip_tta(mixed) and not has_flip_tta(without_flip_tta(mixed))
    shared = with_flip_tta(score_ensemble([t, ms["T2"]], [1, 1]), True)  # shared towers: wrapped whole
    assert isinstance(shared, FlipTTA) and isinstance(shared.inner, TowerScoreEnsemble)
    assert isinstance(without_flip_tta(shared), TowerScoreEnsemble)


def test_a_flipped_view_has_its_own_cache_entry_and_the_plain_one_is_reused(tmp_path):
    cache_dir = tmp_path / "cache"
    tiny_captions(tmp_path / "data")
    good, _ = _paths(tmp_path)
    for model in tiny_models()["T"], tiny_models()["C"]:  # frozen towers, or final embeddings through an adapter
        plain = image_outputs(model, ImageFiles(good), cache=FeatureCache(cache_dir), progress=False)
        before = set(cache_dir.glob("image-*"))
        flipped = image_outputs(FlipTTA(model), ImageFiles(good), cache=FeatureCache(cache_dir), progress=False)
        assert len(set(cache_dir.glob("image-*")) - before) == 1 and not flipped.reused  # only the mirrored view
        again = image_outputs(FlipTTA(model), ImageFiles(good), cache=FeatureCache(cache_dir), progress=False)
        assert again.reused and torch.equal(again.values, flipped.values)
        assert not torch.allclose(plain.values, flipped.values, atol=1e-3)


@pytest.fixture()
def tiny_kind():
    """``tiny:T``, ``tiny:T2`` and ``tiny:C`` as model specs (so ensembles and the CLI can name them)."""
    models = tiny_models()
    register_model_kind("tiny", prefix="tiny:", load=lambda spec: copy.deepcopy(models[spec.split(":", 1)[1]]))
    yield models
    unregister_model_kind("tiny")


def test_an_ensemble_refuses_dot_product_also_under_flip_tta(tiny_kind, labelled_splits, tmp_path, cli):
    """An ensemble defines cosine scores only: dot is refused (one line, exit 2), plain or flip-averaged, from a
    spec or a folder; a single flip-averaged model keeps both similarities."""
    folder = tmp_path / "ens"
    folder.mkdir()
    (folder / "ensemble.json").write_text(json.dumps({"members": ["tiny:T", "tiny:C"], "weights": [0.5, 0.5],
                                                      "flip_tta": True}))
    loaded = factory.load_model(folder)
    assert has_flip_tta(loaded)
    shared = with_flip_tta(factory.load_model("ensemble:tiny:T+tiny:T2"), True)
    for ens in (factory.load_model("ensemble:tiny:T+tiny:C"), loaded, shared):
        assert similarities_for(ens, "both") == ("cosine",)
        with pytest.raises(ConfigError, match="dot product is not defined"):
            ZeroShotClassifier(ens, ["red", "green"], "photo", "dot")
    assert similarities_for(FlipTTA(tiny_kind["T"]), "both") == ("cosine", "dot")
    for spec in ("ensemble:tiny:T+tiny:C", str(folder)):
        res = cli("eval", "zeroshot", labelled_splits, "-m", spec, "--similarity", "dot", "-v", "photo",
                  "--run-dir", tmp_path / "zs")
        assert res.returncode == 2 and "dot product is not defined" in res.stdout, res.stdout + res.stderr


def test_probe_feature_names_reuse_the_input_size_parser():
    config = factory.image_tower_config
    assert (config("lite2@224").arch, config("lite2@224").image_size) == ("efficientnet_lite2", 224)
    assert config("lite0").to_dict() == factory.conse_tower_config("conse:efficientnet_lite0").to_dict()
    assert config("mobilenetv2_100@192").image_size == 192
    with pytest.raises(ConfigError, match="input size after '@' must be a whole number"):
        config("lite0@big")
    with pytest.raises(ConfigError, match="name an image tower"):
        config("@224")
    with pytest.raises(ConfigError, match=r"model 'conse:efficientnet_lite0@9': the input size"):
        factory.conse_tower_config("conse:efficientnet_lite0@9")


@pytest.fixture()
def tiny_towers(monkeypatch):
    """``pretrained_tower`` builds tiny random image towers (one per name, at the asked input size)."""
    seeds = {"efficientnet_lite0": 1, "efficientnet_lite2": 2}
    monkeypatch.setattr(factory, "pretrained_tower",
                        lambda c: TinyImageTower(c.image_size or 32, seeds.get(c.arch, 3)))


def test_probe_features_are_the_named_towers_side_by_side(tiny_towers, tiny_kind, labelled_splits, tmp_path, cli):
    """``features=[...]`` / ``--features``: the towers' flip-averaged features concatenated (brute force from each
    tower), without any ConSE or ensemble spec; the model still gives the zero-shot comparison."""
    from cliplab.data.labelled import load_labelled
    from cliplab.experiments import run_probe

    stack = factory.feature_stack(["lite0", " lite2@40", ""])
    assert isinstance(stack, FeatureStack) and stack.names == ["lite0", "lite2@40"]
    assert [t.image_size for t in stack.towers] == [32, 40]
    images = load_labelled(labelled_splits, split="test").images
    cache = FeatureCache(tmp_path / "cache")
    got = image_tower_features(stack, images, cache=cache, progress=False, flip_tta=True)
    want = np.concatenate([image_tower_features(t, images, cache=cache, progress=False, flip_tta=True)
                           for t in stack.towers], 1)
    assert got.shape == (len(images), 24) and np.allclose(got, want)
    with pytest.raises(ConfigError, match="has no embeddings"):
        image_outputs(stack, images, level="unit", cache=cache, progress=False)
    run = run_probe(labelled_splits, "tiny:T", features=["lite0", "lite2@40"], methods=["logistic"],
                    cache=cache, device="cpu")
    assert run.feature_dim == 24 and run.features == ["lite0", "lite2@40"] and "zeroshot" in run.results
    assert "features of lite0 + lite2@40 side by side" in run.protocol_line()
    res = cli("eval", "probe", labelled_splits, "-m", "tiny:T", "--features", "lite0,lite2@40", "--method",
              "logistic", "--run-dir", tmp_path / "p")
    assert res.returncode == 0, res.stdout + res.stderr
    record = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert record["feature_dim"] == 24 and record["features"] == ["lite0", "lite2@40"]
    assert record["results"]["probe:logistic"]["accuracy"] == run.results["probe:logistic"]["accuracy"]
    res = cli("eval", "probe", labelled_splits, "-m", "tiny:T", "--features", "lite0@x", "--run-dir", tmp_path / "q")
    assert res.returncode == 2 and "probe features 'lite0@x'" in res.stdout
