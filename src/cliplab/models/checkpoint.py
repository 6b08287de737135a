"""Strict loading of saved tensors: every checkpoint load checks its keys and fails loudly.

Saved cliplab models hold only what training changed (heads, temperature, tuned tower tensors); the
rest comes from the base weights. So a load is partial by design, but never silent: a key the model
does not have, a tensor of the wrong shape, or a *required* key the file lacks is an error, and the
base weights the tensors were trained on must be the ones installed.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from cliplab.errors import ConfigError


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


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
