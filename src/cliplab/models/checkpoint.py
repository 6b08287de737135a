"""Strict loading of saved tensors: every checkpoint load checks its keys and fails loudly.

Saved cliplab models hold only what training changed (heads, temperature, tuned tower tensors); the
rest comes from the base weights. So a load is partial by design, but never silent: a key the model
does not have, a tensor of the wrong shape, or a *required* key the file lacks is an error, and the
base weights the tensors were trained on must be the ones installed.

Loading never runs code from the file: :func:`load_checkpoint` unpickles with ``weights_only=True``, so a
file holding anything but tensors and plain values (dicts, lists, numbers, strings) is refused, not run.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from cliplab.errors import ConfigError


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """A training checkpoint (``last.pt``), unpickled with ``weights_only=True``: only tensors and plain
    values load, nothing in the file is executed. A file that needs other Python objects (made by an older
    cliplab or by something else), or that is not a readable checkpoint, is a :class:`ConfigError` naming it.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ConfigError(f"{path}: refused to load a checkpoint that holds Python objects other than tensors "
                          f"and plain values{what}; it was not written by this cliplab: pass --fresh to start "
                          "the run over") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path}: not a readable checkpoint ({first}); pass --fresh to start the run over") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: not a cliplab checkpoint (holds a {type(ckpt).__name__}, not a dict); pass "
                          "--fresh to start the run over")
    return ckpt


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], *, where: str,
                 required: Iterable[str] = ()) -> None:
    """Load ``state`` (a subset of ``module.state_dict()``) into ``module``.

    Raises :class:`ConfigError` naming ``where`` when ``state`` has keys the module lacks, a tensor of
    another shape, or lacks one of ``required``.
    """
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(required) - set(state))
    if unexpected or missing:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected else [])
        raise ConfigError(f"{where}: saved weights do not fit this model ({'; '.join(parts)})")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the model expects "
                          f"{tuple(own[k].shape)}")
    module.load_state_dict(dict(state), strict=False)


def check_base_weights(saved: Mapping[str, str] | None, current: Mapping[str, str], where: str) -> None:
    """Refuse tuned tensors trained on other base weights (``side -> digest`` as recorded at save time)."""
    for side, digest in (saved or {}).items():
        have = current.get(side)
        if have is not None and digest != have:
            raise ConfigError(f"{where}: trained on other {side} base weights (saved {digest[:16]}, installed "
                              f"{have[:16]}); install the weights it was trained on")
