"""Tower tuning: stages, last-N / LoRA / CLIP modes, cached prefixes, resume, hard negatives."""

import json

import numpy as np
import pytest
import torch

from cliplab.models import TwoTower, TwoTowerConfig, load_clip
from cliplab.models.heads import HeadConfig
from cliplab.models.stages import Stages
from cliplab.models.tuning import TowerTuning
from cliplab.errors import ConfigError
from cliplab.train.config import RunConfig
from cliplab.train.run import train_run
from cliplab.rundir import read_metrics
from cliplab.train.trainer import PairSampler, Trainer
from tests.conftest import tiny_hf_clip, tiny_open_clip


def small_model(towers):
    image, text = towers
    cfg = TwoTowerConfig(image=image.config, text=text.config, head=HeadConfig(kind="linear", embed_dim=16))
    torch.manual_seed(0)
    return TwoTower(cfg, image_tower=image, text_tower=text)


@torch.inference_mode()
def test_stages_reproduce_tower_outputs(towers):
    image, text = towers
    model = small_model(towers)
    x = torch.randn(2, 3, 64, 64)
    ist = model.image_stages()
    assert [s.name for s in ist][:2] == ["stem", "blocks.0.0"] and ist[len(ist) - 1].name == "head"
    ref = image(x)
    for b in (0, 5, len(ist) - 2, len(ist) - 1):  # split anywhere: prefix then suffix gives the same features
        mid = ist.run(x, 0, b)
        assert torch.allclose(ist.run(mid, b, len(ist) - 1), ref, atol=1e-5)
    tokens = text.tokenize(["a dog runs on the beach", "two cats"])
    tst = model.text_stages()
    ref = text(**tokens)
    for b in (1, 4, len(tst) - 2):
        hidden, mask = tst.run(tokens, 0, b)
        assert torch.allclose(tst.run((hidden, mask), b, len(tst) - 1), ref, atol=1e-5)
        # cached prefixes are re-padded per batch: extra padding must not change the output
        padded = (torch.cat([hidden, torch.zeros(2, 3, hidden.shape[-1])], 1), torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1))
        assert torch.allclose(tst.run(padded, b, len(tst) - 1), ref, atol=1e-5)


@pytest.mark.slow
def test_frozen_prefix_runs_in_onnx_runtime_with_torch_fallback(towers, tmp_path, monkeypatch):
    from cliplab.embed.cache import FeatureCache
    from cliplab.train import inputs

    image_tower = towers[0]
    stages = Stages(image_tower.stages())
    grads = [p.requires_grad for p in image_tower.parameters()]
    modes = {name: m.training for name, m in image_tower.named_modules()}
    boundary = len(stages) - 2
    x = torch.randn(3, 3, 224, 224)
    cache = FeatureCache(tmp_path)
    with torch.inference_mode():
        ref = stages.run(x, 0, boundary)
    try:
        for p in image_tower.parameters():  # as in a tuned run: parameters that train require grad
            p.requires_grad_(True)
        image_tower.model.bn1.train()  # a module in training mode must stay so (the export runs in eval)
        run = inputs._prefix_runner(stages, boundary, "k", torch.zeros(2, 3, 224, 224), "cpu", "onnx", cache)
        assert image_tower.model.bn1.training
        assert {n: m.training for n, m in image_tower.named_modules() if not n.startswith("model.bn1")} == \
            {n: t for n, t in modes.items() if not n.startswith("model.bn1")}
    finally:
        image_tower.model.bn1.train(modes["model.bn1"])
        for p, g in zip(image_tower.parameters(), grads):
            p.requires_grad_(g)
    assert (tmp_path / "onnx" / "prefix-k.onnx").is_file()
    got = run(x)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-3 * ref.abs().max()

    def no_export(*args, **kwargs):
        raise RuntimeError("operator not supported")

    monkeypatch.setattr(inputs, "OnnxTensorFunction", no_export)
    fallback = inputs._prefix_runner(stages, boundary, "k2", torch.zeros(2, 3, 224, 224), "cpu", "onnx", cache)
    torch_only = inputs._prefix_runner(stages, boundary, "k3", torch.zeros(2, 3, 224, 224), "cpu", "torch", cache)
    with torch.inference_mode():
        assert torch.equal(fallback(x), ref) and torch.equal(torch_only(x), ref)
    assert not (tmp_path / "onnx" / "prefix-k3.onnx").exists()


def test_last_n_and_lora_choose_the_right_parameters(fresh_towers):
    towers = fresh_towers
    model = small_model(towers)
    model.set_trainable("heads")
    model.tune_towers(TowerTuning("last_n", last_n=2), TowerTuning("frozen"))
    ist = model.image_stages()
    assert ist.first_trainable() == len(ist) - 3  # last block + head conv
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    assert all(p.requires_grad for p in model.image_tower.model.conv_head.parameters())
    assert not any(p.requires_grad for p in model.image_tower.model.conv_stem.parameters())

    import copy

    image, text = towers[0], copy.deepcopy(towers[1])  # LoRA changes the module tree: a tower of its own
    model = TwoTower(TwoTowerConfig(text=text.config, head=HeadConfig(kind="linear", embed_dim=16)),
                     image_tower=image, text_tower=text)
    tokens = text.tokenize(["a man rides a bike"])
    with torch.inference_mode():
        before = text(**tokens)
    model.set_trainable("heads")
    model.tune_towers(TowerTuning("frozen"), TowerTuning("lora", last_n=2, lora_r=4))
    trainable = [n for n, p in model.text_tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[3] for n in trainable} == {"4", "5"}  # encoder.layer.{4,5}
    assert {n.split(".")[6] for n in trainable} == {"query", "value"}
    assert model.text_stages().first_trainable() == 5  # embeddings + 4 frozen layers are the cached prefix
    with torch.inference_mode():
        assert torch.allclose(text(**tokens), before, atol=1e-6)  # LoRA starts as the identity
    assert text.config.lora["targets"][0].startswith("encoder.layer.4.")

    with pytest.raises(ConfigError, match="last_n=40"):
        small_model(towers).tune_towers(TowerTuning("last_n", last_n=40), TowerTuning())
    with pytest.raises(ConfigError, match="mode must be one of"):
        TowerTuning("everything")


def tuned_config(caption_dir, cache, **train):
    cfg = RunConfig.from_dict({
        "model": {"head": {"kind": "linear", "embed_dim": 32}},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "tower_lr": 1e-4, "device": "cpu", "patience": 0,
                  "image_tower": {"mode": "last_n", "last_n": 1},
                  "text_tower": {"mode": "lora", "last_n": 1, "lora_r": 4}, "augment": "flip", **train},
        "data": {"path": str(caption_dir / "captions.csv"), "cache_dir": str(cache)},
        "baseline": False,
    })
    return cfg


@pytest.mark.slow
def test_tuned_run_saves_adapters_and_reloads(caption_dir, tmp_path, towers):
    cfg = tuned_config(caption_dir, tmp_path / "cache")
    run = tmp_path / "run"
    res = train_run(cfg, run, progress=False, log=lambda *a: None)
    assert res["parameters"]["text_tower"]["trainable"] > 0 and res["parameters"]["image_tower"]["trainable"] > 0
    prefix_dirs = sorted((tmp_path / "cache").glob("prefix-*"))
    assert len(prefix_dirs) == 7  # train: image, mirrored image, text prefixes; dev and test: image + text
    saved = json.loads((run / "best" / "cliplab_config.json").read_text())
    assert saved["text"]["lora"]["r"] == 4 and any("lora_" in k for k in saved["tuned_tower_keys"])
    assert any(k.startswith("image_tower.model.conv_head") for k in saved["tuned_tower_keys"])
    loaded = TwoTower.load(run / "best")
    # the trained adapters are in the reloaded tower: its features differ from the pretrained tower's
    tokens = loaded.text_tower.tokenize(["a red circle", "a blue square"])
    with torch.inference_mode():
        assert not torch.allclose(loaded.text_tower(**tokens), towers[1](**tokens), atol=1e-4)
    assert loaded.text_tower.fingerprint() != towers[1].fingerprint()
    # the loaded model's test retrieval equals the one reported at the end of training
    from cliplab.data import load_caption_dataset
    from cliplab.embed.cache import FeatureCache
    from cliplab.embed.pipeline import encode_dataset
    from cliplab.eval.retrieval import retrieval_metrics

    ds = load_caption_dataset(str(caption_dir / "captions.csv"), "test")
    img, txt, ds = encode_dataset(loaded, ds, cache=FeatureCache(tmp_path / "cache2"), progress=False, backend="torch")
    got = retrieval_metrics(img, txt, ds.caption_image).metrics
    for key in ("t2i_mrr", "i2t_mrr", "t2i_mean_rank", "i2t_mean_rank"):
        assert got[key] == pytest.approx(res["test"]["trained"][key], abs=1e-6), key


class Killed(Exception):
    pass


@pytest.mark.slow
def test_tuned_run_resumes_to_the_same_metrics(caption_dir, tmp_path, monkeypatch):
    cfg = tuned_config(caption_dir, tmp_path / "cache", epochs=4)
    ref = train_run(cfg, tmp_path / "full", progress=False, log=lambda *a: None)

    original = Trainer._save_checkpoint

    def save_then_die(self, epoch, *a):
        original(self, epoch, *a)
        if epoch == 1:
            raise Killed

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_run(cfg, tmp_path / "killed", progress=False, log=lambda *a: None)
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    torch.manual_seed(999)
    got = train_run(cfg, tmp_path / "killed", progress=False, log=lambda *a: None)
    assert got["test"]["trained"] == pytest.approx(ref["test"]["trained"], abs=1e-9)
    assert [r["train_loss"] for r in read_metrics(tmp_path / "killed")] == \
        pytest.approx([r["train_loss"] for r in read_metrics(tmp_path / "full")], abs=1e-9)


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
@pytest.mark.slow
def test_clip_projection_only_and_lora(caption_dir, tmp_path, towers, kind):
    if kind == "hf":
        _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    else:
        _, _, folder = tiny_open_clip(tmp_path)
    base = load_clip(str(folder))
    cache = tmp_path / "cache"
    common = {"data": {"path": str(caption_dir / "captions.csv"), "cache_dir": str(cache)}, "clip": str(folder)}
    # projection layers only: both sides cached before their projection
    cfg = RunConfig.from_dict({**common, "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "device": "cpu"}})
    res = train_run(cfg, tmp_path / "proj", progress=False, log=lambda *a: None)
    assert set(res["test"]) == {"zero-shot CLIP", "trained"}
    tuned = load_clip(str(tmp_path / "proj" / "best"))
    changed = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, base.model.state_dict()[k])]
    assert changed and all("proj" in k or "logit_scale" in k for k in changed)
    assert tuned.fingerprint() != base.fingerprint()

    # LoRA on the text encoder's default targets (HF: q/v projections; open_clip: its fused attention through
    # PEFT's nn.MultiheadAttention adapter), projections frozen
    cfg = RunConfig.from_dict({**common, "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "device": "cpu",
                                                   "trainable": "none", "text_tower": {"mode": "lora", "lora_r": 2}}})
    res = train_run(cfg, tmp_path / "lora", progress=False, log=lambda *a: None)
    assert ("attn" if kind == "open_clip" else "q_proj") in res["parameters"]["lora"]["text"]  # stated in the log
    tuned = load_clip(str(tmp_path / "lora" / "best"))
    names = [n for n, _ in tuned.model.named_parameters() if "lora_" in n]
    if kind == "hf":
        assert names and all(n.split(".")[-4] in ("q_proj", "v_proj") for n in names)
        assert all(n.startswith("text_model.") for n in names)
    else:  # the text transformer's attention only, never the vision tower's namesakes
        assert names and all(n.startswith("transformer.resblocks.") and ".attn." in n for n in names)
    with torch.inference_mode():
        z = tuned.encode_text(["a red circle"])
        z0 = base.encode_text(["a red circle"])
    assert z.shape == z0.shape == (1, 24 if kind == "hf" else 32)
    assert not torch.allclose(z, z0, atol=1e-5)  # the trained adapters changed the text side
    dev = [json.loads(line)["dev"]["rsum"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert res["fit"]["best_epoch"] == int(np.argmax(dev)) and set(res["test"]) == {"zero-shot CLIP", "trained"}


def test_hard_negative_batches_group_similar_images():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 5
    owner_cluster = np.repeat(np.arange(6), 16)
    feats = centres[owner_cluster] + rng.normal(size=(96, 16)) * 0.1
    caption_image = np.repeat(np.arange(96), 2)
    sampler = PairSampler(caption_image, 96, "hard", batch_size=8, seed=0, image_features=feats)
    seen = []
    purity = []
    for images, captions in sampler.epoch(0):
        assert np.all(caption_image[captions] == images)
        seen.extend(images)
        purity.append(np.bincount(owner_cluster[images]).max() / len(images))
    assert sorted(seen) == list(range(96))  # every image once per epoch
    rand = PairSampler(caption_image, 96, "random_caption", batch_size=8, seed=0)
    rand_purity = np.mean([np.bincount(owner_cluster[i]).max() / 8 for i, _ in rand.epoch(0)])
    assert np.mean(purity) > 0.7 and np.mean(purity) > rand_purity + 0.3  # batches are groups of look-alikes
    a = [i.tolist() for i, _ in sampler.epoch(3)]
    assert a == [i.tolist() for i, _ in sampler.epoch(3)] and a != [i.tolist() for i, _ in sampler.epoch(4)]


@pytest.mark.slow
def test_init_from_copies_a_saved_model(caption_dir, tmp_path):
    from safetensors.torch import load_file

    from cliplab.train.run import build_model

    cfg = tuned_config(caption_dir, tmp_path / "cache", epochs=1)
    train_run(cfg, tmp_path / "first", progress=False, log=lambda *a: None)
    saved = load_file(str(tmp_path / "first" / "best" / "model.safetensors"))
    cfg2 = cfg.with_overrides([f"train.init_from={tmp_path / 'first'}"])
    model, _, _ = build_model(cfg2)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k.startswith(("image_head.", "logit")))
    bad = cfg.with_overrides([f"train.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="init_from"):
        build_model(bad)


@torch.inference_mode()
def test_mpnet_stages_reproduce_the_encoder(tmp_path, towers):
    """MPNet layers need the encoder's relative position bias and return tuples: split anywhere, the stages
    give the tower's own output (a tiny random MPNet in all-mpnet-base-v2's layout)."""
    from transformers import MPNetConfig, MPNetModel

    from cliplab.models.text_tower import TextTower, TextTowerConfig

    tokenizer = towers[1].tokenizer
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id)
    MPNetModel(cfg).eval().save_pretrained(tmp_path / "mpnet")
    tokenizer.save_pretrained(tmp_path / "mpnet")
    text = TextTower(TextTowerConfig(name=str(tmp_path / "mpnet"))).eval()
    tokens = text.tokenize(["a dog runs on the beach with a red ball", "two cats"])
    ref = text(**tokens)
    tst = Stages(text.stages())
    assert [s.name for s in tst] == ["embeddings", "layer.0", "layer.1", "layer.2", "pool"]
    assert text.model.encoder.relative_attention_bias in tst[0].modules  # trains with the embeddings stage
    for b in (1, 2, 3):
        hidden, mask = tst.run(tokens, 0, b)
        assert torch.allclose(tst.run((hidden, mask), b), ref, atol=1e-5)
        padded = (torch.cat([hidden, torch.zeros(2, 3, hidden.shape[-1])], 1),
                  torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1))
        assert torch.allclose(tst.run(padded, b), ref, atol=1e-5)


# -- real CLIP towers: transformer blocks as stages, default LoRA targets, trimmed text, checkpointing
def open_clip_folder(tmp_path, text_layers: int = 3, vision_layers: int = 2):
    """A tiny random open_clip CLIP (16-token context) with several residual blocks per side, saved as an
    open_clip folder."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": vision_layers, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": text_layers}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    out = tmp_path / "oc-deep"
    out.mkdir()
    save_file(model.state_dict(), str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}))
    return out


def clip_folder(kind, tmp_path, towers):
    return tiny_hf_clip(tmp_path, towers[1].tokenizer)[1] if kind == "hf" else open_clip_folder(tmp_path)


CAPTIONS = ["a dog", "two cats sit on a red mat near the door", "x"]


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_clip_default_lora_targets_are_found_and_only_they_train(tmp_path, towers, kind):
    clip = load_clip(str(clip_folder(kind, tmp_path, towers))).set_trainable("none")
    px = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before_text, before_image = clip.encode_text(CAPTIONS), clip.encode_image(px)
    counts = clip.tune_towers(TowerTuning(), TowerTuning("lora", lora_r=2))
    trainable = [n for n, p in clip.model.named_parameters() if p.requires_grad and n != "logit_scale"]
    assert trainable and all("lora_" in n for n in trainable)
    if kind == "open_clip":  # PEFT's adapter of the fused attention (q/k/v in_proj + out_proj), text blocks only
        assert {n.split(".")[2] for n in trainable} == {"0", "1", "2"}
        assert all(n.startswith("transformer.resblocks.") and n.split(".")[3] == "attn" for n in trainable)
        assert not any("lora_" in n for n, _ in clip.model.visual.named_parameters())  # not the vision namesakes
        assert counts["lora"]["text"].startswith("3 x attn (nn.MultiheadAttention: q/k/v in_proj + out_proj")
    else:
        assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
        assert all(n.startswith("text_model.encoder.layers.") for n in trainable)
        assert counts["lora"]["text"] == "2 x q_proj (Linear), 2 x v_proj (Linear)"
    assert counts["model"]["trainable"] == sum(clip.model.get_parameter(n).numel() for n in trainable) + 1
    tst = clip.text_stages()  # still one stage per block, adapters and all (cached prefix: the embeddings)
    assert len(tst) == 6 if kind == "open_clip" else len(tst) == 5
    assert tst.first_trainable() == 1
    torch.manual_seed(1)
    for n in trainable:  # adapters start as the identity; once trained they change the text side only
        with torch.no_grad():
            clip.model.get_parameter(n).normal_(0, 0.3)
    with torch.inference_mode():
        assert not torch.allclose(clip.encode_text(CAPTIONS), before_text, atol=1e-3)
        assert torch.equal(clip.encode_image(px), before_image)


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_last_n_on_a_clip_transformer_unfreezes_exactly_its_last_blocks(tmp_path, towers, kind):
    folder = clip_folder(kind, tmp_path, towers)
    clip = load_clip(str(folder)).set_trainable("none")
    clip.tune_towers(TowerTuning("last_n", last_n=1), TowerTuning("last_n", last_n=2))
    trainable = {n for n, p in clip.model.named_parameters() if p.requires_grad} - {"logit_scale"}
    m = clip.model
    if kind == "open_clip":  # text: 3 residual blocks, vision: 2
        text, image = m.transformer.resblocks, m.visual.transformer.resblocks
        names = ("transformer.resblocks", "visual.transformer.resblocks")
    else:  # text: 2 layers, vision: 1
        text, image = m.text_model.encoder.layers, m.vision_model.encoder.layers
        names = ("text_model.encoder.layers", "vision_model.encoder.layers")
    expected = {f"{names[0]}.{i}.{n}" for i in (len(text) - 2, len(text) - 1) for n, _ in text[i].named_parameters()}
    expected |= {f"{names[1]}.{len(image) - 1}.{n}" for n, _ in image[-1].named_parameters()}
    assert trainable == expected
    ist, tst = clip.image_stages(), clip.text_stages()
    assert tst.first_trainable() == len(tst) - 4  # two blocks, then final norm + pooling, projection
    assert ist.first_trainable() == len(ist) - 3
    with pytest.raises(ConfigError, match=f"last_n=9 but the tower has only {len(text)} blocks"):
        load_clip(str(folder)).tune_towers(TowerTuning(), TowerTuning("last_n", last_n=9))


def _full_length_tokens(clip, kind, texts):
    """Tokens padded to the whole context (open_clip's own batches; HF's max_length padding)."""
    if kind == "open_clip":
        return clip.tokenize(texts)
    tok = clip.tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    return {k: tok[k] for k in ("input_ids", "attention_mask")}


def _reference_text(clip, kind, tokens):
    """The library's own forward on full-length tokens (no trimming)."""
    if kind == "open_clip":
        return clip.model.encode_text(tokens)
    out = clip.model.get_text_features(**tokens)
    return getattr(out, "pooler_output", out)


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
@torch.inference_mode()
def test_trimmed_text_batches_give_the_untrimmed_embeddings(tmp_path, towers, kind):
    clip = load_clip(str(clip_folder(kind, tmp_path, towers)))
    tokens = _full_length_tokens(clip, kind, CAPTIONS)
    ref = _reference_text(clip, kind, tokens)
    tst = clip.text_stages()
    hidden, mask = tst.run(tokens, 0, 1)
    ids = tokens if kind == "open_clip" else tokens["input_ids"]
    assert hidden.shape[1] == int(mask.sum(1).max()) < ids.shape[1]  # trimmed to the longest caption
    real = (ids != 0) if kind == "open_clip" else tokens["attention_mask"].bool()  # start token .. end token
    assert mask.sum(1).tolist() == real.sum(1).tolist()
    assert torch.allclose(tst.run(tokens), ref, atol=2e-6, rtol=1e-5)
    assert torch.allclose(clip.encode_text(CAPTIONS, normalize=False), ref, atol=2e-6, rtol=1e-5)
    for b in range(1, len(tst) - 1):  # from any cached boundary, re-padded with zeros as cached batches are
        h, msk = tst.run(tokens, 0, b)
        padded = (torch.cat([h, torch.zeros(3, 4, h.shape[-1])], 1),
                  torch.cat([msk, torch.zeros(3, 4, dtype=msk.dtype)], 1))
        assert torch.allclose(tst.run(padded, b), ref, atol=2e-6, rtol=1e-5)
    for i, text in enumerate(CAPTIONS):  # a caption alone (its own length) = in a batch of longer ones
        assert torch.allclose(clip.encode_text([text], normalize=False)[0], ref[i], atol=2e-6, rtol=1e-5)
    if kind == "hf":  # configs from before transformers' eos fix (eos_token_id 2) pool at the highest token id
        clip.model.text_model.eos_token_id = 2
        legacy = _reference_text(clip, kind, tokens)
        assert not torch.allclose(legacy, ref, atol=1e-3)
        assert torch.allclose(clip.text_stages().run(tokens), legacy, atol=2e-6, rtol=1e-5)


def _lora_grads(folder, kind, checkpointing: bool, tokens):
    """Gradients of the text adapters after one backward pass, and how often block 0's MLP ran."""
    clip = load_clip(str(folder)).set_trainable("none")
    torch.manual_seed(0)
    clip.tune_towers(TowerTuning(), TowerTuning("lora", lora_r=2, lora_dropout=0.0, grad_checkpointing=checkpointing))
    names = sorted(n for n, p in clip.model.named_parameters() if "lora_" in n and p.requires_grad)
    with torch.no_grad():
        for n in names:
            clip.model.get_parameter(n).normal_(0, 0.3)
    tst = clip.text_stages()
    calls = []
    block = tst[1].modules[0]
    block.mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # a recompute may stop before its end
    clip.train()
    tst.run(tokens).pow(2).sum().backward()
    return clip, {n: clip.model.get_parameter(n).grad for n in names}, len(calls)


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_grad_checkpointing_switch_recomputes_blocks_with_the_same_gradients(tmp_path, towers, kind):
    from cliplab.models.stages import CHECKPOINT_ATTR

    folder = clip_folder(kind, tmp_path, towers)
    tokens = load_clip(str(folder)).tokenize(CAPTIONS)
    plain, ref, plain_calls = _lora_grads(folder, kind, False, tokens)
    clip, got, calls = _lora_grads(folder, kind, True, tokens)
    if kind == "open_clip":  # open_clip's own flag, and cliplab's on every residual block it runs as a stage
        assert clip.model.transformer.grad_checkpointing and not plain.model.transformer.grad_checkpointing
        assert all(getattr(b, CHECKPOINT_ATTR, False) for b in clip.model.transformer.resblocks)
        assert not any(getattr(b, CHECKPOINT_ATTR, False) for b in clip.model.visual.transformer.resblocks)
    else:  # Hugging Face's own switch on the text layers (they checkpoint themselves in training mode)
        assert all(layer.gradient_checkpointing for layer in clip.model.text_model.encoder.layers)
        assert not any(layer.gradient_checkpointing for layer in clip.model.vision_model.encoder.layers)
    assert (plain_calls, calls) == (1, 2)  # the checkpointed block ran again in the backward pass
    assert ref.keys() == got.keys() and all(torch.allclose(got[n], ref[n], atol=1e-6) for n in ref)
    assert any(ref[n].abs().sum() > 0 for n in ref)


def test_grad_checkpointing_setting():
    assert TowerTuning("lora").to_dict()["grad_checkpointing"] is False
    on = TowerTuning.from_any({"mode": "lora", "grad_checkpointing": "true"}, "t")
    assert on.to_dict()["grad_checkpointing"] is True
    cfg = RunConfig.from_dict({"train": {"text_tower": "lora"}}).with_overrides(
        ["train.text_tower.grad_checkpointing=true", "train.text_tower.last_n=4"])  # as -s KEY=VALUE gives them
    assert cfg.train.tunings()[1] == TowerTuning("lora", last_n=4, grad_checkpointing=True)
    with pytest.raises(ConfigError, match="grad_checkpointing needs a tuned tower"):
        TowerTuning("frozen", grad_checkpointing=True)


def test_grad_checkpointing_marks_blocks_without_batch_norm(fresh_towers):
    from cliplab.models.stages import CHECKPOINT_ATTR, set_grad_checkpointing

    model = small_model(fresh_towers)
    tst, ist = model.text_stages(), model.image_stages()
    assert set_grad_checkpointing(tst) == 6  # MiniLM's layers
    assert all(getattr(tst[i].modules[0], CHECKPOINT_ATTR) for i in tst.block_indices())
    # EfficientNet blocks hold batch norm: a recompute would update its running statistics twice
    assert len(ist.block_indices()) > 2 and set_grad_checkpointing(ist) == 0
    assert set_grad_checkpointing(tst, enable=False) == 6 and not any(
        getattr(tst[i].modules[0], CHECKPOINT_ATTR) for i in tst.block_indices())
