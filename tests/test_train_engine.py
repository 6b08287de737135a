"""The one training engine (cliplab.train.loop) under both of its tasks, contrastive training (Trainer) and
captioning (train_captioner): exact resume after a kill, and the random states a checkpoint holds."""

import pytest
import torch

from cliplab.models.checkpoint import load_checkpoint
from cliplab.models.heads import HeadConfig
from cliplab.rundir import CHECKPOINT, read_metrics
from cliplab.train import loop
from cliplab.train.config import TrainConfig
from cliplab.train.trainer import Trainer
from tests.conftest import tiny_causal_lm
from tests.test_train import FeatureModel, synthetic_split

KINDS = ["contrastive", "caption"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
TIMING = ("step_seconds", "train_seconds", "epoch_seconds", "sequences_per_s")  # wall clock: differs per run


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, towers):
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"), towers[1].tokenizer)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def train(request, caption_dir, feature_cache):
    """``train(kind, run_dir, epochs, device="cpu")``: a tiny run of that kind in ``run_dir``."""

    def run(kind, run_dir, epochs, device="cpu"):
        if kind == "contrastive":
            torch.manual_seed(0)
            model = FeatureModel(24, 16, HeadConfig(kind="mlp", embed_dim=16, hidden_dim=32, dropout=0.1))
            cfg = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=1, patience=0, device=device)
            Trainer(model, cfg, run_dir, progress=False, tensorboard=False).fit(
                synthetic_split(0, n_images=64), synthetic_split(1, n_images=32))
        else:
            from cliplab.caption.train import train_captioner
            from tests.test_caption import caption_config

            lm = request.getfixturevalue("tiny_lm")
            cfg = caption_config(caption_dir, lm, feature_cache, "lora", epochs=epochs, device=device)
            train_captioner(cfg, run_dir, progress=False, log=lambda m: None)

    return run


def _untimed(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_run(kind, train, tmp_path, monkeypatch):
    train(kind, tmp_path / "full", epochs=2)

    original = loop.TrainLoop._checkpoint

    def checkpoint_then_die(self, epoch):
        original(self, epoch)
        if epoch == 0:
            raise Killed

    monkeypatch.setattr(loop.TrainLoop, "_checkpoint", checkpoint_then_die)
    with pytest.raises(Killed):
        train(kind, tmp_path / "killed", epochs=2)
    monkeypatch.setattr(loop.TrainLoop, "_checkpoint", original)
    assert [r["epoch"] for r in read_metrics(tmp_path / "killed")] == [0]
    torch.manual_seed(1234)  # any global random state: the checkpoint restores it
    train(kind, tmp_path / "killed", epochs=2)

    full, resumed = _untimed(tmp_path / "full"), _untimed(tmp_path / "killed")
    assert [r["epoch"] for r in full] == [0, 1] and resumed == full
    a, b = load_checkpoint(tmp_path / "full" / CHECKPOINT), load_checkpoint(tmp_path / "killed" / CHECKPOINT)
    assert a["epoch"] == b["epoch"] == 1 and a["best_epoch"] == b["best_epoch"]
    ta, tb = _tensors(a), _tensors(b)  # weights, optimizer moments, random state
    assert set(ta) == set(tb) and any(k.startswith("/model/") for k in ta) and "/torch_rng" in ta
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_the_checkpoint_holds_the_random_states(kind, device, train, tmp_path):
    train(kind, tmp_path / "run", epochs=1, device=device)
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert ckpt["torch_rng"].dtype == torch.uint8 and torch.equal(ckpt["torch_rng"], torch.get_rng_state())
    if device == "cuda":
        assert torch.equal(ckpt["cuda_rng"], torch.cuda.get_rng_state())
    else:
        assert "cuda_rng" not in ckpt


@pytest.mark.parametrize("epochs,warmup_epochs,steps_per_epoch", [(1, 1, 10), (1, 2, 10), (3, 1, 1), (2, 0, 50)])
def test_onecycle_runs_whatever_the_warmup(epochs, warmup_epochs, steps_per_epoch):
    """Warm-up as long as the run (or longer) used to divide by zero in OneCycleLR: the rise is kept between
    2 steps and the run's length minus one, so the rate peaks once and falls back."""
    from cliplab.train.config import TrainConfig
    from cliplab.train.trainer import make_scheduler

    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup_epochs, schedule="onecycle")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(epochs * steps_per_epoch - 1):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    peak = max(range(len(rates)), key=rates.__getitem__)
    assert 0 < peak < len(rates) - 1 and rates[peak] == pytest.approx(0.1) and rates[-1] < rates[0]


def test_onecycle_refuses_a_run_too_short_for_it():
    from cliplab.errors import ConfigError
    from cliplab.train.config import TrainConfig
    from cliplab.train.trainer import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="onecycle needs at least 3 optimizer steps; this run has 2"):
        make_scheduler(optimizer, TrainConfig(epochs=2, schedule="onecycle"), 1)
