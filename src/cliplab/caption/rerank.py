"""Nearest training images and consensus re-ranking of a captioner's beam candidates.

Consensus re-ranking (Devlin et al. 2015, "Language Models for Image Captioning: The Quirks and What Works",
used there on nearest-neighbour captions): the captions of the k training images most similar to an image
(cosine of pooled image features) describe what such images usually show; of the beam's candidates, the one
that agrees best with them (CIDEr-D against all k x 5 captions) is kept. It trades the LM's own ranking, which
favours fluent but unusual phrasings, for the consensus wording the references tend to share.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cliplab.caption.metrics import cider_d
from cliplab.errors import ConfigError


def nearest_training_images(train_pooled: np.ndarray, target_pooled: np.ndarray, k: int) -> np.ndarray:
    """``[n_target, k]`` indices of the ``k`` training images most similar to each target image (pooled-feature
    cosine, most similar first; ties broken by the lower index)."""
    if not 1 <= k <= len(train_pooled):
        raise ConfigError(f"nearest training images: k must be from 1 to {len(train_pooled)}, not {k}")
    a = train_pooled / np.maximum(np.linalg.norm(train_pooled, axis=1, keepdims=True), 1e-12)
    b = target_pooled / np.maximum(np.linalg.norm(target_pooled, axis=1, keepdims=True), 1e-12)
    return np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :k]


def consensus_rerank(candidates: Mapping[str, Sequence[str]], consensus: Mapping[str, Sequence[str]]
                     ) -> tuple[dict[str, str], dict[str, list[float]]]:
    """For each image, the candidate with the highest CIDEr-D (simple tokenizer) against that image's consensus
    captions; ties keep the earlier candidate (the LM's higher-ranked one). Returns the choice per image and
    every candidate's consensus score."""
    if set(candidates) != set(consensus):
        raise ConfigError("consensus re-ranking: candidates and consensus captions must cover the same images")
    refs, cands, slots = {}, {}, {}
    for name, cs in candidates.items():
        if not cs:
            raise ConfigError(f"consensus re-ranking: image {name!r} has no candidate caption")
        if not consensus[name]:
            raise ConfigError(f"consensus re-ranking: image {name!r} has no consensus caption")
        for j, c in enumerate(cs):
            key = f"{name}\x00{j}"
            # an empty candidate (EOS first) cannot be tokenised into n-grams: it scores 0
            if c.strip():
                refs[key], cands[key] = list(consensus[name]), c
            slots[key] = (name, j)
    scores = cider_d(refs, cands, tokenizer="simple")[1] if cands else {}
    per_image: dict[str, list[float]] = {name: [0.0] * len(cs) for name, cs in candidates.items()}
    for key, (name, j) in slots.items():
        per_image[name][j] = scores.get(key, 0.0)
    chosen = {name: candidates[name][int(np.argmax(per_image[name]))] for name in candidates}
    return chosen, per_image
