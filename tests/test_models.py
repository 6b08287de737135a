import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.errors import ConfigError
from tests.conftest import tiny_hf_clip, tiny_open_clip
from cliplab.models import (ConSE, HeadConfig, TwoTower, TwoTowerConfig, imagenet_classnames,
                            load_clip)


def test_efficientnet_lite0_classifies_chelsea_as_cat(towers):
    from skimage import data

    image_tower, _ = towers
    x = image_tower.transform()(Image.fromarray(data.chelsea()))[None]
    with torch.inference_mode():
        probs = image_tower.classify(image_tower(x)).softmax(-1)[0]
    names = imagenet_classnames()
    top = [names[i] for i in probs.topk(3).indices]
    assert set(top) & {"tabby cat", "tiger cat", "Egyptian Mau"}, top
    assert probs.max() > 0.3
    assert image_tower.mean == (0.5, 0.5, 0.5) and image_tower.output_dim == 1280


def test_text_tower_mean_pooling_semantics(towers):
    _, text_tower = towers
    with torch.inference_mode():
        e = torch.nn.functional.normalize(text_tower.encode(["a dog runs on grass", "a puppy running in a field",
                                                             "stock market prices fell"]), dim=-1)
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


@pytest.mark.slow
def test_two_tower_save_load_identical(fresh_towers, tmp_path):
    cfg = TwoTowerConfig(head=HeadConfig(kind="mlp", embed_dim=64, hidden_dim=128))
    model = TwoTower(cfg, image_tower=fresh_towers[0], text_tower=fresh_towers[1]).freeze_towers().eval()
    with torch.no_grad():
        for p in model.image_head.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.logit_scale.fill_(3.3)
    x = torch.randn(2, 3, 224, 224)
    texts = ["a red bus", "two people"]
    with torch.inference_mode():
        a_img, a_txt = model.encode_image(x), model.encode_text(texts)
    model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "cliplab_config.json").read_text())
    assert saved["includes_towers"] is False and saved["head"]["embed_dim"] == 64
    loaded = TwoTower.load(tmp_path / "m")
    with torch.inference_mode():  # equal up to conv algorithm choice (a tower may be channels-last)
        assert torch.allclose(loaded.encode_image(x), a_img, atol=1e-6)
        assert torch.equal(loaded.encode_text(texts), a_txt)
    assert loaded.logit_scale.item() == pytest.approx(3.3)
    assert a_img.shape == (2, 64) and a_txt.shape == (2, 64)
    with pytest.raises(ConfigError, match="not a cliplab model directory"):
        TwoTower.load(tmp_path)


@pytest.mark.slow
def test_conse_embeds_images_in_text_space(towers):
    image_tower, text_tower = towers
    conse = ConSE(image_tower, text_tower, top_t=5)
    from skimage import data

    x = image_tower.transform()(Image.fromarray(data.chelsea()))[None]
    with torch.inference_mode():
        img = conse.encode_image(x)
        txt = conse.encode_text(["a cat lying down", "a red sports car on a road"])
    assert img.shape == (1, 384)
    assert (img @ txt.T)[0, 0] > (img @ txt.T)[0, 1]


@pytest.mark.slow
def test_conse_class_embeddings_are_reused_from_the_cache_folder_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    from cliplab.models import factory

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(factory, "_CONSE_CLASSES", {})  # as in a new process
    first = factory.load_model("conse").class_embeddings
    (cached,) = (tmp_path / "cache").glob("conse-classes-*.safetensors")
    factory._CONSE_CLASSES.clear()
    with monkeypatch.context() as m:
        m.setattr(factory.TextTower, "encode", lambda *a, **k: pytest.fail("encoded although cached"))
        assert torch.equal(factory.load_model("conse").class_embeddings, first)
    cached.write_bytes(cached.read_bytes()[:100])  # a damaged cache file is recomputed and replaced
    factory._CONSE_CLASSES.clear()
    assert torch.equal(factory.load_model("conse").class_embeddings, first)
    factory._CONSE_CLASSES.clear()
    with monkeypatch.context() as m:
        m.setattr(factory.TextTower, "encode", lambda *a, **k: pytest.fail("encoded although cached"))
        assert torch.equal(factory.load_model("conse").class_embeddings, first)


def test_load_clip_open_clip_local_dir(tmp_path):
    model, tokenizer, out = tiny_open_clip(tmp_path)
    wrapper = load_clip(str(out))
    assert wrapper.backend == "open_clip"
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        ref_img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        ref_txt = torch.nn.functional.normalize(model.encode_text(tokenizer(["a cat", "a dog"])), dim=-1)
        img, txt = wrapper.encode_image(x), wrapper.encode_text(["a cat", "a dog"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img, ref_img, atol=1e-6) and torch.allclose(txt, ref_txt, atol=1e-6)
    assert load_clip(f"local-dir:{out}").backend == "open_clip"
    t = wrapper.preprocess()
    assert t(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_load_clip_hf_local_dir(tmp_path, towers):
    _, text_tower = towers
    model, out = tiny_hf_clip(tmp_path, text_tower.tokenizer)
    wrapper = load_clip(str(out))
    assert wrapper.backend == "hf"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        img = wrapper.encode_image(x)
        pooled = model.vision_model(pixel_values=x).pooler_output
        ref = torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)
        txt = wrapper.encode_text(["a cat", "two dogs playing"])
    assert img.shape == (2, 24) and txt.shape == (2, 24)
    assert torch.allclose(img, ref, atol=1e-6)
    assert np.allclose(txt.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_load_clip_errors(tmp_path):
    with pytest.raises(ConfigError, match="no open_clip_config.json"):
        load_clip(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot resolve"):
        load_clip("not-a-model")


def test_frozen_towers_stay_in_eval_mode(fresh_towers):
    model = TwoTower(TwoTowerConfig(head=HeadConfig(embed_dim=16)), image_tower=fresh_towers[0],
                     text_tower=fresh_towers[1]).freeze_towers()
    model.train()
    assert model.image_head.training and model.text_head.training
    assert not model.image_tower.training and not model.text_tower.training
    assert not any(m.training for m in model.image_tower.modules())
