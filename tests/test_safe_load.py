"""Safe on a user's own files: loading a run folder or a CIFAR pickle never runs code from it, a
half-written metrics line does not break a resume, and an unexpected error is one line (``--debug``: the
traceback)."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from cliplab.data.labelled import load_labelled
from cliplab.errors import ConfigError, DataError
from cliplab.rundir import CHECKPOINT, METRICS, read_metrics
from tests.test_train import make_trainer, synthetic_split
from cliplab import rundir


class _Payload:
    """Unpickling this runs code: it creates ``marker`` (what a crafted checkpoint or pickle would do)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plant(path, marker, fmt: str = "torch") -> None:
    """A checkpoint-looking file at ``path`` whose loading would run code: torch.save's zip format, or a plain
    pickle (what an older torch.save wrote)."""
    ckpt = {"epoch": 0, "config": {}, "model": {}, "payload": _Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        torch.save(ckpt, path)
    else:
        path.write_bytes(pickle.dumps(ckpt, protocol=2))


# -- checkpoints: weights_only, refused with one line naming the file
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_trainer_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, fmt):
    marker = tmp_path / "marker"
    _plant(tmp_path / "run" / CHECKPOINT, marker, fmt)
    trainer = make_trainer(tmp_path, "run", epochs=2)
    with pytest.raises(ConfigError, match=r"last\.pt: .*--fresh") as info:
        trainer.fit(synthetic_split(0), synthetic_split(1))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_train_command_refuses_a_checkpoint_that_would_run_code(caption_dir, tmp_path, cli):
    marker, run = tmp_path / "marker", tmp_path / "run"
    _plant(run / CHECKPOINT, marker)
    res = cli("train", caption_dir / "captions.csv", "--run-dir", run, "-s", "train.device=cpu")
    assert res.returncode == 2 and "is not a cliplab run folder" in res.stdout  # a last.pt alone: not even opened
    assert not marker.exists()
    (run / rundir.RUN_MARKER).write_text('{"format": "cliplab-run"}')  # a cliplab run whose last.pt was replaced
    res = cli("train", caption_dir / "captions.csv", "--run-dir", run, "-s", "train.device=cpu")
    assert res.returncode == 2
    assert "refused to load" in res.stdout and str(run / CHECKPOINT) in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    assert not marker.exists()
    assert not (run / rundir.CONFIG).exists()  # refused before anything was written


def test_caption_trainer_refuses_a_checkpoint_that_would_run_code(caption_dir, tmp_path):
    from cliplab.caption.train import train_captioner
    from tests.test_caption import caption_config

    marker, run = tmp_path / "marker", tmp_path / "run"
    _plant(run / CHECKPOINT, marker)
    (run / rundir.RUN_MARKER).write_text('{"format": "cliplab-run"}')  # a cliplab run whose last.pt was replaced
    cfg = caption_config(caption_dir, tmp_path / "no-lm-needed", tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"last\.pt: refused to load .*--fresh"):
        train_captioner(cfg, run, progress=False, log=lambda m: None)
    assert not marker.exists()


# -- CIFAR pickles: only arrays, lists, bytes and numbers
class _Python2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle wrote the CIFAR files: protocol 2, byte strings as BINSTRING and numpy's
    array reconstructor under its old module name ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _dump(obj, path, how: str) -> None:
    with open(path, "wb") as f:
        if how == "python2":
            _Python2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=4)


def _cifar_folder(root, how: str = "python3", batch=None):
    root.mkdir()
    _dump({b"label_names": [b"cat", b"dog"], b"num_cases_per_batch": 3, b"num_vis": 3072}, root / "batches.meta", how)
    data = np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072)
    if batch is None:
        batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [1, 0, 1], b"data": data,
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
    _dump(batch, root / "test_batch", how)
    return data


@pytest.mark.parametrize("how", ["python2", "python3"])
def test_a_cifar_batch_loads(tmp_path, how):
    data = _cifar_folder(tmp_path / "cifar-10-batches-py", how)
    ds = load_labelled(tmp_path / "cifar-10-batches-py", split="test")
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [1, 0, 1]
    assert np.array_equal(ds.images.arrays, data.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    _cifar_folder(tmp_path / "cifar", batch={b"data": _Payload(marker), b"labels": [0]})
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR pickle \(refused builtins\.exec"):
        load_labelled(tmp_path / "cifar", split="test")
    assert not marker.exists()


# -- metrics.jsonl: a half-written last line is dropped, a damaged earlier line is an error
class Killed(Exception):
    pass


def test_resume_drops_a_half_written_last_metrics_line(tmp_path, monkeypatch):
    from cliplab.train import trainer as trainer_module

    train, dev = synthetic_split(0), synthetic_split(1)
    path, append = tmp_path / "run" / METRICS, trainer_module.append_metrics

    def killed_while_appending_epoch_2(run_dir, record):
        if record["epoch"] < 2:
            return append(run_dir, record)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record)[:30])
        raise Killed

    monkeypatch.setattr(trainer_module, "append_metrics", killed_while_appending_epoch_2)
    with pytest.raises(Killed):
        make_trainer(tmp_path, "run", epochs=3).fit(train, dev)
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [0, 1]  # the reader leaves the half line out

    monkeypatch.setattr(trainer_module, "append_metrics", append)
    make_trainer(tmp_path, "run", epochs=3).fit(train, dev)  # resumes after epoch 1's checkpoint
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0, 1, 2]


def test_a_damaged_metrics_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / METRICS).write_text('{"epoch": 0}\n{"epoch": 1, "tra\n{"epoch": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2: damaged metrics record"):
        read_metrics(tmp_path)


# -- unexpected errors: one line, exit 1; --debug / CLIPLAB_DEBUG=1 show the traceback
def _break_configs(monkeypatch):
    def boom():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("cliplab.configs.packaged_configs", boom)


def test_an_unexpected_error_is_one_line(cli, monkeypatch):
    monkeypatch.delenv("CLIPLAB_DEBUG", raising=False)
    _break_configs(monkeypatch)
    res = cli("configs")
    assert res.returncode == 1
    assert res.stdout.strip() == "error: RuntimeError: boom second line (run with --debug for the traceback)"
    assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.parametrize("how", ["option", "option after the command", "env"])
def test_debug_shows_the_traceback(cli, monkeypatch, how):
    _break_configs(monkeypatch)
    if how == "env":
        monkeypatch.setenv("CLIPLAB_DEBUG", "1")
        res = cli("configs")
    else:
        monkeypatch.delenv("CLIPLAB_DEBUG", raising=False)
        res = cli("--debug", "configs") if how == "option" else cli("configs", "--debug")
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    assert "--debug for the traceback" not in res.stdout
