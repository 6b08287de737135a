"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D from pycocoevalcap (the COCO caption evaluation
code), SPICE reported as unavailable, and CLIPScore / RefCLIPScore (Hessel et al. 2021) with a cliplab model.

Tokenisation: ``ptb`` is pycocoevalcap's PTB tokenizer (Stanford CoreNLP, needs Java) and is what published
numbers use; ``simple`` (lower-case, punctuation removed, whitespace split) needs no Java and is what dev-set
model selection uses on machines without it. Every result records which one was used. Scores are x100.
"""

from __future__ import annotations

import re
import shutil
from typing import Mapping, Sequence

import numpy as np

from cliplab.errors import ConfigError, DataError
from cliplab.extras import require

SPICE_STATUS = "unavailable: SPICE needs Stanford CoreNLP models downloaded at first use (no network here)"
_PUNCT = re.compile(r"[^\w\s']|_")


def simple_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def java_available() -> bool:
    return shutil.which("java") is not None


def _check(refs: Mapping, cands: Mapping) -> None:
    if set(refs) != set(cands):
        raise DataError("candidates and references must cover the same images")
    for k, rs in refs.items():
        if not rs or any(not str(r).strip() for r in rs):
            raise DataError(f"image {k!r}: empty reference caption")


def tokenize(texts: Mapping[str, Sequence[str]], tokenizer: str) -> dict[str, list[str]]:
    if tokenizer == "simple":
        return {k: [simple_tokenize(t) for t in v] for k, v in texts.items()}
    if tokenizer != "ptb":
        raise ConfigError(f"caption tokenizer must be ptb or simple, not {tokenizer!r}")
    if not java_available():
        raise ConfigError("the PTB tokenizer (and METEOR) need Java: install a JRE (make test installs Debian's "
                          "default-jre-headless), or use tokenizer=simple (then numbers are not comparable to papers)")
    tok = require("pycocoevalcap.tokenizer.ptbtokenizer", "caption metrics").PTBTokenizer()
    keys = list(texts)
    out = tok.tokenize({i: [{"caption": t} for t in texts[k]] for i, k in enumerate(keys)})
    return {k: out[i] for i, k in enumerate(keys)}


def cider_d(refs: Mapping[str, Sequence[str]], cands: Mapping[str, str], tokenizer: str = "simple"
            ) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D (x100) and per-image scores."""
    _check(refs, cands)
    from cliplab.extras import require as _require

    cider = _require("pycocoevalcap.cider.cider", "caption metrics").Cider()
    gts, res = tokenize(refs, tokenizer), tokenize({k: [v] for k, v in cands.items()}, tokenizer)
    score, per = cider.compute_score(gts, res)
    return 100.0 * float(score), {k: 100.0 * float(s) for k, s in zip(gts, per)}


def caption_metrics(refs: Mapping[str, Sequence[str]], cands: Mapping[str, str], *, tokenizer: str = "ptb",
                    meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (x100) of ``cands`` (image -> caption) against ``refs``."""
    _check(refs, cands)
    require("pycocoevalcap", "caption metrics")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = tokenize(refs, tokenizer), tokenize({k: [v] for k, v in cands.items()}, tokenizer)
    out: dict = {"tokenizer": tokenizer, "n_images": len(gts),
                 "n_references": int(np.mean([len(v) for v in gts.values()])) if gts else 0}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{i + 1}": 100.0 * float(b) for i, b in enumerate(bleu)})
    out["rouge_l"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    cider, per = Cider().compute_score(gts, res)
    out["cider"] = 100.0 * float(cider)
    out["per_image_cider"] = {k: 100.0 * float(s) for k, s in zip(gts, per)}
    if meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        try:
            out["meteor"] = 100.0 * float(m.compute_score(gts, res)[0])
        finally:
            try:
                m.close()
            except Exception:  # noqa: BLE001 - older versions have no close()
                pass
    else:
        out["meteor"] = None
        out["meteor_status"] = "unavailable: METEOR needs Java" if meteor else "not computed"
    out["spice"] = None
    out["spice_status"] = SPICE_STATUS
    return out


def clip_scores(image_emb: np.ndarray, cand_emb: np.ndarray, ref_emb: list[np.ndarray], w: float = 2.5) -> dict:
    """CLIPScore = w * max(cos(image, candidate), 0); RefCLIPScore = harmonic mean of CLIPScore and
    max(max_r cos(candidate, reference r), 0), per image and averaged (x100). Embeddings unit-norm."""
    image_emb, cand_emb = np.asarray(image_emb, np.float64), np.asarray(cand_emb, np.float64)
    clip = w * np.maximum((image_emb * cand_emb).sum(1), 0.0)
    ref = np.array([max(float(np.max(r @ c)), 0.0) for r, c in zip(ref_emb, cand_emb)])
    refclip = np.where(clip + ref > 0, 2 * clip * ref / np.maximum(clip + ref, 1e-12), 0.0)
    return {"clipscore": 100.0 * float(clip.mean()), "refclipscore": 100.0 * float(refclip.mean()),
            "clipscore_w": w, "per_image_clipscore": (100.0 * clip).tolist()}
