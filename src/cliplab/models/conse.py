"""ConSE zero-shot baseline (Norouzi et al., 2014) for a two-tower without a shared space.

An image is embedded as the probability-weighted average of the text embeddings of its top-T
ImageNet classes (from the image tower's own classifier); a caption is embedded by the text tower.
Both land in the text tower's space, so retrieval works with no training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.models.image_tower import ImageTower
from cliplab.models.text_tower import TextTower
from cliplab.utils import sha256_text

CONSE_TEMPLATES = ("a photo of a {}.", "{}")


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet class names (package data, see :mod:`cliplab.assets`)."""
    from cliplab.assets import imagenet_classnames as names

    return names()


class ConSE(nn.Module):
    """Exposes ``encode_image``/``encode_text`` like every cliplab model."""

    def __init__(self, image_tower: ImageTower, text_tower: TextTower, class_names: list[str] | None = None,
                 top_t: int = 10, templates: tuple[str, ...] = CONSE_TEMPLATES, batch_size: int = 256,
                 class_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.top_t = top_t
        self.templates = tuple(templates)
        self.class_names = class_names or imagenet_classnames()
        if image_tower.num_classes != len(self.class_names):
            raise ValueError(f"image tower has {image_tower.num_classes} classes, {len(self.class_names)} names given")
        if class_embeddings is not None and class_embeddings.shape[0] == len(self.class_names) and \
                tuple(templates) == CONSE_TEMPLATES and class_names is None:  # computed before for this text tower
            self.register_buffer("class_embeddings", class_embeddings.clone(), persistent=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)), requires_grad=False)
            return
        with torch.inference_mode():
            per_template = []
            for tpl in templates:
                texts = [tpl.format(c) for c in self.class_names]
                chunks = [text_tower.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
                per_template.append(F.normalize(torch.cat(chunks), dim=-1))
            class_emb = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        self.register_buffer("class_embeddings", class_emb.clone(), persistent=False)
        # no learned temperature: softmax over cosines at CLIP's usual scale of 100
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)), requires_grad=False)

    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled image-tower features -> ConSE embeddings."""
        probs = self.image_tower.classify(features).softmax(-1)
        top_p, top_i = probs.topk(self.top_t, dim=-1)
        z = torch.einsum("nt,ntd->nd", top_p, self.class_embeddings[top_i])
        return F.normalize(z, dim=-1) if normalize else z

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_image(self.image_tower(images), normalize)

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        return self.project_text(self.text_tower.encode(texts), normalize)

    def preprocess(self):
        return self.image_tower.transform()

    def fingerprint(self) -> str:
        return sha256_text("conse", self.image_tower.fingerprint(), self.text_tower.fingerprint(), str(self.top_t),
                           *self.templates, *self.class_names)
