"""Output-space ensembles: a weighted sum of several models' cosine similarities, as one embedding model.

Each member's unit embedding is scaled by ``sqrt(w_i)`` and the parts are concatenated, so the dot product
of an ensemble image embedding with an ensemble text embedding is ``sum_i w_i * cos_i`` (weights sum to 1,
which keeps the embedding unit-norm). Every evaluator (retrieval, zero-shot, search) then scores the
ensemble like any model. A prompt ensemble averages the joint embeddings of its templates (and normalises
the mean once), as for any single model.

Members must share their image preprocessing. When every member is a :class:`TowerModel` over the same
frozen towers (ConSE and the trained heads of ``make demo``), the ensemble is a TowerModel too: datasets
are embedded once from cached tower features and each weight only reruns the heads.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.errors import ConfigError
from cliplab.models.base import EmbeddingModel, TowerModel, logit_scale_value
from cliplab.utils import sha256_text


def _weights(weights: Sequence[float], n: int) -> tuple[float, ...]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"ensemble: {n} members but {len(w)} weights")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"ensemble weights must be finite, >= 0 and not all 0, not {w}")
    return tuple(x / sum(w) for x in w)


class ScoreEnsemble(nn.Module):
    """Weighted sum of member similarities (see the module docstring); any :class:`EmbeddingModel` members."""

    def __init__(self, members: Sequence[EmbeddingModel], weights: Sequence[float]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError("an ensemble needs at least two models")
        self.weights = _weights(weights, len(members))
        self.members = nn.ModuleList(members)
        first = repr(members[0].preprocess())
        for i, m in enumerate(members[1:], 1):
            if repr(m.preprocess()) != first:
                raise ConfigError(f"ensemble member {i + 1} preprocesses images differently from member 1 "
                                  f"({repr(m.preprocess())} vs {first}); ensemble models with one image input")
        scale = sum(w * logit_scale_value(m) for w, m in zip(self.weights, members))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=False)

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([math.sqrt(w) * F.normalize(p.float(), dim=-1) for w, p in zip(self.weights, parts)], -1)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._join([m.encode_image(images, normalize=True) for m in self.members])

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        return self._join([m.encode_text(texts, normalize=True) for m in self.members])

    def preprocess(self) -> Callable:
        return self.members[0].preprocess()

    def fingerprint(self) -> str:
        return sha256_text("ensemble", *(f"{w!r}:{m.fingerprint()}" for w, m in zip(self.weights, self.members)))


class TowerScoreEnsemble(ScoreEnsemble):
    """A :class:`ScoreEnsemble` of TowerModels over the same frozen towers: heads run on cached features."""

    def __init__(self, members: Sequence[TowerModel], weights: Sequence[float]) -> None:
        super().__init__(members, weights)
        self.image_tower = members[0].image_tower
        self.text_tower = members[0].text_tower

    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._join([m.project_image(features, normalize=True) for m in self.members])

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._join([m.project_text(features, normalize=True) for m in self.members])


def shares_towers(members: Sequence[EmbeddingModel]) -> bool:
    """Whether every member is a TowerModel over the same (fingerprint-equal) image and text towers."""
    if not all(isinstance(m, TowerModel) for m in members):
        return False
    image = {m.image_tower.fingerprint() for m in members}
    text = {m.text_tower.fingerprint() for m in members}
    return len(image) == 1 and len(text) == 1


def score_ensemble(members: Sequence[EmbeddingModel], weights: Sequence[float]) -> ScoreEnsemble:
    """The ensemble of ``members`` with ``weights`` (normalised to sum 1): tower-sharing when possible."""
    cls = TowerScoreEnsemble if shares_towers(members) else ScoreEnsemble
    return cls(members, weights)


def parse_ensemble_spec(spec: str) -> tuple[list[str], list[float]]:
    """``W_A*SPEC_A+W_B*SPEC_B[+...]`` (weights optional, default equal), e.g. ``0.7*conse+0.3*runs/demo``."""
    specs, weights = [], []
    for part in spec.split("+"):
        part = part.strip()
        head, star, rest = part.partition("*")
        if star:
            try:
                weights.append(float(head))
            except ValueError:
                raise ConfigError(f"ensemble spec {spec!r}: {head!r} is not a weight (write W*MODEL)") from None
            part = rest.strip()
        else:
            weights.append(float("nan"))
        if not part:
            raise ConfigError(f"ensemble spec {spec!r}: empty model name (write W*MODEL+W*MODEL)")
        specs.append(part)
    given = [w for w in weights if not math.isnan(w)]
    if given and len(given) != len(weights):
        raise ConfigError(f"ensemble spec {spec!r}: give a weight for every model or for none")
    return specs, (weights if given else [1.0] * len(specs))
