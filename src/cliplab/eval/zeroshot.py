"""Zero-shot classification from class names with prompt templates, by cosine or raw dot product.

Cosine: each template's text embedding is L2-normalised, the templates are averaged and the mean is
renormalised (CLIP's prompt ensembling); image embeddings are normalised too. Dot product: raw
(unnormalised) embeddings, templates averaged without normalisation. The two rank classes
identically exactly when every class embedding has the same norm (image norms never change an
image's ranking, only its softmax sharpness); see :func:`explain_similarity`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.errors import ConfigError
from cliplab.models.base import logit_scale_value

# A long irrelevant prefix for the "what if we add random text in front?" experiment.
IRRELEVANT_PREFIX = ("The quarterly meeting about the new parking regulations was moved to Thursday afternoon "
                     "because the projector in room four was broken again, and nobody remembered the password. ")
NEGATED_TEMPLATE = "this is not a photo of a {}."


def template_sets() -> dict[str, list[str]]:
    """Named template sets: CLIP's 80 ImageNet templates, open_clip's 7 'simple' ones, and a few singles."""
    from cliplab.assets import prompt_templates

    return {
        "clip80": prompt_templates("clip80"),
        "simple7": prompt_templates("simple7"),
        "photo": ["a photo of a {}."],
        "name": ["{}"],
        "prefixed": [IRRELEVANT_PREFIX + "a photo of a {}."],
        "negated": [NEGATED_TEMPLATE],
    }


def resolve_templates(spec: str | Sequence[str]) -> list[str]:
    """A named set (``clip80``, ``simple7``, ``photo``, ...), one template with ``{}``, or a list of them."""
    if isinstance(spec, str):
        sets = template_sets()
        if spec in sets:
            return sets[spec]
        spec = [spec]
    templates = list(spec)
    for t in templates:
        if "{}" not in t:
            raise ConfigError(f"template {t!r} has no '{{}}' placeholder for the class name "
                              f"(named sets: {', '.join(template_sets())})")
    return templates


@torch.inference_mode()
def _prompt_embeddings(model: nn.Module, class_names: Sequence[str], templates: Sequence[str], normalize: bool,
                       batch_size: int = 256) -> torch.Tensor:
    """``[T, C, d]`` embeddings of every template filled with every class (unit per prompt if ``normalize``)."""
    per_template = []
    for tpl in templates:
        texts = [tpl.format(c) for c in class_names]
        emb = torch.cat([model.encode_text(texts[i:i + batch_size], normalize=False).float()
                         for i in range(0, len(texts), batch_size)])
        per_template.append(F.normalize(emb, dim=-1) if normalize else emb)
    return torch.stack(per_template)


def template_mean_embeddings(model: nn.Module, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[C, d]`` mean over templates of unit prompt embeddings, not renormalised (its norm says how much the
    templates agree; score ensembles weigh members by it)."""
    return _prompt_embeddings(model, class_names, templates, normalize=True).mean(0)


def class_text_embeddings(model: nn.Module, class_names: Sequence[str], templates: Sequence[str], *,
                          normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
    """``[C, d]`` class embeddings averaged over templates (normalised per template and after, if asked)."""
    mean = _prompt_embeddings(model, class_names, templates, normalize, batch_size).mean(0)
    return F.normalize(mean, dim=-1) if normalize else mean


def check_similarity(model: nn.Module, similarity: str) -> None:
    """Refuse a similarity the model does not define: 'cosine' or 'dot', and for a score ensemble cosine only
    (its score is the weighted sum of its members' cosine similarities; it has no dot product of its own), also
    under a wrapper such as flip TTA."""
    from cliplab.models.wrappers import cosine_only

    if similarity not in ("cosine", "dot"):
        raise ConfigError(f"similarity must be 'cosine' or 'dot', not {similarity!r}")
    if similarity == "dot" and cosine_only(model):
        raise ConfigError("an ensemble scores by the weighted sum of its members' cosine similarities; dot product "
                          "is not defined for it: use --similarity cosine")


def similarities_for(model: nn.Module, requested: str) -> tuple[str, ...]:
    """The similarities to report for ``requested`` ('cosine', 'dot' or 'both'): 'both' is cosine alone for an
    ensemble (see :func:`check_similarity`); an explicit 'dot' on one is refused."""
    from cliplab.models.wrappers import cosine_only

    if requested == "both":
        return ("cosine",) if cosine_only(model) else ("cosine", "dot")
    check_similarity(model, requested)
    return (requested,)


class ZeroShotClassifier:
    """Scores images against class text embeddings; works with any model with encode_image/encode_text."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], templates: str | Sequence[str] = "photo",
                 similarity: str = "cosine") -> None:
        check_similarity(model, similarity)
        self.class_names = list(class_names)
        self.templates = resolve_templates(templates)
        self.similarity = similarity
        self.class_embeddings = class_text_embeddings(model, self.class_names, self.templates,
                                                      normalize=similarity == "cosine")
        self.logit_scale = logit_scale_value(model)

    def scores(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` similarities of raw image embeddings to each class."""
        img = image_embeddings.float()
        if self.similarity == "cosine":
            img = F.normalize(img, dim=-1)
        return img @ self.class_embeddings.to(img.device).T

    def predict_proba(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Softmax over classes at the model's temperature (100 when the model has none)."""
        return (self.logit_scale * self.scores(image_embeddings)).softmax(-1)

    def predict(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.scores(image_embeddings).argmax(-1)


def explain_similarity(image_embeddings: torch.Tensor, cosine: ZeroShotClassifier, dot: ZeroShotClassifier) -> dict:
    """Why cosine and dot product agree or differ on these embeddings: the spread of the norms."""
    img_norm = image_embeddings.float().norm(dim=-1)
    cls_norm = dot.class_embeddings.norm(dim=-1)
    agree = (cosine.predict(image_embeddings) == dot.predict(image_embeddings)).float().mean().item()
    spread = float(cls_norm.max() / cls_norm.min()) if cls_norm.min() > 0 else float("inf")
    text = (f"class-embedding norms range {cls_norm.min():.3f}-{cls_norm.max():.3f} (ratio {spread:.3f}); "
            f"image norms {img_norm.min():.3f}-{img_norm.max():.3f}. Dot product = cosine x |image| x |class|: "
            "an image's own norm scales all its scores alike and never changes its ranking, but unequal class "
            "norms favour long class vectors, so predictions differ exactly when class norms differ. "
            f"Here the two agree on {100 * agree:.1f}% of images.")
    return {"prediction_agreement": agree, "class_norm_min": float(cls_norm.min()), "class_norm_max": float(cls_norm.max()),
            "image_norm_min": float(img_norm.min()), "image_norm_max": float(img_norm.max()), "explanation": text}


DEFAULT_VARIANTS = ("photo", "name", "simple7", "clip80", "prefixed", "negated")


@torch.inference_mode()
def zeroshot_experiment(model: nn.Module, image_embeddings: torch.Tensor, labels, class_names: Sequence[str], *,
                        variants: Sequence[str] = DEFAULT_VARIANTS, similarities: Sequence[str] = ("cosine", "dot"),
                        top_images: Sequence[int] = ()) -> dict:
    """Accuracy/F1 for each prompt variant x similarity, the cosine-vs-dot explanation, and top-5 classes
    of chosen images (for bar charts)."""
    from cliplab.eval.classification import classification_metrics

    results, classifiers = {}, {}
    for variant in variants:
        for sim in similarities:
            clf = ZeroShotClassifier(model, class_names, variant, sim)
            classifiers[(variant, sim)] = clf
            scores = clf.scores(image_embeddings).cpu().numpy()
            results[f"{variant}|{sim}"] = {"variant": variant, "similarity": sim, "n_templates": len(clf.templates),
                                           "example": clf.templates[0].format(class_names[0]),
                                           **classification_metrics(labels, scores, class_names)}
    out = {"results": results}
    if "cosine" in similarities and "dot" in similarities:
        v = variants[0]
        out["cosine_vs_dot"] = explain_similarity(image_embeddings, classifiers[(v, "cosine")], classifiers[(v, "dot")])
    if top_images:
        best = max((r for r in results.values() if r["similarity"] == similarities[0]), key=lambda r: r["accuracy"])
        clf = classifiers[(best["variant"], similarities[0])]
        probs = clf.predict_proba(image_embeddings[list(top_images)])
        k = min(5, len(class_names))
        top_p, top_i = probs.topk(k, dim=-1)
        out["top5"] = {"variant": best["variant"], "images": [
            {"index": int(i), "label": class_names[int(labels[i])],
             "classes": [class_names[int(j)] for j in ti], "probabilities": [float(p) for p in tp]}
            for i, ti, tp in zip(top_images, top_i, top_p)]}
    return out
