"""Output-space ensembles: a weighted sum of several models' cosine similarities, as one embedding model.

Each member's unit embedding is scaled by ``sqrt(w_i)`` and the parts are concatenated, so the dot product
of an ensemble image embedding with an ensemble text embedding is ``sum_i w_i * cos_i`` (weights sum to 1,
which keeps the embedding unit-norm). Every evaluator (retrieval, zero-shot, search) then scores the
ensemble like any model. A prompt ensemble averages the joint embeddings of its templates (and normalises
the mean once), as for any single model.

The joined embedding is unit-norm whatever ``normalize`` asks of the members: an ensemble defines cosine
scores only, so its dot product is its cosine, and :func:`cliplab.eval.zeroshot.check_similarity` refuses
``dot`` for it (:func:`cliplab.models.wrappers.cosine_only`) rather than report the cosine numbers twice.

An ensemble is a :class:`~cliplab.models.base.ComposedModel`: the embedding pipeline embeds datasets and image
folders member by member (each member's features cached under its own towers), so members may preprocess
images differently (EfficientNet-Lite0 at 224 px beside Lite2 at 260 px); ``encode_image`` then takes one image
tensor per member, and only a caller that needs one shared ``preprocess()`` is refused. When every member is a
:class:`TowerModel` over the same frozen towers (ConSE and the trained heads of ``make demo``), the ensemble is
a TowerModel too: datasets are embedded once from cached tower features and each weight only reruns the heads.

A folder holding ``ensemble.json`` (written by ``cliplab ensemble``, which chooses the weights on dev data) is an
ensemble model too: ``load_model(folder)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cliplab import rundir
from cliplab.errors import ConfigError
from cliplab.models.base import AS_GIVEN, EmbeddingModel, Level, TowerModel, View, logit_scale_value
from cliplab.utils import sha256_text


def join_embeddings(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """One embedding per row whose dot products are ``sum_i w_i * cos_i``: each member's unit embedding scaled by
    ``sqrt(w_i)`` and concatenated (weights summing to 1 keep it unit-norm)."""
    return torch.cat([math.sqrt(w) * F.normalize(p.float(), dim=-1) for w, p in zip(weights, parts)], -1)


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
        self.shared_input = len({repr(m.preprocess()) for m in members}) == 1
        scale = sum(w * logit_scale_value(m) for w, m in zip(self.weights, members))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=False)

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble embedding of the members' embeddings (any scale) of the same rows."""
        return join_embeddings(parts, self.weights)

    def encode_image(self, images: torch.Tensor | Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Embeddings of one image batch (members sharing preprocessing) or of one batch per member: each member's
        embedding as ``normalize`` asks, joined (unit-norm: see the module docstring)."""
        if isinstance(images, (list, tuple)):
            if len(images) != len(self.members):
                raise ConfigError(f"ensemble of {len(self.members)} models got {len(images)} image batches")
            return self.join([m.encode_image(x, normalize=normalize) for m, x in zip(self.members, images)])
        if not self.shared_input:
            raise ConfigError("the ensemble's members preprocess images differently: pass one image batch per "
                              "member (each through that member's preprocess())")
        return self.join([m.encode_image(images, normalize=normalize) for m in self.members])

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        return self.join([m.encode_text(texts, normalize=normalize) for m in self.members])

    def image_parts(self) -> list[tuple[EmbeddingModel, View]]:
        return [(m, AS_GIVEN) for m in self.members]

    def combine_images(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor:
        """Tower features side by side (a probe's input), embeddings joined."""
        return torch.cat([p.float() for p in parts], -1) if level == "features" else self.join(parts)

    def text_parts(self) -> list[EmbeddingModel]:
        return list(self.members)

    def combine_texts(self, parts: list[torch.Tensor], level: Level) -> torch.Tensor:
        return self.combine_images(parts, level)

    def preprocess(self) -> Callable:
        if not self.shared_input:
            raise ConfigError("this ensemble's members preprocess images differently (e.g. other input sizes): "
                              "it embeds datasets and image folders member by member, but has no single image "
                              "preprocessing for this use")
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
        return self.join([m.project_image(features, normalize=True) for m in self.members])

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.join([m.project_text(features, normalize=True) for m in self.members])


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


def read_ensemble_folder(folder: str | Path) -> tuple[list[str], list[float], bool]:
    """Member specs, weights and the flip test-time augmentation setting of an ensemble model folder
    (``ensemble.json`` from ``cliplab ensemble``)."""
    path = Path(folder) / rundir.ENSEMBLE
    data = rundir.read_json(path)
    members, weights = data.get("members"), data.get("weights")
    if not isinstance(members, list) or not isinstance(weights, list) or not members \
            or not all(isinstance(m, str) for m in members):
        raise ConfigError(f"{path}: needs 'members' (model specs) and 'weights' (numbers) lists")
    if len(members) != len(weights):
        raise ConfigError(f"{path}: {len(members)} members but {len(weights)} weights")
    flip_tta = data.get("flip_tta", False)
    if not isinstance(flip_tta, bool):
        raise ConfigError(f"{path}: 'flip_tta' must be true or false, not {flip_tta!r}")
    # local members are stored relative to the folder (see ``ensemble_member_spec``)
    return [str(Path(folder) / m) if (Path(folder) / m).exists() else m for m in members], weights, flip_tta


def ensemble_member_spec(spec: str, folder: str | Path) -> str:
    """How ``ensemble.json`` in ``folder`` names a member: a local path relative to the folder (so the folders
    can move together), any other spec (``conse``, ``clip:...``, a hub id) as given."""
    import os

    return os.path.relpath(Path(spec).resolve(), Path(folder).resolve()) if Path(spec).exists() else spec


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
