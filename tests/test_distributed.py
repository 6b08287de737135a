"""Data-parallel training with 2 CPU processes (gloo) equals one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cliplab.models.heads import HeadConfig
from cliplab.train.config import TrainConfig
from cliplab.train.distributed import DistContext
from cliplab.rundir import read_metrics
from cliplab.train.trainer import PairSampler, Trainer
from tests.test_train import FeatureModel, synthetic_split
from cliplab import rundir

BATCH = 16


def make(tmp: Path, name: str, loss: str, ctx: DistContext | None = None) -> Trainer:
    torch.manual_seed(0)
    model = FeatureModel(24, 16, HeadConfig(kind="mlp", embed_dim=16, hidden_dim=32, dropout=0.0))
    loss_args = {"margin": 0.2, "mining": "hardest"} if loss == "triplet" else {}
    cfg = TrainConfig(epochs=3, batch_size=BATCH, lr=3e-3, warmup_epochs=1, patience=0, device="cpu", loss=loss,
                      loss_args=loss_args, sampling="all_pairs")
    return Trainer(model, cfg, tmp / name, progress=False, tensorboard=False, dist=ctx)


def one_step(trainer: Trainer, split) -> tuple[float, dict[str, torch.Tensor]]:
    sampler = PairSampler(split.caption_image, len(split.dataset.image_paths()), "all_pairs", BATCH, 0)
    images, captions = next(iter(sampler.epoch(0)))
    trainer.model.train()
    trainer.loss_fn = trainer.loss_fn.train()
    loss = trainer.batch_loss(trainer._inputs(split), images, captions, None)
    loss.backward()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.dist.average_gradients(params)
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def worker(rank: int, world: int, tmp: str, loss: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world)
    tmp = Path(tmp)
    train, dev = synthetic_split(0), synthetic_split(1)
    value, grads = one_step(make(tmp, f"step{rank}", loss, ctx), train)
    torch.save({"loss": value, "grads": grads}, tmp / f"grads{rank}.pt")
    make(tmp, "ddp", loss, ctx).fit(train, dev)  # rank 0 writes metrics and checkpoints
    dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["infonce", "triplet"])
@pytest.mark.subprocess
def test_two_process_loss_gradients_and_training_equal_single_process(tmp_path, loss):
    mp.spawn(worker, args=(2, str(tmp_path), loss), nprocs=2, join=True)
    train, dev = synthetic_split(0), synthetic_split(1)
    ref_loss, ref_grads = one_step(make(tmp_path, "single-step", loss), train)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)
        assert set(got["grads"]) == set(ref_grads)
        for name, g in ref_grads.items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-5, atol=1e-7), name

    make(tmp_path, "single", loss).fit(train, dev)
    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert len(ddp) == len(single) == 3
    assert [r["train_loss"] for r in ddp] == pytest.approx([r["train_loss"] for r in single], rel=1e-4)


@pytest.mark.subprocess
def test_torchrun_cli_two_processes(caption_dir, tmp_path, cli):
    """The real entry point: ``torchrun --nproc_per_node 2 -m cliplab train`` (gloo on CPU) trains like one
    process on the same global batches: same losses per epoch, same test metrics."""
    run = tmp_path / "run"
    env = {**os.environ, "CLIPLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["train", str(caption_dir / "captions.csv"), "-s", "train.epochs=2", "-s", "train.batch_size=8",
            "-s", "model.head.embed_dim=32", "-s", "model.head.dropout=0", "-s", "train.device=cpu",
            "-s", "baseline=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cliplab",
           *args, "--run-dir", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((run / rundir.RESULTS).read_text())
    assert results["world_size"] == 2 and len(read_metrics(run)) == 2
    single = tmp_path / "single"
    assert cli(*args, "--run-dir", single, cache=tmp_path / "cache").returncode == 0
    ref = json.loads((single / rundir.RESULTS).read_text())
    assert ref["world_size"] == 1
    assert [r["train_loss"] for r in read_metrics(run)] == pytest.approx([r["train_loss"] for r in read_metrics(single)],
                                                                         rel=1e-4)
    for key in ("t2i_mrr", "i2t_mrr", "t2i_mean_rank"):
        assert results["test"]["trained"][key] == pytest.approx(ref["test"]["trained"][key], rel=1e-4), key
