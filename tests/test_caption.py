"""Captioning end to end with a tiny random Llama-style decoder: training, decoding, exact save/reload and
resume, what each tuning mode trains, metric wrappers against pycocoevalcap, CLIPScore, the
nearest-neighbour baseline, attention maps, and the CLI."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import tiny_causal_lm
from cliplab import rundir

pytest.importorskip("pycocoevalcap")
NEEDS_JAVA = pytest.mark.skipif(shutil.which("java") is None and os.environ.get("CLIPLAB_REQUIRE_JAVA") != "1",
                                reason="Java not installed (make test installs it)")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, towers):
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"), towers[1].tokenizer)


def caption_config(caption_dir, lm, cache, tuning="prefix", **train):
    from cliplab.caption.train import CaptionRunConfig

    return CaptionRunConfig.from_dict({
        "model": {"lm": str(lm), "grid": 2, "mapper_hidden": 32, "tuning": tuning, "lora_r": 2, "adapter_dim": 4,
                  "max_caption_tokens": 16},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "dev_images": 4, "device": "cpu",
                  "patience": 0, **train},
        "decode": {"beam": 2, "max_new_tokens": 8},
        "data": {"path": str(caption_dir / "captions.csv"), "cache_dir": str(cache)},
        "clipscore_model": "conse"})


@pytest.mark.parametrize("tuning", ["prefix", "lora", "adapter", "full"])
@pytest.mark.slow
def test_each_tuning_mode_trains_only_its_tensors(caption_dir, tiny_lm, tmp_path, tuning):
    from cliplab.caption.train import build_captioner, clean_caption, load_split
    from cliplab.embed import FeatureCache

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache", tuning)
    train = load_split(cfg, "train", FeatureCache(tmp_path / "cache"), "cpu", False)
    assert train.grid.shape == (8, 4, 320) and train.pooled.shape == (8, 1280)
    model = build_captioner(cfg, train)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mapper = {n for n in trainable if n.startswith("mapper.")}
    lm_params = {n for n, _ in model.lm.named_parameters()}
    counts = model.parameter_counts()
    if tuning == "prefix":
        assert trainable == mapper and counts["trainable"] == counts["mapper"]
    elif tuning == "lora":
        assert trainable - mapper and all("lora_" in n for n in trainable - mapper)
        assert all({"q_proj", "v_proj"} & set(n.split(".")) for n in trainable - mapper)
    elif tuning == "adapter":
        assert trainable - mapper and all(".adapter_" in n for n in trainable - mapper)
    else:
        assert {f"lm.{n}" for n in lm_params} <= trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model.loss(torch.tensor(train.grid[:4]), torch.tensor(train.pooled[:4]),
                      [clean_caption(c) for c in train.dataset.captions[:4]])
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # exactly the trainable tensors moved


@pytest.mark.slow
def test_train_generate_reload_and_resume(caption_dir, tiny_lm, tmp_path, monkeypatch):
    from cliplab.caption.model import Captioner
    from cliplab.caption.train import (evaluate_captioner, generate_captions, load_split,
                                       train_captioner)
    from cliplab.embed import FeatureCache
    from cliplab.errors import ConfigError
    from cliplab.rundir import read_metrics

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache", "lora", epochs=2)
    ref = train_captioner(cfg, tmp_path / "full", progress=False, log=lambda m: None)
    rows = read_metrics(tmp_path / "full")
    assert ref["best_epoch"] == int(np.argmax([r["dev"]["cider"] for r in rows]))
    assert (tmp_path / "full" / rundir.BEST / rundir.CAPTIONER_WEIGHTS).is_file()
    assert [r["epoch"] for r in rows] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    # a killed run resumes to the same losses and the same selected model
    from cliplab.caption import train as train_module

    original = train_module.atomic_write
    calls = []

    def die_after_first_checkpoint(path, write):
        out = original(path, write)
        if path.name == rundir.CHECKPOINT:
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(train_module, "atomic_write", die_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_captioner(cfg, tmp_path / "killed", progress=False, log=lambda m: None)
    monkeypatch.setattr(train_module, "atomic_write", original)
    torch.manual_seed(123)
    got = train_captioner(cfg, tmp_path / "killed", progress=False, log=lambda m: None)
    assert [r["train_loss"] for r in read_metrics(tmp_path / "killed")] == \
        pytest.approx([r["train_loss"] for r in rows], abs=1e-6)
    assert got["best_epoch"] == ref["best_epoch"]
    killed_rows = read_metrics(tmp_path / "killed")  # the reported time covers both processes' epochs
    assert got["seconds"]["train"] == pytest.approx(sum(r["epoch_seconds"] for r in killed_rows))
    assert got["seconds"]["train"] > got["seconds"]["train_this_process"] - 1e-6
    with pytest.raises(ConfigError, match="train.lr: 0.003 -> 0.01"):
        train_captioner(cfg.with_overrides(["train.lr=0.01"]), tmp_path / "killed", progress=False)

    # reload is exact: the saved tensors only, same captions
    a, b = Captioner.load(tmp_path / "full"), Captioner.load(tmp_path / "full" / rundir.BEST)
    saved = json.loads((tmp_path / "full" / rundir.BEST / rundir.CAPTIONER_CONFIG).read_text())
    assert saved["tuning"] == "lora" and saved["base_weights"]["lm"] == a.lm_base
    test = load_split(cfg, "test", FeatureCache(tmp_path / "cache"), "cpu", False)
    assert generate_captions(a, test, cfg.decode, "cpu") == generate_captions(b, test, cfg.decode, "cpu")
    greedy = generate_captions(a, test, cfg.decode, "cpu", beam=1)
    assert set(greedy) == set(test.dataset.images)
    ids = a.generate(torch.from_numpy(test.grid[:2]), torch.from_numpy(test.pooled[:2]), beam=1, max_new_tokens=5)
    assert all(len(x) <= 5 for x in ids)

    res = evaluate_captioner(tmp_path / "full", tokenizer="simple", progress=False, plots=True)
    assert res["n_images"] == 4 and set(res["model"]) >= {"bleu4", "cider", "rouge_l", "clipscore", "refclipscore"}
    assert res["model"]["spice"] is None and "unavailable" in res["model"]["spice_status"]
    assert "not comparable to CLIP ViT-B/32" in res["clipscore_note"]
    plots = tmp_path / "full" / rundir.PLOTS
    assert (plots / "caption_gallery.png").is_file() and list(plots.glob("attention_*.png"))
    att = json.loads(next(plots.glob("attention_*.json")).read_text())
    assert np.asarray(att["maps"]).shape[1:] == (2, 2) and len(att["maps"]) == len(att["words"])
    again = evaluate_captioner(tmp_path / "full", tokenizer="simple", progress=False, reuse_captions=True)
    assert again["model"]["cider"] == pytest.approx(res["model"]["cider"])


@pytest.mark.slow
def test_attention_maps_cover_the_grid(caption_dir, tiny_lm, tmp_path):
    from PIL import Image

    from cliplab.caption.figures import words_and_maps
    from cliplab.caption.train import build_captioner, load_split
    from cliplab.embed import FeatureCache
    from cliplab.viz.captions import attention_figure

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache")
    split = load_split(cfg, "train", FeatureCache(tmp_path / "cache"), "cpu", False)
    model = build_captioner(cfg, split).eval()
    ids = model.tokenizer("a red circle on grass", add_special_tokens=False)["input_ids"]
    maps = model.attention(torch.from_numpy(split.grid[:1]), torch.from_numpy(split.pooled[:1]), ids)
    assert maps.shape == (len(ids), 2, 2) and (maps >= 0).all() and (maps.sum((1, 2)) <= 1 + 1e-5).all()
    words, wmaps, layers = words_and_maps(model, split.grid[0], split.pooled[0], "a red circle on grass", "cpu",
                                          layers=None)
    assert layers == list(range(model.lm.config.num_hidden_layers))
    per_layer = model.attention(torch.from_numpy(split.grid[:1]), torch.from_numpy(split.pooled[:1]), ids,
                                per_layer=True)
    assert per_layer.shape == (len(layers), len(ids), 2, 2) and torch.allclose(per_layer.mean(0), maps)
    auto = words_and_maps(model, split.grid[0], split.pooled[0], "a red circle on grass", "cpu")[2]
    flat = per_layer.flatten(2)[:, :, 1:].numpy().astype(np.float64)  # brute force: share x word-specificity
    score = [np.mean([f.sum() for f in layer]) * np.mean([0.5 * np.abs(f / f.sum() - np.mean([g / g.sum()
             for g in layer], axis=0)).sum() for f in layer]) for layer in flat]
    assert len(auto) == 1 and auto[0] == int(np.argmax(score))
    assert words == ["a", "red", "circle", "on", "grass"] and wmaps.shape == (5, 2, 2)
    assert np.isnan(wmaps[:, 0, 0]).all() and np.allclose(np.nansum(wmaps, axis=(1, 2)), 1.0)  # sink masked
    raw = words_and_maps(model, split.grid[0], split.pooled[0], "a red circle on grass", "cpu", layers=None,
                         mask_sink=False)[1]
    assert np.isfinite(raw).all() and np.allclose(wmaps[:, 1, 1] / wmaps[:, 0, 1], raw[:, 1, 1] / raw[:, 0, 1])
    out = attention_figure(Image.new("RGB", (64, 64)), words, wmaps, tmp_path / "att.png", title="x\nnote")
    saved = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and saved["maps"][0][0][0] is None and saved["maps"][0][1][1] > 0
    assert model.lm.config._attn_implementation != "eager"  # the eager pass for attention weights is undone


@NEEDS_JAVA
@pytest.mark.slow
def test_metric_wrappers_match_pycocoevalcap_on_a_toy_set():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from cliplab.caption.metrics import caption_metrics

    refs = {"a": ["A dog runs on the beach.", "A brown dog running along the sea shore."],
            "b": ["Two children play football in a park.", "Kids kicking a ball on the grass."],
            "c": ["A man rides a bicycle down the street.", "A cyclist on a city road."]}
    cands = {"a": "A dog is running on the beach.", "b": "Two kids play with a ball on grass.",
             "c": "A man rides a bike on the road."}
    got = caption_metrics(refs, cands, tokenizer="ptb")
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in cands.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [got[f"bleu{i}"] for i in range(1, 5)] == pytest.approx([100 * b for b in bleu])
    assert got["cider"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert got["rouge_l"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])
    assert got["meteor"] == pytest.approx(100 * Meteor().compute_score(gts, res)[0])
    assert 40 < got["bleu1"] < 100 and got["tokenizer"] == "ptb"
    perfect = caption_metrics({"x": ["a dog runs on the beach"] * 2}, {"x": "a dog runs on the beach"},
                              tokenizer="simple", meteor=False)
    assert perfect["bleu4"] == pytest.approx(100, abs=1e-3)


def test_bad_caption_inputs_are_one_line_errors(caption_dir, tiny_lm, tmp_path, cli):
    from cliplab.caption.metrics import caption_metrics, clip_scores
    from cliplab.errors import DataError

    with pytest.raises(DataError, match="image 'x': empty reference caption"):
        caption_metrics({"x": ["a dog", "  "]}, {"x": "a dog"}, tokenizer="simple")
    with pytest.raises(DataError, match="same images"):
        caption_metrics({"x": ["a dog"]}, {"y": "a dog"}, tokenizer="simple")
    # CLIPScore / RefCLIPScore against a brute-force reading of Hessel et al. (2021)
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img, cand = unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(3, 8)))
    refs = [unit(rng.normal(size=(2, 8))) for _ in range(3)]
    got = clip_scores(img, cand, refs)
    clip = [2.5 * max(float(i @ c), 0) for i, c in zip(img, cand)]
    ref = [max(max(float(r @ c) for r in rs), 0) for rs, c in zip(refs, cand)]
    hm = [2 * a * b / (a + b) if a + b > 0 else 0 for a, b in zip(clip, ref)]
    assert got["clipscore"] == pytest.approx(100 * np.mean(clip)) and got["refclipscore"] == pytest.approx(100 * np.mean(hm))

    res = cli("caption", "generate", tmp_path / "no-run", caption_dir / "images" / "img00.jpg")
    assert res.returncode == 2 and "not a captioner" in res.stdout
    res = cli("caption", "generate", tmp_path, tmp_path / "missing.jpg")
    assert res.returncode == 2 and "image not found" in res.stdout and len(res.stdout.strip().splitlines()) == 1
    res = cli("caption", "train", "-c", "flickr8k_caption", "-s", "model.tuning=everything")
    assert res.returncode == 2 and "model.tuning must be one of prefix, lora, adapter, full" in res.stdout


def test_nearest_neighbour_baseline_takes_the_consensus_caption():
    from cliplab.caption.train import CaptionSplit, nearest_neighbour_captions
    from cliplab.data import CaptionDataset

    caps = ["a dog runs", "a dog runs fast", "a cat sleeps on a sofa", "an orange bicycle", "a cat sleeps on the sofa",
            "a grey cat sleeps on a couch"]
    train = CaptionSplit(CaptionDataset("/", ["t0", "t1"], caps, [0, 0, 1, 1, 1, 1]),
                         np.zeros((2, 1, 1)), np.array([[1.0, 0.0], [0.0, 1.0]]))
    test = CaptionSplit(CaptionDataset("/", ["q0", "q1"], ["x", "y"], [0, 1]), np.zeros((2, 1, 1)),
                        np.array([[0.1, 0.9], [0.9, 0.2]]))
    got = nearest_neighbour_captions(train, test)
    assert got["q1"] in ("a dog runs", "a dog runs fast")
    assert got["q0"] == "a cat sleeps on a sofa"  # t1's caption closest to its others (never the outlier)


@pytest.mark.slow
def test_caption_cli_train_eval_generate(caption_dir, tiny_lm, tmp_path, cli):
    import yaml

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache", "adapter", epochs=1).to_dict()
    (tmp_path / "cap.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    res = cli("caption", "train", "-c", tmp_path / "cap.yaml", "--run-dir", run, "--no-eval")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("caption", "eval", run, "--tokenizer", "simple", "--beam", "1", "--clipscore-model", "none")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((run / rundir.CAPTIONS).read_text())
    assert out["beam"] == 1 and len(out["captions"]) == 4 and "nearest neighbour" in res.stdout
    assert "BLEU-4" in (run / rundir.RESULTS_MD).read_text()
    res = cli("caption", "generate", run, caption_dir / "images" / "img00.jpg", caption_dir / "images" / "img01.jpg",
              "--json", "--beam", "2", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    caps = json.loads(res.stdout.strip().splitlines()[-1])
    assert [c["image"] for c in caps] == [str(caption_dir / "images" / f"img0{i}.jpg") for i in (0, 1)]
    assert all(isinstance(c["caption"], str) for c in caps)
    res = cli("caption", "generate", run, caption_dir / "images" / "img00.jpg", "--json", "--beam", "2",
              "--max-new-tokens", "4", "--rerank-k", "2")
    assert res.returncode == 0 and isinstance(json.loads(res.stdout.strip().splitlines()[-1])[0]["caption"], str)
    res = cli("caption", "eval", run, "--split", "dev", "--tokenizer", "simple", "--beam", "2", "--rerank-k", "2",
              "--clipscore-model", "none")
    assert res.returncode == 0, res.stdout + res.stderr
    dev = json.loads((run / "captions_dev.json").read_text())
    assert dev["split"] == "dev" and dev["decode"]["rerank_k"] == 2 and dev["beam"] == 2
    assert json.loads((run / rundir.CAPTIONS).read_text())["split"] == "test"  # dev scoring never hides the test
    assert "consensus re-ranking against 2 nearest training images" in (run / "captions_dev.md").read_text()
    res = cli("caption", "eval", run, "--rerank-k", "-1")
    assert res.returncode == 2 and "--rerank-k must be >= 0" in res.stdout


@pytest.mark.slow
def test_features_bundle_trains_and_scores_like_the_images(caption_dir, tiny_lm, tmp_path):
    """A run trained from an exported bundle finds the images again for CLIPScore and figures; where the
    images are absent, an evaluation that needs them is refused before decoding (never a silent 0)."""
    from cliplab.caption.train import evaluate_captioner, export_bundle, train_captioner
    from cliplab.errors import ConfigError

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache", "prefix", epochs=1)
    bundle = export_bundle(cfg, tmp_path / "feats.npz", progress=False)
    quiet = {"progress": False, "log": lambda m: None}
    train_captioner(cfg, tmp_path / "images", **quiet)
    train_captioner(cfg.with_overrides([f"data.features={bundle}"]), tmp_path / "bundle", **quiet)
    a = evaluate_captioner(tmp_path / "images", tokenizer="simple", progress=False, log=lambda m: None)
    b = evaluate_captioner(tmp_path / "bundle", tokenizer="simple", progress=False, log=lambda m: None, plots=True)
    assert [c["nearest_neighbour"] for c in a["captions"]] == [c["nearest_neighbour"] for c in b["captions"]]
    assert b["nearest_neighbour"]["clipscore"] == pytest.approx(a["nearest_neighbour"]["clipscore"], abs=1e-6)
    assert (tmp_path / "bundle" / rundir.PLOTS / "caption_gallery.png").is_file()
    from cliplab.viz.report import build_report  # the evaluated run, its table and figures in the report

    page = build_report([tmp_path / "bundle"], tmp_path / "report.html").read_text()
    assert "Captioning (test, 4 images" in page and "caption gallery" in page and "attention 0" in page

    elsewhere = cfg.with_overrides([f"data.features={bundle}", f"data.path={tmp_path / 'absent.csv'}"])
    train_captioner(elsewhere, tmp_path / "gpu", **quiet)
    with pytest.raises(ConfigError, match="4 of 4 test images not found"):
        evaluate_captioner(tmp_path / "gpu", tokenizer="simple", progress=False, log=lambda m: None)
    res = evaluate_captioner(tmp_path / "gpu", tokenizer="simple", progress=False, log=lambda m: None,
                             clipscore_model="none")
    assert res["model"]["clipscore"] is None and res["n_images"] == 4


def test_consensus_rerank_and_nearest_training_images():
    from cliplab.caption.rerank import consensus_rerank, nearest_training_images
    from cliplab.errors import ConfigError

    rng = np.random.default_rng(0)
    train, target = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(7, 6)).astype(np.float32)
    got = nearest_training_images(train, target, 5)
    for t in range(len(target)):  # brute force: cosine of each pair, highest first
        sims = [float(np.dot(target[t], x) / np.linalg.norm(target[t]) / np.linalg.norm(x)) for x in train]
        assert list(got[t]) == sorted(range(len(train)), key=lambda i: -sims[i])[:5]
    assert list(nearest_training_images(train, target, 1)[:, 0]) == list(got[:, 0])
    with pytest.raises(ConfigError, match="k must be from 1 to 40"):
        nearest_training_images(train, target, 41)

    consensus = {"q0": ["a dog runs on the grass", "a brown dog runs on grass", "a dog running on the grass"],
                 "q1": ["a man rides a bike", "a man riding a bicycle"]}
    chosen, scores = consensus_rerank({"q0": ["a cat sleeps on a sofa", "a dog runs on the grass", ""],
                                       "q1": ["a man rides a bike", "a man rides a bike"]}, consensus)
    assert chosen == {"q0": "a dog runs on the grass", "q1": "a man rides a bike"}
    assert scores["q0"][1] > scores["q0"][0] >= 0 and scores["q0"][2] == 0.0  # an empty candidate scores 0
    assert scores["q1"][0] == pytest.approx(scores["q1"][1])  # a tie keeps the LM's better-ranked candidate
    with pytest.raises(ConfigError, match="same images"):
        consensus_rerank({"q0": ["x"]}, consensus)


@pytest.mark.slow
def test_reranked_decoding_picks_a_beam_candidate(caption_dir, tiny_lm, tmp_path):
    from cliplab.caption.train import (build_captioner, consensus_captions, generate_candidates, generate_captions,
                                       load_split)
    from cliplab.embed import FeatureCache
    from cliplab.errors import ConfigError

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache", "prefix")
    cache = FeatureCache(tmp_path / "cache")
    train, test = load_split(cfg, "train", cache, "cpu", False), load_split(cfg, "test", cache, "cpu", False)
    model = build_captioner(cfg, train)
    cands = generate_candidates(model, test, cfg.decode, "cpu", beam=3, num_return=3)
    assert set(cands) == set(test.dataset.images) and all(len(c) == 3 for c in cands.values())
    best = generate_captions(model, test, cfg.decode, "cpu", beam=3)
    assert best == {k: c[0] for k, c in cands.items()}  # the beam's best comes first
    reranked = generate_captions(model, test, cfg.decode, "cpu", beam=3, train=train, rerank_k=2)
    assert all(reranked[k] in cands[k] for k in cands)
    near = consensus_captions(train, test, 2)
    assert all(len(v) == sum(len(train.references[n]) for n in train.dataset.images if
                             any(c in train.references[n] for c in v)) for v in near.values())
    with pytest.raises(ConfigError, match="needs the training split"):
        generate_captions(model, test, cfg.decode, "cpu", beam=3, rerank_k=2)
    with pytest.raises(ConfigError, match="num_return must be from 1 to the beam size 2"):
        model.generate(torch.from_numpy(test.grid[:1]), torch.from_numpy(test.pooled[:1]), beam=2, num_return=3)


@pytest.mark.slow
def test_visual_tokens_from_a_tuned_two_tower_model(caption_dir, tiny_lm, tmp_path):
    """``model.image_model``: the visual tokens come from a cliplab model's (tuned) image tower, cached apart
    from the pretrained tower's and recorded as other weights."""
    from cliplab.caption.train import load_split
    from cliplab.caption.visual import caption_image_tower, tower_weights_id
    from cliplab.embed import FeatureCache
    from cliplab.errors import ConfigError
    from cliplab.models.factory import create_model

    model = create_model(seed=0)
    with torch.no_grad():
        model.image_tower.model.conv_head.weight.mul_(1.5)  # as if tuning had moved the head conv
    model.tuned_tower_keys = ["image_tower.model.conv_head.weight"]
    model.save(tmp_path / "tuned")
    pristine = caption_image_tower(caption_config(caption_dir, tiny_lm, tmp_path).model.image)
    tuned = caption_image_tower({}, str(tmp_path / "tuned"))
    assert tuned.fingerprint() != pristine.fingerprint()
    assert tower_weights_id(tuned).startswith(pristine.weights_id + "+") and tower_weights_id(pristine) == \
        pristine.weights_id
    assert not any(p.requires_grad for p in tuned.parameters())
    cache = FeatureCache(tmp_path / "cache")
    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache")
    a = load_split(cfg, "test", cache, "cpu", False)
    b = load_split(cfg.with_overrides([f"model.image_model={tmp_path / 'tuned'}"]), "test", cache, "cpu", False)
    assert np.allclose(a.grid, b.grid)  # the grid comes from before the head conv
    assert not np.allclose(a.pooled, b.pooled) and b.image_weights == tower_weights_id(tuned)
    with pytest.raises(ConfigError, match="model not found"):
        caption_image_tower({}, str(tmp_path / "missing"))


@pytest.mark.slow  # trains and scores a captioner, draws its figures (~20 s)
def test_caption_api_results_are_tables_with_figures(caption_dir, tiny_lm, tmp_path):
    """cliplab.caption.train / evaluate return result objects: a table per epoch and the curves; the scores beside
    the nearest-neighbour baseline (equal to the written captions.json), the gallery and attention maps."""
    import matplotlib.figure

    import cliplab
    from cliplab.api import CaptionRun, CaptionScores
    from cliplab.errors import ConfigError

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache", "prefix", epochs=2)
    run = cliplab.caption.train(cfg, run_dir=tmp_path / "run", evaluate=False, log=lambda m: None)
    assert isinstance(run, CaptionRun) and run["fit"] is run.fit and run.test is None and dict(run)["run_dir"]
    epochs = run.table()
    assert list(epochs["epoch"]) == [0, 1] and "train_loss" in epochs and 0 <= run.best_epoch <= 1
    curves = run.curves()
    assert "dev cider" in [line.get_label() for ax in curves.axes for line in ax.get_lines()]
    scores = cliplab.caption.evaluate(tmp_path / "run", tokenizer="simple", progress=False, log=lambda m: None,
                                      clipscore_model="none")
    assert isinstance(scores, CaptionScores) and json.loads(json.dumps(run.to_dict()))["test"] is None
    assert json.loads(json.dumps(scores.to_dict()))["model"] == scores["model"]
    written = json.loads((tmp_path / "run" / rundir.CAPTIONS).read_text())
    table = scores.table().set_index("model")
    assert list(table.index) == ["captioner", "nearest neighbour"]
    assert table.loc["captioner", "cider"] == written["model"]["cider"] == scores["model"]["cider"]
    assert table.loc["nearest neighbour", "bleu4"] == written["nearest_neighbour"]["bleu4"]
    assert "<table>" in scores._repr_html_() and len(scores["captions"]) == 4
    maps = scores.attention(n=2)
    assert len(maps) == 2 and all(isinstance(f, matplotlib.figure.Figure) for f in maps)
    one = scores["captions"][1]["image"]
    assert isinstance(scores.attention([one]), matplotlib.figure.Figure)
    with pytest.raises(ConfigError, match="not in the evaluated test split: nope.jpg"):
        scores.attention(["nope.jpg"])
    assert isinstance(scores.gallery(n=1), matplotlib.figure.Figure)


@pytest.mark.slow  # builds a captioner on the fixture's visual tokens
def test_a_caption_is_one_line(caption_dir, tiny_lm, tmp_path, monkeypatch):
    """Generation stops at a line break as at EOS (every token whose text holds one), and decoding cuts there."""
    from types import SimpleNamespace

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from cliplab.caption.model import Captioner
    from cliplab.caption.train import build_captioner, load_split
    from cliplab.embed import FeatureCache

    bpe = ByteLevelBPETokenizer()  # a byte-level BPE vocabulary like SmolLM2's / GPT-2's, with line-break tokens
    bpe.train_from_iterator(["a dog runs\non the grass.\n\nAaron's profile"] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<eos>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    stops = Captioner.stop_ids(SimpleNamespace(tokenizer=fast, _stop_ids=None))
    breaks = {i for i in range(len(fast)) if len((fast.decode([i]) + "x").splitlines()) > 1}  # any line break
    want = breaks | {fast.eos_token_id}
    assert stops == want and fast.convert_tokens_to_ids("Ċ") in stops and fast.eos_token_id in stops
    assert fast.convert_tokens_to_ids("č") in stops  # '\r' too, not only '\n'

    cfg = caption_config(caption_dir, tiny_lm, tmp_path / "cache")
    split = load_split(cfg, "train", FeatureCache(tmp_path / "cache"), "cpu", False)
    model = build_captioner(cfg, split).eval()
    ids = model.tokenizer("a red circle on grass", add_special_tokens=False)["input_ids"]
    assert model.stop_ids() == {model.tokenizer.eos_token_id}  # this WordPiece vocabulary has no line breaks
    model._stop_ids = {model.tokenizer.eos_token_id, ids[2]}  # stand-in: 'circle' as a line break
    seen = {}

    def generate(**kwargs):
        seen.update(kwargs)
        eos = model.tokenizer.eos_token_id
        return torch.tensor([ids + [eos], ids[:1] + [eos] * len(ids)])

    monkeypatch.setattr(model.lm, "generate", generate)
    grid, pooled = torch.from_numpy(split.grid[:2]), torch.from_numpy(split.pooled[:2])
    assert model.hf_generate(grid, pooled) == [ids[:2], ids[:1]]  # greedy: tests/test_index_captions.py
    assert sorted(seen["eos_token_id"]) == sorted(model._stop_ids) and seen["min_new_tokens"] == 1
    monkeypatch.setattr(model.tokenizer, "decode", lambda *a, **k: " a dog runs\nAaron's profile / Aaron is. x")
    assert model.decode(ids) == "a dog runs"
