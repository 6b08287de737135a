
import numpy as np
import pytest
import torch

from cliplab.data import CaptionDataset
from cliplab.embed.pipeline import DatasetFeatures
from cliplab.models.heads import HeadConfig, ProjectionHead
from cliplab.models.stages import Stage, Stages
from cliplab.train.config import TrainConfig
from cliplab.rundir import read_metrics
from cliplab.train.trainer import PairSampler, Trainer
from cliplab import rundir


class FeatureModel(torch.nn.Module):
    """Heads + temperature over raw feature vectors (the part of a TwoTower that head training touches)."""

    def __init__(self, di, dt, cfg):
        super().__init__()
        self.image_head = ProjectionHead(di, cfg)
        self.text_head = ProjectionHead(dt, cfg)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def project_image(self, x, normalize=True):
        return torch.nn.functional.normalize(self.image_head(x), dim=-1)

    def project_text(self, x, normalize=True):
        return torch.nn.functional.normalize(self.text_head(x), dim=-1)

    def image_stages(self):
        return Stages([Stage("head", [self.image_head], self.image_head, is_block=False)])

    def text_stages(self):
        return Stages([Stage("head", [self.text_head], self.text_head, is_block=False)])

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / "state.pt")


def synthetic_split(seed, n_images=120, di=24, dt=16):
    """Image and caption features that are different noisy linear views of one latent per image."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_images, 8))
    wi, wt = np.random.default_rng(99).normal(size=(8, di)), np.random.default_rng(98).normal(size=(8, dt))
    owner = np.repeat(np.arange(n_images), rng.integers(1, 4, n_images))
    img = latent @ wi + 0.1 * rng.normal(size=(n_images, di))
    txt = latent[owner] @ wt + 0.3 * rng.normal(size=(len(owner), dt))
    ds = CaptionDataset("/x", [f"{i}.jpg" for i in range(n_images)], [f"c{j}" for j in range(len(owner))], owner)
    return DatasetFeatures(ds, img.astype(np.float32), txt.astype(np.float32))


def make_trainer(tmp_path, name, epochs=12, **kw):
    torch.manual_seed(0)
    model = FeatureModel(24, 16, HeadConfig(kind="mlp", embed_dim=16, hidden_dim=32, dropout=0.1))
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, warmup_epochs=1, patience=0, device="cpu", **kw)
    return Trainer(model, cfg, tmp_path / name, progress=False, tensorboard=False)


def test_training_learns_alignment(tmp_path):
    train, dev = synthetic_split(0), synthetic_split(1)
    trainer = make_trainer(tmp_path, "run")
    before = trainer.evaluate(dev)
    info = trainer.fit(train, dev)
    after = trainer.evaluate(dev)
    assert after["t2i_r1"] > before["t2i_r1"] + 30 and after["i2t_r1"] > 40
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == list(range(12))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    dev_rsum = [r["dev"]["rsum"] for r in rows]  # the dev-selected epoch is the first best one
    assert info["best_epoch"] == int(np.argmax(dev_rsum)) and (tmp_path / "run" / rundir.BEST / "state.pt").is_file()
    # an epoch's time covers its steps and its dev evaluation (what training time across resumes adds up)
    assert all(r["epoch_seconds"] > r["step_seconds"] > 0 and "dev" in r for r in rows)


def test_all_pairs_sampling_has_duplicates_masked(tmp_path):
    sampler = PairSampler(np.array([0, 0, 0, 1, 2, 2]), 3, "all_pairs", 6, seed=0)
    (images, captions), = list(sampler.epoch(0))
    assert sorted(captions.tolist()) == list(range(6)) and len(set(images.tolist())) == 3
    rc = PairSampler(np.array([0, 0, 0, 1, 2, 2]), 3, "random_caption", 3, seed=0)
    (images, captions), = list(rc.epoch(0))
    assert sorted(images.tolist()) == [0, 1, 2]
    assert all(np.array([0, 0, 0, 1, 2, 2])[c] == i for i, c in zip(images, captions))

    # an all-pairs batch holds the same image more than once: the trainer's loss masks those pairs, i.e.
    # it equals the reference InfoNCE with same-image pairs removed and differs from the unmasked one
    from cliplab.train.losses import InfoNCELoss

    trainer = make_trainer(tmp_path, "pairs", epochs=3, sampling="all_pairs")
    split = trainer._inputs(synthetic_split(0))
    images, captions = np.array([0, 0, 1, 1, 2, 3]), np.array([0, 1, 2, 3, 4, 5])
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.batch_loss(split, images, captions, None)
        zi = torch.nn.functional.normalize(trainer.model.image_head(split.image.batch(images, "cpu")), dim=-1)
        zt = torch.nn.functional.normalize(trainer.model.text_head(split.text.batch(captions, "cpu")), dim=-1)
        scale = trainer.model.logit_scale.exp()
        logits = scale * zi @ zt.T
        same = torch.as_tensor(images)[:, None] == torch.as_tensor(images)[None, :]
        eye = torch.eye(6, dtype=torch.bool)
        masked = logits.masked_fill(same & ~eye, float("-inf"))
        ref = (torch.nn.functional.cross_entropy(masked, torch.arange(6))
               + torch.nn.functional.cross_entropy(masked.T, torch.arange(6))) / 2
        unmasked = InfoNCELoss()(zi, zt, scale)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert abs(got.item() - unmasked.item()) > 1e-3
    trainer.fit(synthetic_split(0), synthetic_split(1))
    assert len(read_metrics(tmp_path / "pairs")) == 3


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    train, dev = synthetic_split(0), synthetic_split(1)
    full = make_trainer(tmp_path, "full")
    full.fit(train, dev)
    ref = full.evaluate(dev)

    killed = make_trainer(tmp_path, "killed")
    original = killed._save_checkpoint

    def save_then_die(epoch, *a):
        original(epoch, *a)
        if epoch == 4:
            raise Killed

    killed._save_checkpoint = save_then_die
    with pytest.raises(Killed):
        killed.fit(train, dev)
    assert len(read_metrics(tmp_path / "killed")) == 5

    resumed = make_trainer(tmp_path, "killed")  # fresh process state, same run dir
    torch.manual_seed(1234)  # any global RNG state: the checkpoint restores it
    resumed.fit(train, dev)
    got = resumed.evaluate(dev)
    assert got == pytest.approx(ref, abs=1e-9)
    full_rows = read_metrics(tmp_path / "full")
    res_rows = read_metrics(tmp_path / "killed")
    assert [r["train_loss"] for r in res_rows] == pytest.approx([r["train_loss"] for r in full_rows], abs=1e-9)


@pytest.mark.parametrize("loss,args", [("triplet", {"margin": 0.2, "mining": "semihard"}), ("ntxent", {}),
                                       ("sigmoid", {})])
def test_every_loss_trains(tmp_path, loss, args):
    train, dev = synthetic_split(0), synthetic_split(1)
    trainer = make_trainer(tmp_path, loss, epochs=12, loss=loss, loss_args=args)
    before = trainer.evaluate(dev)
    trainer.fit(train, dev)
    after = trainer.evaluate(dev)
    assert after["t2i_r1"] > before["t2i_r1"] + 25, (loss, before["t2i_r1"], after["t2i_r1"])


def test_plateau_schedule_and_grad_accumulation(tmp_path):
    train, dev = synthetic_split(0), synthetic_split(1)
    plateau = make_trainer(tmp_path, "plateau", epochs=8, schedule="plateau")
    plateau.fit(train, dev)
    assert plateau.evaluate(dev)["t2i_r1"] > 40
    # accumulating 2 batches of 16 takes the same number of optimiser steps as one batch of 32 would
    torch.manual_seed(0)
    model = FeatureModel(24, 16, HeadConfig(kind="linear", embed_dim=16, dropout=0.0))
    cfg = TrainConfig(epochs=1, batch_size=16, grad_accum_steps=2, lr=1e-3, warmup_epochs=0, patience=0,
                      device="cpu", schedule="constant")
    trainer = Trainer(model, cfg, tmp_path / "accum", progress=False, tensorboard=False)
    steps = []
    original = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps.append(1)
        return original(self, *a, **k)

    torch.optim.AdamW.step = counting_step
    try:
        trainer.fit(train, None)
    finally:
        torch.optim.AdamW.step = original
    n_batches = len(PairSampler(train.caption_image, len(train.image), "random_caption", 16, 0))
    assert len(steps) == -(-n_batches // 2)
